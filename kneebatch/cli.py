"""``kneebatch`` command line: a thin layer over the library (no logic of its own)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from kneebatch import __version__
from kneebatch.errors import StudyError


def _client(args, device: str = "cpu"):
    """The command's Dask client (:func:`kneebatch.distributed.cluster.client_for`)."""
    from kneebatch.distributed.cluster import client_for

    cluster = getattr(args, "cluster", "local")
    return client_for(getattr(args, "workers", None), cluster, getattr(args, "gpus", None), device,
                      _resources(args) if cluster == "slurm" else None)


def _resources(args):
    from kneebatch.distributed.cluster import Resources

    return Resources(args.partition, args.account, args.time, args.mem, args.cpus_per_task, args.gpus_per_task,
                     args.setup)


def training_device(p) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the nets train (cuda: bfloat16 autocast; images are still made on the CPU)")
    p.add_argument("--batch-size", type=_positive, default=2,
                   help="fine patches per step (default 2, sized for a CPU; a GPU takes more)")


def slurm_options(p) -> None:
    """What every SLURM job of kneebatch's asks for (array tasks and jobqueue workers alike)."""
    g = p.add_argument_group("SLURM jobs")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--time", default=None, help="per job, e.g. 02:00:00")
    g.add_argument("--mem", default=None, help="per job, e.g. 16G")
    g.add_argument("--cpus-per-task", type=_positive, default=None)
    g.add_argument("--gpus-per-task", type=_positive, default=None, help="with --device cuda")
    g.add_argument("--setup", default="", help="shell lines each job runs first, e.g. 'module load cuda'")


def cmd_labels(args) -> int:
    from kneebatch import labels as L

    if args.json:
        print(L.to_json())
    else:
        for label in L.LABELS:
            print(f"{label.id:3d}  {label.name:26s} {label.group:10s} {label.color}")
    return 0


def cmd_engines_list(args) -> int:
    from kneebatch.inference.engine_dir import describe_sets

    rows = describe_sets(args.engines)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        dice = f"mean Dice {r['mean_dice']:.3f} ({r['evaluated_on']})" if r["mean_dice"] is not None else "not rated"
        print(f"{r['name']:10s} {r['status']:8s} {r['needs']:18s} {dice}; ONNX model {r['model_hash']}")
        if r["what"]:
            print(f"{'':10s} {r['what']}")
    return 0


def cmd_columns(args) -> int:
    from kneebatch.measure import columns_markdown, measurement_schema

    if args.markdown:
        print(columns_markdown(), end="")
    else:
        for f in measurement_schema():
            meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items()}
            print(f"{f.name:44s} {str(f.type):14s} {meta['unit']:14s} {meta['doc']}")
    return 0


def _months(text: str) -> list[int]:
    try:
        months = [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: months as whole numbers, comma-separated (0,12,24,48)") from None
    if not months or min(months) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: months after baseline, 0 or more")
    return months


def cmd_synth(args) -> int:
    from kneebatch.distributed.cluster import default_workers
    from kneebatch.synth.cohort import generate_cohort

    out = generate_cohort(args.out, args.n, seed=args.seed, preset=args.preset, protocol=args.protocol,
                          anatomy=args.anatomy, workers=args.workers or default_workers(), progress=not args.quiet,
                          visits=args.visits)
    studies = args.n * len(set(args.visits))
    print(f"wrote {studies} synthetic studies of {args.n} subjects ({args.protocol or 'clinical'}) to {out}/dicom, "
          f"truth to {out}/truth, {out}/clinical.csv")
    return 0


def cmd_convert(args) -> int:
    from kneebatch.ingest.nifti import parse_channels
    from kneebatch.jobs.convert import convert

    channels = parse_channels(args.channels) if args.channels else None

    with _client(args) as client:
        r = convert(args.src, args.store, client=client, key_file=args.key_file, show_progress=not args.quiet,
                    channels=channels, shard=args.shard)
    print(f"{r.studies_found} studies found ({r.files_scanned} files, {r.files_rejected} not usable images): "
          f"{r.converted} converted, {r.already_done} already in the store, {r.failed} failed "
          f"in {r.seconds:.1f} s ({r.studies_per_s:.2f} studies/s, {r.mb_per_s:.1f} MB/s)")
    if r.already_from_elsewhere:
        print(f"  {r.already_from_elsewhere} of those already in the store came from another folder: the same "
              "StudyInstanceUIDs were converted before, so they were not read again")
    _print_reasons(r.reasons)
    if r.failed:
        print(f"  reasons per study: {Path(args.store) / 'failures.parquet'}")
    return 0


def _print_reasons(reasons: dict) -> None:
    for reason, n in sorted(reasons.items()):
        print(f"  failed: {n} x {reason}")


def cmd_measure(args) -> int:
    from kneebatch.jobs.measure import measure_store
    from kneebatch.label_sets import parse_label_map

    label_map = parse_label_map(args.label_map) if args.label_map else None
    per_study = _run_label_maps(args)
    with _client(args) as client:
        r = measure_store(args.store, args.out, labels_dir=args.labels, client=client, show_progress=not args.quiet,
                          label_map=label_map, model=args.model, label_name=args.label_name, shard=args.shard,
                          force=args.force, per_study=per_study)
    source = (f"label files in {args.labels}" if args.labels else f"label map '{args.label_name}'" if args.label_name
              else f"the label maps run {args.run} wrote" if per_study is not None
              else "segmentations of " + (", ".join(r.models) or "no model"))
    print(f"{r.measured} studies measured from {source}, {r.already_done} already done, {r.failed} failed, "
          f"{r.carried_failures} failed earlier (convert) in {r.seconds:.1f} s")
    _print_reasons(r.reasons)
    _print_outputs(args, r)
    return 0


def _print_outputs(args, r) -> None:
    if args.shard.whole:
        print(f"-> {Path(args.out) / 'measurements.parquet'}, {Path(args.out) / 'failures.parquet'}")
    else:
        print(f"shard {args.shard} saved; when every shard has finished: kneebatch merge {args.out}")


def cmd_run(args) -> int:
    from kneebatch.inference.engine_dir import InferenceOptions
    from kneebatch.jobs.run import run

    options = InferenceOptions.resolve(args.engines, args.backend, args.device, args.threads, args.fp16 or None,
                                       args.tta, args.net_batch, args.gpus, args.allow_low_accuracy)
    if args.model:
        options = _with_model(options, args)
    elif args.channels or args.label_map or args.axis_order != "store":
        raise ValueError("--channels, --label-map and --axis-order describe a --model: add --model PATH")
    with _client(args, options.device) as client:
        r = run(args.store, args.out, options, client=client, batch_size=args.batch_size,
                show_progress=not args.quiet, force=args.force, shard=args.shard)
    print(f"{r.studies} studies: {r.segmented} segmented, {r.already_done} already done, {r.failed} failed, "
          f"{r.carried_failures} failed at convert; {r.seconds:.1f} s ({r.studies_per_s:.2f} studies/s)")
    _print_reasons(r.reasons)
    _print_outputs(args, r)
    return 0


def _with_model(options, args):
    """The options with another tool's model in the place of the engine sets, its input channels
    given store roles (from its dataset.json, or --channels)."""
    from dataclasses import replace

    from kneebatch.geometry import orientation_direction
    from kneebatch.inference.external import model_roles
    from kneebatch.inference.model_set import check_backend_for, declared_inputs
    from kneebatch.ingest.roles import ROLES
    from kneebatch.registry import resolve

    if args.engines:
        raise ValueError("give --engines or --model, not both")
    path, record = resolve(args.model)
    check_backend_for(path, args.backend or "torch")
    label_map, axis_order = args.label_map, args.axis_order
    if record is not None:  # what was recorded, unless said otherwise now
        label_map = label_map or record["label_map"]
        axis_order = axis_order if axis_order != "store" else record["axis_order"]
    roles = record["roles"] if record is not None and not args.channels else model_roles(
        declared_inputs(path), ROLES, args.channels)
    if axis_order != "store":
        orientation_direction(axis_order)  # a bad code stops here, in one line
    return replace(options, model=str(Path(path).resolve()), model_roles=tuple(roles), label_map=label_map,
                   model_axis_order=axis_order, model_backend=getattr(args, "backend", None) or "torch")


def cmd_models_add(args) -> int:
    from kneebatch.registry import add, registry_path

    record = add(args.path, args.name, args.channels, args.label_map, args.axis_order, args.replace)
    print(f"recorded {args.name}: {record['model_name']}, takes "
          f"{' + '.join(record['roles'])}, segments {len(record['tissues'])} tissues ({', '.join(record['tissues'])}), "
          f"axis order {record['axis_order']} -> {registry_path()}")
    return 0


def cmd_models_list(args) -> int:
    from kneebatch.registry import records, registry_path

    known = records()
    if args.json:
        print(json.dumps(known, indent=1))
        return 0
    if not known:
        print(f"no models recorded ({registry_path()}); kneebatch models add DIR --name NAME")
    for name, r in known.items():
        print(f"{name}: {r['model_name']} · takes {' + '.join(r['roles'])} · {', '.join(r['tissues'])} · "
              f"axis order {r['axis_order']} · {r['path']}")
    return 0


def _run_label_maps(args) -> dict | None:
    """``--run OUT``: each study's label map as that run wrote it (None: not asked)."""
    from kneebatch.outputs import label_maps_of

    run_out = getattr(args, "run", None)
    if run_out is None:
        return None
    if getattr(args, "label_name", None) or getattr(args, "model", None):
        raise ValueError("--run chooses each study's label map: leave out --label-name and --model")
    return label_maps_of(run_out, getattr(args, "store", None))


def cmd_merge(args) -> int:
    print(merge_shards(args.out))
    return 0


def merge_shards(out) -> str:
    """Merge a job's (or a store's convert) shards; what was merged, in a line."""
    from kneebatch.jobs.merge import merge

    m = merge(out)
    if m.get("store"):
        return (f"{m['shards']} shards merged: {m['studies']} studies in the store, {m['failed']} failed -> "
                f"{Path(out) / 'keymap.parquet'}, {Path(out) / 'failures.parquet'}")
    return (f"{m['shards']} shards merged: {m['rows']} rows, {m['failed']} failed, {m['carried_failures']} failed "
            f"at convert, of {m['studies']} studies -> {Path(out) / 'measurements.parquet'}")


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kneebatch submit",
        description="Run a job on a SLURM cluster as an array, one task per shard: kneebatch submit run STORE OUT "
                    "[run's options] --slurm --shards 8 [--partition … --time … --setup '…'] [--wait]. Each task "
                    "runs the command with --shard i/N; 'kneebatch merge OUT' (automatic with --wait) gathers "
                    "the shards; 'kneebatch status OUT' shows them; --resubmit OUT sends the failed ones again "
                    "(they resume).")
    p.add_argument("command", nargs="?", choices=["convert", "run", "measure"],
                   help="the job (its own options follow it)")
    p.add_argument("--slurm", action="store_true", help="submit with sbatch (the only scheduler so far)")
    p.add_argument("--shards", type=_positive, default=None, help="array tasks, one shard each (default 4)")
    slurm_options(p)
    p.add_argument("--wait", action="store_true", help="wait for every task, then merge")
    p.add_argument("--resubmit", type=Path, default=None, metavar="OUT",
                   help="submit again the shards of OUT's submission that failed or never ran")
    return p


def cmd_submit(argv: list[str]) -> int:
    from kneebatch.jobs import slurm

    sp = submit_parser()
    args, job_argv = sp.parse_known_args(argv)
    if args.resubmit is not None:
        if args.command or job_argv:
            sp.error("--resubmit OUT takes no job; the submission's own command is sent again")
        out = args.resubmit
        from kneebatch.jobs.status import resubmit

        r = resubmit(out)
        if r["resubmitted"]:
            print(f"resubmitted shards {', '.join(map(str, r['resubmitted']))} as SLURM job {r['jobs'][-1]['job_id']}")
        else:
            print("nothing to resubmit: every shard has finished or is still queued")
    else:
        if not args.command:
            sp.error("name the job: convert, run or measure")
        if not args.slurm:
            sp.error("say where: --slurm")
        if any(a == "--shard" or a.startswith("--shard=") for a in job_argv):
            sp.error("submit gives each task its --shard; use --shards N")
        job = build_parser().parse_args([args.command, *job_argv])  # the job's own errors, now, not in N tasks
        out = job.store if args.command == "convert" else job.out
        r = slurm.submit_job(args.command, job_argv, out, job.store, args.shards or 4, _resources(args),
                             src=getattr(job, "src", None), key_file=getattr(job, "key_file", None),
                             force=getattr(job, "force", False))
        print(f"submitted {r['shards']} shards as SLURM job {r['jobs'][0]['job_id']} ({r['script']}); "
              f"kneebatch status {out}")
    if args.wait:
        slurm.wait(out)
        try:
            print(merge_shards(out))
        except ValueError as e:
            print(f"kneebatch submit: {e}", file=sys.stderr)
            print(f"logs: {Path(out) / 'slurm'}; kneebatch status {out}; kneebatch submit --resubmit {out}",
                  file=sys.stderr)
            return 1
    return 0


def cmd_status(args) -> int:
    from kneebatch.jobs.status import job_status, print_status

    print_status(job_status(args.out))
    return 0


def cmd_export(args) -> int:
    from kneebatch.export import export_nifti

    n, missing, used = export_nifti(args.store, args.out, name=args.label_name, model=args.model, names=args.names,
                                    images=args.images, show_progress=not args.quiet, format=args.format,
                                    per_study=_run_label_maps(args))
    what = "DICOM SEG objects" if args.format == "seg" else "label maps"
    print(f"wrote {n} {what} ({', '.join(used) or 'none'}){' and their images' if args.images else ''} to "
          f"{args.out} in each source's voxel order ({len(missing)} studies have none), "
          f"with ITK-SNAP and 3D Slicer colour tables")
    return 0


def cmd_evaluate(args) -> int:
    from kneebatch.evaluate import evaluate
    from kneebatch.label_sets import parse_label_map

    summary = evaluate(args.pred, args.truth, args.out, parse_label_map(args.label_map) if args.label_map else None,
                       parse_label_map(args.truth_label_map) if args.truth_label_map else None,
                       show_progress=not args.quiet)
    if not summary["cases"]:
        raise ValueError(f"no prediction in {args.pred} has a reference file in {args.truth} of the same name: name "
                         "both alike (kneebatch export --names uid for truth named by StudyInstanceUID), or give the "
                         "run's OUT, whose store knows each study's names")
    print(f"{summary['cases']} studies scored ({len(summary['without_truth'])} without a reference file); "
          f"mean Dice {summary['mean_dice'] if summary['mean_dice'] is not None else float('nan'):.3f}")
    for name, t in summary["tissues"].items():
        hd = f"{t['median_hd95_mm']:.2f} mm" if t["median_hd95_mm"] is not None else "-"
        vol = f"{t['median_abs_volume_error_pct']:.1f} %" if t["median_abs_volume_error_pct"] is not None else "-"
        print(f"  {name:26s} Dice {t['mean_dice']:.3f}  HD95 {hd:>9s}  |volume error| {vol:>7s}  ({t['cases']} studies)")
    print(f"-> {Path(args.out) / 'evaluation.parquet'}, {Path(args.out) / 'summary.json'}")
    return 0


def cmd_export_engines(args) -> int:
    from kneebatch.training.publish import publish

    note = {"commands": args.commands, "data": args.data, "machine": args.machine}
    manifest = publish(args.train_dir, args.engines, {k: v for k, v in note.items() if v})
    print(f"engines in {args.engines}: " + ", ".join(f"{s} val {manifest[s]['val_score']:.3f}" for s in ("coarse", "fine")))
    return 0


def cmd_train(args) -> int:
    from kneebatch.training.train import check_training_device, train, training_labels

    check_training_device(args.device)  # before any label is imported
    label_set, args.label_name, imported = training_labels(args.store, args.label_map, args.labels_from,
                                                           args.label_name)
    if imported is not None:
        n, missing = imported
        print(f"imported {n} label maps into the store as '{args.label_name}' ({len(missing)} studies without one)")
    if label_set is not None:
        print(f"partial labels ({label_set.name}): {', '.join(label_set.class_names()[1:])}; every other tissue is "
              f"kept as the initial weights know it (marginal loss)")
    metrics = train(args.store, args.out, minutes_coarse=args.minutes_coarse, minutes_fine=args.minutes_fine,
                    threads=args.threads, seed=args.seed, label_name=args.label_name, init_from=args.init,
                    lr=args.lr, label_set=label_set, device=args.device, batch_size=args.batch_size)
    print(f"test mean Dice {metrics['test_mean_dice']:.3f}; weights, metrics and curves in {args.out}")
    return 0


def cmd_train_synthetic(args) -> int:
    from kneebatch.synth.cohort import PRESETS
    from kneebatch.training.domain import train_domain
    from kneebatch.training.synthesis import cached_volumes
    from kneebatch.training.train import check_training_device

    check_training_device(args.device)  # before the label volumes are drawn
    if args.protocol:
        return _train_protocol(args)

    volumes = cached_volumes(args.volumes or args.out / "volumes", args.volume_seed, args.n, PRESETS[args.preset],
                             workers=args.workers or 1)
    metrics = train_domain(volumes, args.out, args.minutes_coarse, args.minutes_fine, threads=args.threads,
                           seed=args.seed, init_from=args.init, lr=args.lr, p_random=args.p_random,
                           device=args.device, batch_size=args.batch_size)
    print(f"test mean Dice {metrics['test_mean_dice']:.3f} (per contrast in metrics.json); weights, metrics and "
          f"curves in {args.out}")
    return 0


def _train_protocol(args) -> int:
    from kneebatch.models.engine_sets import spec_for
    from kneebatch.training.protocol import train_protocol

    spec = spec_for(args.protocol)
    metrics = train_protocol(spec, args.out, n=args.n, seed=args.seed, volume_seed=args.volume_seed,
                             init_from=args.init, minutes_coarse=args.minutes_coarse,
                             minutes_fine=args.minutes_fine, lr=args.lr, threads=args.threads, workers=args.workers or 1,
                             device=args.device, batch_size=args.batch_size)
    print(f"engine set {spec.name}: test mean Dice {metrics['test_mean_dice']:.3f}; weights, metrics and curves in "
          f"{args.out} (kneebatch export-engines {args.out} ENGINES/{spec.name})")
    return 0


def cmd_clinical(args) -> int:
    from kneebatch.clinical import pseudonymise_clinical

    r = pseudonymise_clinical(args.store, args.csv, args.out, key_file=args.key_file, study_column=args.study_column,
                              subject_column=args.subject_column, drop=tuple(args.drop or ()),
                              keep=tuple(args.keep or ()))
    keys = " and ".join(f"{c} -> {k}" for c, k in ((r.study_column, "study_key"), (r.subject_column, "subject_key")) if c)
    dropped = ", ".join(f"{c} ({r.dropped_why[c]})" for c in r.dropped)
    kept = ", ".join(f"{c} (--keep: {', '.join(r.kept_despite[c])})" if c in r.kept_despite else c for c in r.kept)
    print(f"{r.rows} rows -> {args.out}: {keys}; dropped {dropped}; kept {kept or 'nothing'}")
    if r.study_column:
        print(f"{r.studies_in_store} rows name a study in the store, {r.studies_not_in_store} do not")
    return 0


def _columns(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def cmd_stats(args) -> int:
    from kneebatch import stats
    from kneebatch.findings import StatsSettings, run_stats

    settings = StatsSettings(by=args.by, reference=args.reference, measures=args.measures, adjust=args.adjust,
                             trend=args.trend, longitudinal=args.longitudinal, plots=not args.no_plots)
    result = run_stats(args.out, args.clinical, args.dest, settings)
    comparison = result["comparison"]
    shown = comparison.sort_values("mannwhitney_p").head(args.top)
    cols = ["measure", "group", "reference_median", "group_median", "hl_shift", "cliffs_delta", "mannwhitney_p",
            "mannwhitney_p_holm", "welch_p"]
    visits = f" (each subject's first of {result['studies']} studies)" if result["studies_compared"] < result["studies"] else ""
    print(f"{result['studies_compared']} studies{visits}, {result['measures']} measurements by {args.by}; "
          f"the {len(shown)} smallest Mann-Whitney p:")
    print(stats.markdown(shown[cols]))
    if result["not_segmented"]:
        print(f"not segmented by the labels' model, so not compared (null, not zero): "
              f"{', '.join(result['not_segmented'])}")
    print(f"tables and figures: {result['dest']}")
    return 0


def cmd_mesh(args) -> int:
    from kneebatch.mesh import mesh_study

    per_study = _run_label_maps(args)
    label_name = args.label_name
    if per_study is not None:
        if args.study_key not in per_study:
            raise ValueError(f"--run {args.run}: study {args.study_key} has no row there")
        label_name = per_study[args.study_key]
    r = mesh_study(args.store, args.study_key, args.out, label_name=label_name, step=args.step,
                   smooth=args.smooth, tissues=args.tissues)
    print(f"{len(r['tissues'])} tissues ({r['faces']:,} triangles, from {r['label_name']}) -> {r['glb']}, {r['png']}")
    return 0


def cmd_report(args) -> int:
    from kneebatch.report import build_report

    path = build_report(args.out, args.output, store=args.store, clinical=args.clinical, by=args.by,
                        reference=args.reference, meshes=args.meshes, study_pages=args.studies, trend=args.trend,
                        outline=args.outline)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained: open it in any browser)")
    return 0


def cmd_qc(args) -> int:
    from kneebatch.plots import qc_images

    n, missing, drawn = qc_images(args.store, args.out, args.label_name, show_progress=not args.quiet,
                                  per_study=_run_label_maps(args), outline=args.outline)
    print("label maps: " + ("; ".join(f"{title} for {k} studies" for title, k in drawn.items()) or "none"))
    print(f"wrote {n} QC images (sagittal, coronal, axial slices with the labels, and thickness maps) to {args.out}; "
          f"{len(missing)} studies have no label map")
    return 0


def cmd_demo(args) -> int:
    from kneebatch.demo import run_demo

    return run_demo(Path(args.out), n=args.n, seed=args.seed, preset=args.preset, workers=args.workers,
                    show_progress=not args.quiet, truth=args.truth, backend=args.backend)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage itself is one ``--help`` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kneebatch",
        description="Batch segmentation and measurement of knee MRI cohorts. "
                    "Typical flow: synth (or your DICOM) -> convert -> measure; 'demo' runs it all.",
    )
    p.add_argument("--version", action="version", version=f"kneebatch {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def _clustered(sp) -> None:
    sp.add_argument("--cluster", default="local", choices=["local", "slurm"],
                    help="local: worker processes on this machine (default); slurm: SLURM jobs as Dask workers "
                         "(dask-jobqueue; up to --workers jobs, adaptive; see the SLURM options)")
    slurm_options(sp)


def _sharded(sp) -> None:
    sp.add_argument("--shard", type=_shard, default=_shard("0/1"), metavar="i/N",
                    help="do only shard i of N (0 <= i < N): a stable share of the studies, so N processes "
                         "(a SLURM array) can share one store and one OUT; then 'kneebatch merge OUT'")


def _common(sp, workers=True) -> None:
    if workers:
        sp.add_argument("--workers", type=_whole(0), default=None,
                        help="parallel worker processes (default: one per core, at most 8; 1 = in-process)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_engines(sub) -> None:
    s = sub.add_parser("engines", help="the engine sets: which series each segments, its status and accuracy")
    esub = s.add_subparsers(dest="engines_command", required=True)
    e = esub.add_parser("list", help="every engine set, in order of preference: the series it takes, ready or "
                                     "preview (shipped below its accuracy targets), mean Dice on held-out studies")
    e.add_argument("--engines", default=None, help="a folder of engine sets or one set's folder (default: the shipped)")
    e.add_argument("--json", action="store_true", help="as JSON")
    e.set_defaults(func=cmd_engines_list)


def _add_models(sub) -> None:
    s = sub.add_parser("models", help="other tools' models (nnU-Net v2 folders, ONNX networks) recorded by name, for "
                                      "run --model NAME")
    msub = s.add_subparsers(dest="models_command", required=True)
    a = msub.add_parser("add", help="record a model folder once: its kind, file hashes, inputs, labels, axis order "
                                    "(read in place, never copied; a run by name checks the files first)")
    a.add_argument("path", type=Path, help="the trained model folder (nnU-Net: dataset.json, plans.json, fold_N/...; "
                                           "ONNX: model.onnx and model.json)")
    a.add_argument("--name", required=True, help="what run --model calls it")
    a.add_argument("--channels", default=None, metavar="0:ROLE,...", help="store role of each input channel, where "
                                                                          "dataset.json's channel_names do not say")
    a.add_argument("--label-map", default=None, metavar="ID:LABEL,...", help="its label ids as kneebatch labels")
    a.add_argument("--axis-order", default="store", metavar="store|CODE", help="the voxel order it was trained in")
    a.add_argument("--replace", action="store_true", help="record it again under a name already taken")
    a.set_defaults(func=cmd_models_add)
    ls = msub.add_parser("list", help="the recorded models")
    ls.add_argument("--json", action="store_true", help="as JSON")
    ls.set_defaults(func=cmd_models_list)


def _add_labels(sub) -> None:
    s = sub.add_parser("labels", help="print the label schema")
    s.add_argument("--json", action="store_true", help='as JSON: [{"id", "name", "group", "color"}, ...]')
    s.set_defaults(func=cmd_labels)


def _add_columns(sub) -> None:
    s = sub.add_parser("columns", help="every column of measurements.parquet: type, unit, meaning")
    s.add_argument("--markdown", action="store_true", help="as the Markdown table of docs/columns.md")
    s.set_defaults(func=cmd_columns)


def _add_synth(sub) -> None:
    s = sub.add_parser("synth", help="write a synthetic knee MRI cohort (DICOM, truth labels, clinical.csv)")
    s.add_argument("out", type=Path, help="output folder")
    s.add_argument("--n", type=_positive, default=24, help="number of studies (alternating normal / OA; default 24)")
    s.add_argument("--seed", type=int, default=0, help="random seed; study i is the same for any --n")
    s.add_argument("--preset", default="clinical", choices=["clinical", "small", "oai", "skmtea"],
                   help="acquisition geometry. clinical: realistic matrices and slices; small: ~1 mm in-plane, "
                        "quick (tests); oai / skmtea: those cohorts' geometry, and their series unless --protocol "
                        "says otherwise (e.g. --preset skmtea --protocol pdfs: a PD-FS at 0.31 mm)")
    s.add_argument("--protocol", default=None,
                   metavar="{clinical,oai,skmtea,pdfs,t2fs,stir,mixed}",
                   help="the series of each study. clinical (default): sagittal T1 TSE + T2 TSE FS (grey-value "
                        "tables the shipped engines know); the others with contrasts from tissue physics: oai: 3-D "
                        "DESS-WE (0.7 mm) + 2-D IW-TSE-FS (3 mm); skmtea: GE qDESS (0.31 x 0.31 x 0.8 mm); pdfs / "
                        "t2fs / stir: that one series; mixed: one of clinical, oai, skmtea, pdfs, t2fs per study")
    s.add_argument("--anatomy", default=None, metavar="{typical,varied,extreme}",
                   help="how much the knees vary. typical (default): size, cartilage, OA changes, effusion; varied: "
                        "also flexion 0-30 deg, varus/valgus, patella height and tilt, condyle and plateau shape, "
                        "meniscal extrusion and tears, Baker's cysts, habitus, field of view; extreme: every knee at "
                        "those ranges' ends (flexed, valgus, patella alta, large effusion, KL 4)")
    s.add_argument("--visits", type=_months, default=[0], metavar="MONTHS",
                   help="scan each subject at these months after baseline, e.g. 0,12,24,48 (the OAI's schedule): "
                        "OA knees lose 5 %% of their cartilage thickness and gain 20 %% effusion a year, normal "
                        "knees stay (default 0: one study per subject)")
    _common(s)
    s.set_defaults(func=cmd_synth)


def _add_convert(sub) -> None:
    s = sub.add_parser("convert", help="DICOM tree or NIfTI files -> Zarr cohort store (resumable)")
    s.add_argument("src", type=Path, help="folder with DICOM files (any layout) and/or <case>_<ROLE>.nii.gz / .mhd "
                                          "volume files (ROLE: T1, T2, T2FS, PD, PDFS, DESS, GRE3D, other)")
    s.add_argument("--channels", default="",
                   help='nnU-Net style <case>_0000.nii.gz files: suffix -> role, e.g. "0000:DESS,0001:PDFS" '
                        '(default "0000:T1,0001:T2")')
    s.add_argument("store", type=Path, help="cohort store folder (created if missing)")
    s.add_argument("--key-file", type=Path, default=None,
                   help="secret key for pseudonymous study keys (default $KNEEBATCH_KEY_FILE or "
                        "~/.config/kneebatch/study.key, created if missing); keep it outside shared outputs")
    _sharded(s)
    _clustered(s)
    _common(s)
    s.set_defaults(func=cmd_convert)


def _add_measure(sub) -> None:
    s = sub.add_parser("measure", help="volumes, cartilage thickness, intensities and QC flags -> Parquet")
    s.add_argument("store", type=Path, help="cohort store")
    s.add_argument("out", type=Path, help="output folder for measurements.parquet and failures.parquet")
    s.add_argument("--labels", type=Path, default=None,
                   help="folder of label maps named <study_key>_labels.nii.gz (as 'export' writes them) or "
                        "<StudyInstanceUID or case>.nii.gz/.mhd, on any grid covering the study "
                        "(default: the label maps in the store)")
    s.add_argument("--label-map", default="",
                   help='translate foreign label ids of --labels files, e.g. "1:femur,2:femoral_cartilage,3:background" '
                        "(every id of the files must be listed; ids that are not, or outside the schema without a "
                        "map, make that study an unknown_label_ids failure row)")
    s.add_argument("--model", default=None,
                   help="measure the segmentation of these engines (a model hash prefix; default: the newest)")
    s.add_argument("--label-name", default=None, help="measure another label map of the store, e.g. truth")
    s.add_argument("--run", type=Path, default=None, metavar="OUT",
                   help="each study's label map as the run into OUT wrote it (its engine set's), not the newest")
    s.add_argument("--force", action="store_true",
                   help="OUT was made with other settings: start it clean (only kneebatch's files go)")
    _sharded(s)
    _clustered(s)
    _common(s)
    s.set_defaults(func=cmd_measure)


def _add_run(sub) -> None:
    s = sub.add_parser("run", help="segment (coarse-to-fine U-Nets) and measure every study of a store (resumable)")
    s.add_argument("store", type=Path, help="cohort store")
    s.add_argument("out", type=Path, help="output folder: measurements.parquet, failures.parquet, provenance.json")
    s.add_argument("--engines", default=None, metavar="SET|DIR",
                   help="force one engine set (a shipped set's name, e.g. dess-pdfs, or a set's folder), or a folder "
                        "of sets; default: the shipped sets, each study getting the one whose series it has "
                        "(kneebatch engines list)")
    s.add_argument("--backend", default=None, choices=["onnxruntime", "torch", "torch-compile", "tensorrt"],
                   help="inference backend (default: onnxruntime on a CPU; torch-compile with --half on a GPU). "
                        "torch-compile pads crops to a few static sizes and compiles each once per worker (~20 s "
                        "each on a CPU), then runs 1.15-1.3x ONNX Runtime's speed: worth it for large cohorts. "
                        "With an nnU-Net --model: torch (default) is nnU-Net's own predictor, its labels exactly; "
                        "onnxruntime or torch-compile run its network on batches of tiles (--net-batch per call, "
                        "default 8): equal but for near-ties, and faster (docs/models.md)")
    s.add_argument("--device", default=None, choices=["cpu", "cuda"], help="torch device for the pipeline (default cpu)")
    s.add_argument("--gpus", default=None, metavar="all|N",
                   help="a dask-cuda cluster: one worker per GPU of this node (all, or the first N visible), engines "
                        "loaded once per worker on its GPU; implies --device cuda (pip install 'kneebatch[gpu]')")
    s.add_argument("--half", "--fp16", dest="fp16", action="store_true",
                   help="half precision engines: float16 on a GPU (torch backends, TensorRT), bfloat16 on the "
                        "CPU (torch backends; fast on CPUs with AMX or AVX-512 BF16); ONNX Runtime stays float32")
    s.add_argument("--tta", action="store_true",
                   help="mirror test-time augmentation: the fine net also sees each crop mirrored left-right and "
                        "the logits are averaged (as nnU-Net does; more accurate, twice the fine net's time)")
    s.add_argument("--batch-size", type=_positive, default=4,
                   help="studies per task, at most (default 4; fewer when the cohort is small, so that every "
                        "worker gets an even share)")
    s.add_argument("--net-batch", type=_positive, default=None, metavar="N",
                   help="same-shape inputs per engine call: studies go through the engines N at a time and their "
                        "coarse volumes, fine crops of one size, mirror copies (--tta) share calls (default: 1 on the "
                        "CPU, 4 on a GPU; at most --batch-size studies at a time)")
    s.add_argument("--force", action="store_true",
                   help="OUT was made with other engines or settings: start it clean (only kneebatch's files go)")
    s.add_argument("--threads", type=_positive, default=None, help="CPU threads per worker for the engines")
    s.add_argument("--allow-low-accuracy", action="store_true",
                   help="run engines whose recorded validation Dice is below 0.5 (refused otherwise)")
    s.add_argument("--model", default=None, metavar="DIR|NAME",
                   help="segment with another tool's trained model instead of kneebatch's engines (a folder, or a "
                        "name recorded by 'kneebatch models add'): an nnU-Net v2 "
                        "model folder (dataset.json, plans.json, fold_N/checkpoint_final.pth), run through nnU-Net's "
                        "own code in each worker, labels equal to nnUNetv2_predict's (add --tta for its default "
                        "mirroring; a cascade's second stage brings its first); a MONAI bundle (configs/, models/model.pt), "
                        "run by its own evaluator; or an ONNX network with model.json. pip install "
                        "'kneebatch[nnunet]' or 'kneebatch[bundle]' (docs/models.md)")
    s.add_argument("--channels", default=None, metavar="0:ROLE,...",
                   help="--model: the store role of each input channel, where dataset.json's channel_names do not "
                        "name one (e.g. 0:DESS)")
    s.add_argument("--label-map", default=None, metavar="ID:LABEL,...",
                   help="--model: its label ids as kneebatch labels, where dataset.json's names are not the schema's "
                        "or a known tool's (ID:background drops one)")
    s.add_argument("--axis-order", default="store", metavar="store|CODE",
                   help="--model: the voxel order it was trained in. nnU-Net reads only axis order and spacing: "
                        "'store' (default) is kneebatch's (z right, y inferior, x posterior); a NIfTI orientation "
                        "code such as RAS (nibabel's as_closest_canonical; a TotalSegmentator task does it itself) "
                        "or the code of your training NIfTIs (nibabel.aff2axcodes) turns each study to it exactly and back "
                        "(docs/models.md: check one study first)")
    _sharded(s)
    _clustered(s)
    _common(s)
    s.set_defaults(func=cmd_run)


def _add_merge(sub) -> None:
    s = sub.add_parser("merge", help="gather the shards of a convert, run or measure (--shard i/N)")
    s.add_argument("out", type=Path, help="the job's output folder (a store, for convert)")
    s.set_defaults(func=cmd_merge)


def _add_submit(sub) -> None:
    sub.add_parser("submit", help="a convert, run or measure as a SLURM array (kneebatch submit --help)",
                   add_help=False)


def _add_status(sub) -> None:
    s = sub.add_parser("status", help="a job's shards: finished, running, failed, missing; studies and studies/s")
    s.add_argument("out", type=Path, help="the job's output folder")
    s.set_defaults(func=cmd_status)


def _add_clinical(sub) -> None:
    s = sub.add_parser("clinical", help="a clinical CSV with its identifiers replaced by the store's study and "
                                        "subject keys -> Parquet (join it with kneebatch stats)")
    s.add_argument("store", type=Path, help="cohort store the studies were converted into")
    s.add_argument("csv", type=Path, help="clinical table (CSV with a header row)")
    s.add_argument("out", type=Path, help="the pseudonymous table to write (.parquet)")
    s.add_argument("--key-file", type=Path, default=None,
                   help="the study-key secret the store was converted with (default: convert's default)")
    s.add_argument("--study-column", default=None, help="StudyInstanceUID column (default: found by name)")
    s.add_argument("--subject-column", default=None, help="PatientID column (default: found by name)")
    s.add_argument("--drop", type=_columns, action="extend", metavar="COL",
                   help="a column to leave out (repeatable, or comma-separated)")
    s.add_argument("--keep", type=_columns, action="extend", metavar="COL",
                   help="a column to keep although its name looks identifying or its values only have an "
                        "identifier's shape (a date, e-mail, phone number, UID, long number); a column holding a "
                        "known identifier (a value of the study or subject column, the store's UIDs and IDs) is "
                        "refused all the same (repeatable, or comma-separated)")
    s.set_defaults(func=cmd_clinical)


def _add_stats(sub) -> None:
    s = sub.add_parser("stats", help="compare measurements between groups, along a grade and over time "
                                     "(tables + figures)")
    s.add_argument("out", type=Path, help="output folder of kneebatch run or measure")
    s.add_argument("--clinical", type=Path, default=None, help="table from kneebatch clinical (Parquet)")
    s.add_argument("--by", default="group", help="column to group by (default group), e.g. kl_grade, sex")
    s.add_argument("--reference", default=None, help="the group the others are compared with (default normal, "
                                                     "else the first in order)")
    s.add_argument("--measures", type=_columns, default=None,
                   help="measurement columns, comma-separated (default: every volume in mL and mean thickness)")
    s.add_argument("--adjust", type=_columns, default=[],
                   help="covariates of a linear model per measurement, e.g. age,sex (statsmodels OLS)")
    s.add_argument("--trend", default=None, help="an ordinal column (e.g. kl_grade): Spearman and slope per step")
    s.add_argument("--longitudinal", action="store_true",
                   help="change per year per subject (needs several visits) and between groups, with a mixed model")
    s.add_argument("--dest", type=Path, default=None, help="folder for tables and figures (default OUT/stats)")
    s.add_argument("--top", type=int, default=10, help="rows of the summary printed (default 10)")
    s.add_argument("--no-plots", action="store_true", help="tables only")
    s.set_defaults(func=cmd_stats)


def _add_mesh(sub) -> None:
    s = sub.add_parser("mesh", help="3-D reconstruction of a study: a surface per tissue in patient mm -> GLB + PNG")
    s.add_argument("store", type=Path, help="cohort store")
    s.add_argument("study_key", help="the study's key (a row of measurements.parquet)")
    s.add_argument("out", type=Path, help="output folder: <key>.glb (glTF binary, opens in any 3-D viewer) and <key>.png")
    s.add_argument("--label-name", default=None, help="which label map (default the newest segmentation), e.g. truth")
    s.add_argument("--run", type=Path, default=None, metavar="OUT",
                   help="the study's label map as the run into OUT wrote it (its engine set's), not the newest")
    s.add_argument("--tissues", type=_columns, default=None, help="only these labels, comma-separated (kneebatch labels)")
    s.add_argument("--step", type=_positive, default=1, help="marching-cubes step in voxels (2: ~4x fewer triangles, "
                                                             "thin tissues lose volume)")
    s.add_argument("--smooth", type=int, default=10, help="Taubin smoothing iterations (0: the raw voxel surface)")
    s.set_defaults(func=cmd_mesh)


def _add_qc(sub) -> None:
    s = sub.add_parser("qc", help="PNGs per study: orthogonal slices through the knee with the label overlay, "
                                  "and the cartilage thickness maps with the OA subregions")
    s.add_argument("store", type=Path, help="cohort store")
    s.add_argument("out", type=Path, help="output folder: <key>.png (slices), <key>_thickness.png (maps)")
    s.add_argument("--label-name", default=None, help="which label map (default each study's newest segmentation)")
    s.add_argument("--run", type=Path, default=None, metavar="OUT",
                   help="each study's label map as the run into OUT wrote it (its engine set's), not the newest")
    _outline(s)
    _common(s, workers=False)
    s.set_defaults(func=cmd_qc)


def _outline(s) -> None:
    s.add_argument("--outline", action="store_true",
                   help="draw each tissue's outline on the slices instead of a 40 %% transparent fill")


def _add_report(sub) -> None:
    s = sub.add_parser("report", help="one self-contained HTML file: tables, figures, QC, per-study slices and 3-D views")
    s.add_argument("out", type=Path, help="output folder of kneebatch run or measure")
    s.add_argument("--output", type=Path, default=None, help="the HTML file to write (default OUT/report.html)")
    s.add_argument("--store", type=Path, default=None, help="the cohort store (default: the one OUT was made from)")
    s.add_argument("--clinical", type=Path, default=None, help="table from kneebatch clinical: adds group tables")
    s.add_argument("--by", default=None, help="column to group by (default group, where the clinical table has one)")
    s.add_argument("--reference", default=None, help="the reference group (default normal)")
    s.add_argument("--trend", default=None, help="an ordinal clinical column (e.g. kl_grade): each measurement's "
                                                 "Spearman rho and slope per step, with a figure")
    s.add_argument("--meshes", type=int, default=3, help="studies with an interactive 3-D view (default 3; each adds "
                                                         "0.3-3 MB, by image size)")
    s.add_argument("--studies", type=int, default=200, help="studies with a section of their own (default 200; "
                                                            "flagged and outlying studies always)")
    _outline(s)
    s.set_defaults(func=cmd_report)


def _add_export(sub) -> None:
    s = sub.add_parser("export", help="label maps from the store as NIfTI (+ ITK-SNAP / Slicer colour tables)")
    s.add_argument("store", type=Path, help="cohort store")
    s.add_argument("out", type=Path, help="output folder: <name>_labels.nii.gz in each source's voxel order")
    s.add_argument("--format", default="nifti", choices=["nifti", "seg"],
                   help="nifti (default): <name>_labels.nii.gz; seg: <name>_seg.dcm, a DICOM SEG on the source series "
                        "(carries the source's patient and study identifiers, as a SEG must)")
    s.add_argument("--names", default="key", choices=["key", "uid"],
                   help="file names: the pseudonymous study key (default) or the StudyInstanceUID / case name "
                        "(identifiers: keep such exports private)")
    s.add_argument("--images", action="store_true",
                   help="also write each image channel as <name>_<ROLE>.nii.gz (convertible again)")
    s.add_argument("--model", default=None, help="the segmentation of these engines (model hash prefix; default newest)")
    s.add_argument("--label-name", default=None, help="another label map of the store, e.g. truth")
    s.add_argument("--run", type=Path, default=None, metavar="OUT",
                   help="each study's label map as the run into OUT wrote it (its engine set's), not the newest")
    _common(s, workers=False)
    s.set_defaults(func=cmd_export)


def _add_evaluate(sub) -> None:
    s = sub.add_parser("evaluate", help="score label maps against reference ones: Dice, HD95, volume error per "
                                        "study and tissue -> Parquet + summary")
    s.add_argument("pred", type=Path, help="a folder of label files (NIfTI / MetaImage, e.g. kneebatch export's or "
                                           "nnU-Net's) or a run / measure output folder")
    s.add_argument("truth", type=Path, help="a folder of reference label files, named by study key, "
                                            "StudyInstanceUID or case name (with or without _labels)")
    s.add_argument("out", type=Path, help="output folder: evaluation.parquet, summary.json")
    s.add_argument("--label-map", default="", help="the predictions' ids as schema labels, ID:LABEL,... "
                                                   "(another tool's label ids)")
    s.add_argument("--truth-label-map", default="", help="the references' ids as schema labels, ID:LABEL,...")
    _common(s, workers=False)
    s.set_defaults(func=cmd_evaluate)


def _add_export_engines(sub) -> None:
    s = sub.add_parser("export-engines", help="a training run -> engines folder (safetensors, ONNX, hashes)")
    s.add_argument("train_dir", type=Path, help="output folder of 'kneebatch train'")
    s.add_argument("engines", type=Path, help="engines folder to write")
    s.add_argument("--commands", nargs="*", default=[], help="the commands that made the data and the training run")
    s.add_argument("--data", default="", help="what the training data was (recorded in engines.json)")
    s.add_argument("--machine", default="", help="where it was trained")
    s.set_defaults(func=cmd_export_engines)


def _add_train(sub) -> None:
    s = sub.add_parser("train", help="coarse-to-fine training from a store with label maps (resumable)")
    s.add_argument("store", type=Path, help="cohort store whose studies carry label maps")
    s.add_argument("out", type=Path, help="output folder: weights (safetensors), config, metrics, log, curves")
    s.add_argument("--labels-from", type=Path, default=None,
                   help="first import label maps named <StudyInstanceUID or case>.nii.gz/.mhd from this folder; with "
                        "--label-map oai-zib / skm-tea also those data sets' layouts (segmentation_masks/<patient>"
                        ".segmentation_masks.mhd, segmentation_masks/dicom-track/MTR_<nnn>.nii.gz), matched by a "
                        "folder name of the study's source path")
    s.add_argument("--label-map", default="",
                   help='the files\' label ids as schema labels: "oai-zib", "skm-tea" or e.g. "1:femur,'
                        '2:femoral_cartilage,3:tibia,4:medial_tibial_cartilage+lateral_tibial_cartilage" (an id may '
                        'stand for several labels). A map that leaves labels out trains with a marginal loss so they '
                        'are not unlearnt (start from trained engines with --init)')
    s.add_argument("--label-name", default=None,
                   help="label array in the store to train on (default truth; a partial label set's name, e.g. "
                        "oai-zib, for its maps)")
    s.add_argument("--minutes-coarse", type=float, default=4.0, help="time budget of the coarse stage")
    s.add_argument("--minutes-fine", type=float, default=40.0, help="time budget of the fine stage")
    s.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    training_device(s)
    s.add_argument("--seed", type=int, default=0, help="split and sampling seed")
    s.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate (cosine schedule over each stage's budget); lower it when fine-tuning with --init")
    s.add_argument("--init", type=Path, default=None,
                   help="fine-tune: start both nets from the weights in this engines or training folder "
                        "(tensors whose names and shapes match)")
    s.set_defaults(func=cmd_train)


def _add_train_synthetic(sub) -> None:
    s = sub.add_parser("train-synthetic",
                       help="domain-randomised training on synthetic label volumes, images made on the fly (resumable)")
    s.add_argument("out", type=Path, help="output folder: weights (safetensors), config, metrics, log, curves")
    s.add_argument("--volumes", type=Path, default=None, help="label-volume cache (default OUT/volumes)")
    s.add_argument("--n", type=_positive, default=60, help="synthetic subjects (split 8:1:1; default 60)")
    s.add_argument("--volume-seed", type=int, default=1000, help="seed of the synthetic subjects (default 1000)")
    s.add_argument("--preset", default="train", choices=["train", "small", "clinical"],
                   help="acquisition ranges of the label volumes (default train: 0.5-0.85 mm in-plane)")
    s.add_argument("--protocol", default=None, metavar="SET",
                   help="train one engine set on its protocol's synthetic studies instead (t1-t2, dess-pdfs, dess, "
                        "pdfs, t2fs, or the synth protocol it segments: oai, skmtea, ...): studies are synthesised "
                        "(physics contrasts, field, noise, bias, resolution, varied anatomy), written as DICOM and "
                        "converted into OUT/data/store.zarr as a user's are, and the nets are fine-tuned from --init "
                        "(default the shipped engines), the first convolution adapted to the set's inputs")
    s.add_argument("--p-random", type=float, default=0.5,
                   help="share of images with random intensities per label; the rest get a physical contrast")
    s.add_argument("--minutes-coarse", type=float, default=3.0, help="time budget of the coarse stage")
    s.add_argument("--minutes-fine", type=float, default=120.0, help="time budget of the fine stage")
    s.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    s.add_argument("--workers", type=_positive, default=None, help="processes rendering the label volumes")
    training_device(s)
    s.add_argument("--seed", type=int, default=0, help="split, sampling and appearance seed")
    s.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule over each stage)")
    s.add_argument("--init", type=Path, default=None,
                   help="start from these engines' or training run's weights (a first convolution with more "
                        "input channels is summed over them)")
    s.set_defaults(func=cmd_train_synthetic)


def _add_demo(sub) -> None:
    s = sub.add_parser("demo", help="synthetic normal-vs-OA cohort end to end, with a group table")
    s.add_argument("--out", type=Path, default=Path("kneebatch-demo"), help="output folder (default ./kneebatch-demo)")
    s.add_argument("--n", type=_positive, default=24, help="number of studies (default 24)")
    s.add_argument("--seed", type=int, default=2024)
    s.add_argument("--preset", default="clinical", choices=["clinical", "small"])
    s.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    s.add_argument("--truth", action="store_true", help="measure the ground-truth labels instead of segmenting")
    _common(s)
    s.set_defaults(func=cmd_demo)


COMMANDS = (  # in --help's order
    _add_engines, _add_models, _add_labels, _add_columns, _add_synth, _add_convert, _add_measure, _add_run, _add_merge,
    _add_submit, _add_status, _add_clinical, _add_stats, _add_mesh, _add_qc, _add_report, _add_export,
    _add_evaluate, _add_export_engines, _add_train, _add_train_synthetic, _add_demo,
)


def _whole(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value
    return parse


_positive = _whole(1)


def _shard(text: str):
    from kneebatch.jobs.shards import Shard

    try:
        return Shard.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["submit"]:  # its own parser: the job's options pass through to the job
        try:
            return cmd_submit(argv[1:])
        except (FileNotFoundError, ValueError) as e:
            print(f"kneebatch submit: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, StudyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"kneebatch {args.command}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (| head): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the environment: a read-only or full OUT, a path that is a folder, ...
        where = f": {e.filename}" if e.filename else ""
        print(f"kneebatch {args.command}: error: {e.strerror or type(e).__name__}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nkneebatch {args.command}: interrupted — rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
