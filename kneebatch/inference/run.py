"""``kneebatch run``: segment and measure every study of a cohort store on a Dask cluster.

Tasks carry batches of study keys; workers hold the engines (loaded once per worker
by :class:`kneebatch.distributed.plugin.EngineLoader`); the driver keeps a bounded
number of batches in flight and saves each finished batch at once as
``OUT/parts/<batch>.parquet`` (atomic), so an interrupted run loses at most the
batches in flight and a re-run skips every study already saved. At the end the parts
are gathered into ``measurements.parquet`` and ``failures.parquet`` (convert failures
carried over): every study of the store is in exactly one of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from kneebatch import __version__
from kneebatch.distributed.tasks import died_message, map_unordered, retry_alone
from kneebatch.errors import failure_row
from kneebatch.inference.engine_dir import InferenceOptions, read_manifest
from kneebatch.ingest.store import CohortStore
from kneebatch.measure import measure_study, measurement_schema
from kneebatch.outputs import FAILURE_SCHEMA, claim_output_dir, merge_rows, read_rows, write_rows, write_text_atomic
from kneebatch.progress import progress_bar

RUN_OUTPUTS = ("parts/part-*.parquet", "measurements.parquet", "failures.parquet", "provenance.json")
STAGES = ("read", "normalize", "coarse", "fine", "paste", "write", "measure")


@dataclass
class RunReport:
    studies: int = 0
    segmented: int = 0
    failed: int = 0
    already_done: int = 0
    carried_failures: int = 0
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)  # reason -> studies that failed with it in this run

    @property
    def studies_per_s(self) -> float:
        return self.segmented / self.seconds if self.seconds else 0.0


def process_batch(keys: list[str], store_path: str, engines=None) -> dict:
    """Segment, save and measure a batch of studies; never raises.

    Pasting, saving and measuring study *i* run on a second thread while the engines
    work on study *i+1*, so the engines' cores do not wait for that (mostly
    single-threaded) work; at most one study is being finished at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from kneebatch.inference.segment import SegmentInfo, fine_stage, paste

    if engines is None:
        from kneebatch.distributed.plugin import worker_engines

        engines = worker_engines()
    store = CohortStore(store_path, create=False)
    rows, failures = [], []
    seconds = dict.fromkeys(STAGES, 0.0)

    def fail(key, exc):
        failures.append(failure_row(key, "run", exc))

    def finish(key, result, info, image, grid, used):
        labels = paste(result, info)
        image = torch.from_numpy(image).to(labels.device)  # measured beside the labels
        t = time.perf_counter()
        store.write_labels(key, labels.cpu().numpy(), {"model_hash": engines.model_hash,
                                                       "kneebatch_version": __version__},
                           name=engines.label_name)
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        # sides_unresolved: medial/lateral labels as the net gave them
        flags = ["sides_unresolved"] if info.sides_found is False else []
        row = measure_study(key, labels, image, grid, store.channels(key), "segmentation", flags,
                            knee_side=store.study_attrs(key).get("knee_side"))
        row.update(model_hash=engines.model_hash, label_name=engines.label_name, label_grid="same_grid",
                   channels_used=used)
        return row, t_write, time.perf_counter() - t

    def collect(key, future, info):
        try:
            row, t_write, t_measure = future.result()
        except Exception as e:
            fail(key, e)
            return
        rows.append(row)
        seconds["paste"] += info.seconds["paste"]
        seconds["write"] += t_write
        seconds["measure"] += t_measure

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as finisher:
        pending = None
        for key in keys:
            try:
                t = time.perf_counter()
                channels = store.channels(key)
                inputs = engines.config.input_channels(channels)  # unsupported_contrast
                image, grid = store.read_image(key)
                image = image.astype(np.float32)
                seconds["read"] += time.perf_counter() - t
                info = SegmentInfo()
                result = fine_stage(image[inputs], grid, engines.coarse, engines.fine, engines.config, info)
                for k, v in info.seconds.items():
                    seconds[k] += v
            except Exception as e:
                fail(key, e)
                continue
            if pending is not None:
                collect(*pending)
            used = "+".join(channels[i] for i in inputs)
            pending = key, finisher.submit(finish, key, result, info, image, grid, used), info
        if pending is not None:
            collect(*pending)
    return {"keys": list(keys), "rows": rows, "failures": failures, "seconds": seconds}


def _part_name(keys) -> str:
    return "part-" + hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def _saved(parts: Path) -> tuple[list[dict], list[dict]]:
    rows, failures = [], []
    for p in sorted(parts.glob("part-*.parquet")):
        if p.name.endswith(".failures.parquet"):
            failures += read_rows(p)
        else:
            rows += read_rows(p)
    return rows, failures


def _split_or_record(keys, exc):
    """A batch that killed its worker: try its studies one by one, each alone at last
    (:func:`retry_alone`); a study that kills its worker even alone is poison."""
    if len(keys) > 1:
        return None, [[k] for k in keys]
    return retry_alone(keys, exc, lambda keys, exc: {
        "keys": list(keys), "rows": [], "seconds": {},
        "failures": [{"study_key": keys[0], "stage": "run", "reason": "worker_died", "message": died_message(exc)}]})


def run(store_path, out, options: InferenceOptions | None = None, client=None, batch_size: int = 4,
        show_progress=None, batch_fn=process_batch, force: bool = False, **option_fields) -> RunReport:
    """Segment and measure every study of the store. A re-run into the same ``out`` resumes;
    one with other engines or settings is refused (``force``: start ``out`` clean).
    ``options`` (or its fields as keywords: ``engines_path``, ``backend``, ``device``,
    ``threads``, ``half``, ``tta``) say how the engines run. ``batch_fn`` is for fault
    injection in tests."""
    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {batch_size}")
    if options is None:
        if "engines_path" in option_fields:
            option_fields["engines"] = option_fields.pop("engines_path")
        if option_fields.get("engines") is not None:
            option_fields["engines"] = str(option_fields["engines"])
        options = InferenceOptions(**option_fields)
    elif option_fields:
        raise TypeError("give run() either options or its fields, not both")
    options.check()
    store = CohortStore(store_path, create=False)
    # before anything is written: missing engines stop here
    settings = {**options.settings(), "store": str(store.path.resolve())}
    out = claim_output_dir(out, "run", settings, force, owned=RUN_OUTPUTS)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    keys = store.study_keys()
    saved_rows, saved_failures = _saved(parts)
    # failed studies are tried again on a re-run; finished ones are not
    done = {r["study_key"] for r in saved_rows}
    todo = [k for k in keys if k not in done]
    report = RunReport(studies=len(keys), already_done=len(keys) - len(todo))
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]

    engines = None
    n_workers = len(client.nthreads()) if client is not None else 1
    if options.threads is None and options.device == "cpu":  # share the cores between workers, no
        # oversubscription; explicit in every setting, as the thread count can change the last bits of the logits
        options = replace(options, threads=max(1, (os.cpu_count() or 1) // max(1, n_workers)))
    if client is not None:
        from kneebatch.distributed.plugin import EngineLoader

        client.register_plugin(EngineLoader(options))
    else:
        engines = options.load()
    stage_seconds = dict.fromkeys(STAGES, 0.0)
    schema = measurement_schema()
    with progress_bar(len(todo), "segmenting studies", show_progress) as advance:
        kwargs = {"store_path": str(store.path)} if client is not None else {"store_path": str(store.path),
                                                                             "engines": engines}
        for result in map_unordered(batch_fn, batches, client, on_error=_split_or_record, **kwargs):
            name = _part_name(result["keys"])
            write_rows(result["failures"], FAILURE_SCHEMA, parts / f"{name}.failures.parquet")
            write_rows(result["rows"], schema, parts / f"{name}.parquet")  # last: marks the batch saved
            for k, v in result["seconds"].items():
                stage_seconds[k] += v
            report.segmented += len(result["rows"])
            advance(len(result["keys"]))
    rows, failures = _saved(parts)
    rows = merge_rows([], rows)
    ok = {r["study_key"] for r in rows}
    failures = [f for f in merge_rows([], failures) if f["study_key"] not in ok]
    carried = [f for f in read_rows(store.failures_path) if f["study_key"] not in set(keys)]
    write_rows(rows, schema, out / "measurements.parquet")
    write_rows(merge_rows(carried, failures), FAILURE_SCHEMA, out / "failures.parquet")
    report.failed = len(failures)
    for f in failures:
        report.reasons[f["reason"]] = report.reasons.get(f["reason"], 0) + 1
    report.carried_failures = len(carried)
    report.seconds = time.perf_counter() - t0
    report.stage_seconds = stage_seconds
    _write_provenance(out, report, options, batch_size)
    return report


def _write_provenance(out: Path, report: RunReport, options: InferenceOptions, batch_size: int) -> None:
    import onnxruntime
    import pyarrow.parquet as pq
    import torch

    from kneebatch.inference.engine_dir import engines_dir
    from kneebatch.models.checkpoints import sha256_file

    manifest = read_manifest(options.engines)
    provenance = {
        "kneebatch_version": __version__,
        "command": "run",
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        **options.settings(),
        "threads": options.threads,
        "batch_size": batch_size,
        "model_config": json.loads((engines_dir(options.engines) / manifest["config"]).read_text()),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "studies": report.studies,
        "segmented_this_run": report.segmented,
        "failed": report.failed + report.carried_failures,
        "seconds": round(report.seconds, 2),
        "stage_seconds": {k: round(v, 2) for k, v in report.stage_seconds.items()},
        # the manifest: what a complete run wrote; a table not listed here is not final
        "outputs": {name: {"rows": pq.ParquetFile(out / name).metadata.num_rows,
                           "sha256": sha256_file(out / name)}
                    for name in ("measurements.parquet", "failures.parquet")},
        "parts": sorted(p.name for p in (out / "parts").glob("part-*.parquet")),
    }
    write_text_atomic(out / "provenance.json", json.dumps(provenance, indent=1))
