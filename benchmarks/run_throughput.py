"""Segmentation throughput: ``kneebatch run`` end to end against a per-study baseline.

    python benchmarks/run_throughput.py --n 8
    python benchmarks/run_throughput.py --n 32 --device cuda --fp16 --settings torch-compile:1 tensorrt:1

On the same studies, in one run:

* **baseline** — what one-study-at-a-time tools do: MONAI ``sliding_window_inference``
  with the same fine network over the whole full-resolution volume (torch eager,
  fp32, MONAI defaults: overlap 0.25, constant blending), per study, plus argmax;
* **kneebatch run** — coarse -> crop -> fine on the working grid -> paste, with label
  writing and all measurements, for each backend/worker setting given;
* **read ceiling** — reading the studies from the store and nothing else.

Each setting runs in its own process (peak RSS is its own); ``--repeat`` rounds of
(baseline, every setting) run interleaved and the medians are reported, every round's
figure beside them. Library imports happen before either clock starts; the run's
engine loading, label writing and table writing are inside its time. Writes
``benchmarks/results/run-<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import machine  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parent


def _peak_rss_mb() -> float:
    """Largest resident set of this process or any finished child (Dask workers), in MB."""
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024.0


def _baseline(store_path, engines, keys, device, q):
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from kneebatch.inference.engine_dir import load_engines
    from kneebatch.inference.segment import series_mean
    from kneebatch.ingest.store import CohortStore
    from kneebatch.models.preprocess import normalize

    t_load = time.perf_counter()
    eng = load_engines(engines, "torch", device=device)
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # CUDA's start-up with the loading: one-off, like the run's
    load_seconds = time.perf_counter() - t_load
    store = CohortStore(store_path, create=False)
    roi = tuple(eng.config.fine_patch)

    def whole_volume(v):  # one-channel engines: each series through the net, as run does
        return sliding_window_inference(v[None], roi, sw_batch_size=2, predictor=eng.fine.model)[0]

    t0 = time.perf_counter()
    for key in keys:
        image, _ = store.read_image(key, eng.config.input_channels(store.channels(key)))
        x = normalize(torch.from_numpy(image.astype(np.float32)).to(device))
        with torch.inference_mode():
            logits = series_mean(whole_volume, x, eng.config)
        logits.argmax(0).to(torch.uint8).cpu()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    q.put({"seconds": time.perf_counter() - t0, "one_off_seconds": load_seconds, "peak_rss_mb": _peak_rss_mb()})


def _setting(setting: str, half_everywhere: bool) -> tuple[str, int, bool, bool, int | None, bool]:
    """``BACKEND:WORKERS[:half][:tta][:batchN][:dask-cuda]`` -> backend, workers, half, tta, studies per
    engine call, and whether the workers are a dask-cuda cluster (WORKERS GPUs, as ``run --gpus``)."""
    backend, workers, *flags = setting.split(":")
    net_batch = next((int(f[5:]) for f in flags if f.startswith("batch")), None)
    return backend, int(workers), half_everywhere or "half" in flags, "tta" in flags, net_batch, "dask-cuda" in flags


def _kneebatch(store_path, engines, out, backend, workers, device, half, tta, net_batch, dask_cuda, q):
    import onnxruntime  # noqa: F401  library imports are process start-up, outside both timings
    import torch  # noqa: F401

    from kneebatch.distributed.cluster import dask_client
    from kneebatch.jobs.run import run

    t0 = time.perf_counter()  # a cluster's start is inside the time: a user's run pays it too
    if workers > 1 or dask_cuda:
        cluster = dict(kind="cuda", gpus=str(workers)) if dask_cuda else dict(kind="local", n_workers=workers)
        with dask_client(**cluster) as client:
            r = run(store_path, out, engines_path=engines, backend=backend, client=client, device=device, half=half,
                    tta=tta, net_batch=net_batch, show_progress=False)
    else:
        r = run(store_path, out, engines_path=engines, backend=backend, device=device, half=half, tta=tta,
                net_batch=net_batch, show_progress=False)
    q.put({"seconds": time.perf_counter() - t0, "segmented": r.segmented, "stage_seconds": r.stage_seconds,
           "peak_rss_mb": _peak_rss_mb()})


def _read(store_path, keys, q):
    from kneebatch.ingest.store import CohortStore

    store = CohortStore(store_path, create=False)
    t0 = time.perf_counter()
    for k in keys:
        store.read_image(k)
    q.put({"seconds": time.perf_counter() - t0})


def _guarded(fn, args, q):
    """A setting that fails is reported as such; the others' records still get written."""
    try:
        fn(*args, q)
    except BaseException as e:  # noqa: BLE001  the child's failure is the finding
        q.put({"error": f"{type(e).__name__}: {e}"})
        raise


def _in_process(fn, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_guarded, args=(fn, args, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main() -> None:
    from kneebatch.inference.engine_dir import DEFAULT_ENGINES, InferenceOptions
    from kneebatch.ingest.store import CohortStore
    from kneebatch.jobs.convert import convert
    from kneebatch.synth.cohort import generate_cohort

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--protocol", default="clinical",
                    help="synthetic protocol of the studies (clinical, oai, skmtea, pdfs, t2fs, mixed)")
    ap.add_argument("--seed", type=int, default=91)
    ap.add_argument("--engines", type=Path, default=DEFAULT_ENGINES)
    ap.add_argument("--settings", nargs="+", default=["onnxruntime:1", "onnxruntime:2", "torch:1"],
                    help="BACKEND:WORKERS[:half][:tta][:batchN] for kneebatch run (half: bfloat16 on the CPU, float16 "
                         "on a GPU; tta: mirror test-time augmentation; batchN: N studies per engine call)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (baseline and the torch backends)")
    ap.add_argument("--fp16", action="store_true", help="half precision for every setting (see BACKEND:WORKERS:half)")
    ap.add_argument("--synth-workers", type=int, default=2, help="processes synthesising the studies")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of (baseline, every setting), interleaved; medians are reported")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kneebatch-run-bench-"))
    try:
        generate_cohort(work / "cohort", args.n, seed=args.seed, workers=args.synth_workers, protocol=args.protocol)
        store = work / "store.zarr"
        convert(work / "cohort" / "dicom", store, key_file=work / "k.key", show_progress=False)
        s = CohortStore(store)
        keys = s.study_keys()
        shapes = [list(s.grid(k).shape) for k in keys]
        read = _in_process(_read, str(store), keys)
        # interleaved rounds, so that a slow spell of a shared machine hits every setting alike
        base_runs, runs = [], {setting: [] for setting in args.settings}
        for round_ in range(args.repeat):
            base_runs.append(_in_process(_baseline, str(store), str(args.engines), keys, args.device))
            for i, setting in enumerate(args.settings):
                backend, workers, half, tta, net_batch, dask_cuda = _setting(setting, args.fp16)
                out = work / f"out-{i}-{round_}"
                work_store = work / f"store-{i}-{round_}.zarr"
                shutil.copytree(store, work_store)
                runs[setting].append(_in_process(_kneebatch, str(work_store), str(args.engines), str(out), backend,
                                                 workers, args.device, half, tta, net_batch, dask_cuda))
                shutil.rmtree(work_store)
        base = sorted(base_runs, key=lambda r: r["seconds"])[len(base_runs) // 2]
        base_sps = len(keys) / base["seconds"]
        print(f"baseline: {base_sps:.3f} studies/s (median of {args.repeat}); "
              f"read ceiling {len(keys) / read['seconds']:.2f} studies/s")
        records = []
        for setting in args.settings:
            backend, workers, half, tta, net_batch, dask_cuda = _setting(setting, args.fp16)
            failed = [x["error"] for x in runs[setting] if "error" in x]
            if failed:
                print(f"{setting}: failed: {failed[0]}")
                continue
            r = sorted(runs[setting], key=lambda r: r["seconds"])[len(runs[setting]) // 2]
            sps = r["segmented"] / r["seconds"]
            # loading the engines (CUDA's start-up with it) and compiling: paid once per worker, so a
            # cohort of thousands sees the rate without them; the baseline's clock starts after its loading
            one_off = r["stage_seconds"].get("engines", 0.0) + r["stage_seconds"].get("compile", 0.0)
            sps_steady = r["segmented"] / max(r["seconds"] - one_off, 1e-9)
            record = {
                "device": machine.device(args.device),
                "date": date.today().isoformat(),
                "n_studies": len(keys),
                "protocol": args.protocol,
                "shape": shapes,
                "backend": backend,
                "workers": workers,
                "cluster": "dask-cuda" if dask_cuda else ("local" if workers > 1 else "none"),
                "precision": InferenceOptions(backend=backend, device=args.device, half=half).precision,
                "mirror_tta": tta,
                "net_batch": InferenceOptions(device=args.device, net_batch=net_batch).effective_net_batch(),
                "studies_per_s": round(sps, 4),
                "speedup_vs_baseline": round(sps / base_sps, 2),
                "one_off_seconds": round(one_off, 2),
                "studies_per_s_after_one_off": round(sps_steady, 4),
                "speedup_after_one_off": round(sps_steady / base_sps, 2),
                "baseline": {"name": f"MONAI sliding_window_inference, fine net, whole full-res volume, torch eager "
                                     f"fp32 on {args.device}, overlap 0.25, per study", "studies_per_s": round(base_sps, 4),
                             "peak_rss_mb": round(base["peak_rss_mb"]),
                             "one_off_seconds_outside_its_clock": round(base["one_off_seconds"], 2),
                             "rounds_studies_per_s": [round(len(keys) / b["seconds"], 4) for b in base_runs]},
                "rounds_studies_per_s": [round(x["segmented"] / x["seconds"], 4) for x in runs[setting]],
                # each round's run against the baseline just before it, under the same machine weather
                "speedup_per_round": [round(x["segmented"] / x["seconds"] / (len(keys) / b["seconds"]), 2)
                                      for x, b in zip(runs[setting], base_runs)],
                "read_ceiling_studies_per_s": round(len(keys) / read["seconds"], 2),
                "stage_seconds": {k: round(v, 2) for k, v in r["stage_seconds"].items()},
                "peak_rss_mb": round(r["peak_rss_mb"]),
            }
            print(json.dumps({k: record[k] for k in ("backend", "workers", "cluster", "precision", "mirror_tta", "net_batch",
                                                     "studies_per_s", "speedup_vs_baseline", "speedup_per_round",
                                                     "one_off_seconds", "speedup_after_one_off")}))
            records.append(record)
        machine.save_record(args.out, "run", records, "" if args.protocol == "clinical" else args.protocol)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
