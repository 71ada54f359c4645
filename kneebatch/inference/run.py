"""``kneebatch run``: segment and measure every study of a cohort store on a Dask cluster.

Tasks carry batches of study keys; workers hold the engines (loaded once per worker
by :class:`kneebatch.distributed.plugin.EngineLoader`). The job skeleton
(:mod:`kneebatch.jobs.job`) keeps a bounded number of batches in flight, saves each
finished batch at once as part files, so an interrupted run loses at most the batches
in flight and a re-run skips every study already saved, and gathers the parts into
``measurements.parquet`` and ``failures.parquet`` (convert failures carried over): every
study of the store is in exactly one of them.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import replace

import numpy as np

from kneebatch import __version__
from kneebatch.errors import failure_row
from kneebatch.inference.engine_dir import InferenceOptions, read_manifest
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.job import Job, JobReport
from kneebatch.jobs.shards import Shard
from kneebatch.measure import measure_study, measurement_schema

STAGES = ("read", "normalize", "coarse", "fine", "paste", "write", "measure")


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


def run(store_path, out, options: InferenceOptions | None = None, client=None, batch_size: int = 4,
        show_progress=None, batch_fn=process_batch, force: bool = False, shard: Shard | None = None,
        **option_fields) -> JobReport:
    """Segment and measure every study of the store (of ``shard``: one of N processes sharing
    ``out``; ``kneebatch merge`` gathers them). A re-run into the same ``out`` resumes; one with
    other engines or settings is refused (``force``: start ``out`` clean). ``options`` (or its
    fields as keywords: ``engines_path``, ``backend``, ``device``, ``threads``, ``half``, ``tta``)
    say how the engines run. ``batch_fn`` is for fault injection in tests."""
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
    job = Job("run", store, out, options.settings(), measurement_schema(), shard, force)
    batches = [job.todo[i:i + batch_size] for i in range(0, len(job.todo), batch_size)]
    local = client is None or type(getattr(client, "cluster", None)).__name__ == "LocalCluster"
    if options.threads is None and options.device == "cpu" and local:  # share this machine's cores between
        # workers, no oversubscription; explicit in every setting, as the thread count can change the last bits
        # of the logits. Remote workers (SLURM jobs) size themselves to their allocation.
        from kneebatch.distributed.cluster import available_cores

        n_workers = len(client.nthreads()) if client is not None else 1
        options = replace(options, threads=max(1, available_cores() // max(1, n_workers)))
    kwargs = {"store_path": str(store.path)}
    if client is not None:
        from kneebatch.distributed.plugin import EngineLoader

        client.register_plugin(EngineLoader(options))
    else:
        kwargs["engines"] = options.load()
    job.report.stage_seconds = dict.fromkeys(STAGES, 0.0)
    job.map(batch_fn, batches, client, "run", "segmenting studies", show_progress, **kwargs)
    return job.finish(_provenance(options, batch_size))


def _provenance(options: InferenceOptions, batch_size: int) -> dict:
    import onnxruntime
    import torch

    from kneebatch.inference.engine_dir import engines_dir

    manifest = read_manifest(options.engines)
    return {
        "command": "run",
        **options.settings(),
        "threads": options.threads,
        "batch_size": batch_size,
        "model_config": json.loads((engines_dir(options.engines) / manifest["config"]).read_text()),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }
