"""``kneebatch run``: segment and measure every study of a cohort store on a Dask cluster.

Tasks carry batches of study keys (:func:`kneebatch.jobs.segment.process_batch`);
workers hold the engines (loaded once per worker by
:class:`kneebatch.distributed.plugin.EngineLoader`). The job skeleton
(:mod:`kneebatch.jobs.job`) keeps a bounded number of batches in flight, saves each
finished batch at once as part files, so an interrupted run loses at most the batches
in flight and a re-run skips every study already saved, and gathers the parts into
``measurements.parquet`` and ``failures.parquet`` (convert failures carried over): every
study of the store is in exactly one of them.
"""

from __future__ import annotations

import json
import platform

from kneebatch.distributed.cluster import available_cores, worker_kind
from kneebatch.inference.engine_dir import InferenceOptions, set_status
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.job import Job, JobReport
from kneebatch.jobs.segment import STAGES, process_batch
from kneebatch.jobs.shards import Shard
from kneebatch.measure import measurement_schema


def run(store_path, out, options: InferenceOptions | None = None, client=None, batch_size: int = 4,
        show_progress=None, batch_fn=process_batch, force: bool = False, shard: Shard | None = None,
        **option_fields) -> JobReport:
    """Segment and measure every study of the store (of ``shard``: one of N processes sharing
    ``out``; ``kneebatch merge`` gathers them). A re-run into the same ``out`` resumes; one with
    other engines or settings is refused (``force``: start ``out`` clean). ``options`` (or its
    fields as keywords: ``engines_path``, ``backend``, ``device``, ``threads``, ``half``, ``tta``,
    ``net_batch``)
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
    kind = worker_kind(client)
    options.check(device_here=kind != "cuda")  # dask-cuda's workers check their GPU; the client never touches CUDA
    store = CohortStore(store_path, create=False)
    if kind in ("here", "local"):  # this machine's cores shared between its workers, no oversubscription;
        # remote workers (SLURM jobs) size themselves to their allocation (EngineLoader)
        options = options.with_cpu_threads(available_cores() // (len(client.nthreads()) if client else 1))
    sets = options.load_sets()  # each set loaded when a study first needs it
    # before anything is written: missing, changed or damaged engines stop here, in one line
    sets.verify(options.backend, options.allow_low_accuracy)
    job = Job("run", store, out, options.settings(sets), measurement_schema(), shard, force)
    batches = even_batches(job.todo, batch_size, len(client.nthreads()) if client else 1)
    kwargs = {"store_path": str(store.path)}
    if client is not None:
        from kneebatch.distributed.plugin import EngineLoader

        client.register_plugin(EngineLoader(options))
    else:
        kwargs["engines"] = sets
    job.report.stage_seconds = dict.fromkeys(STAGES, 0.0)
    job.map(batch_fn, batches, client, "run", "segmenting studies", show_progress, **kwargs)
    return job.finish(_provenance(options, sets, batch_size))


def even_batches(keys: list, batch_size: int, workers: int) -> list[list]:
    """Tasks of at most ``batch_size`` studies, and no more than an even share per worker, so
    that a small cohort keeps every worker busy: 6 studies on 2 workers are 3 + 3, not 4 + 2."""
    size = max(1, min(batch_size, -(-len(keys) // max(1, workers))))
    return [keys[i:i + size] for i in range(0, len(keys), size)]


def _provenance(options: InferenceOptions, sets, batch_size: int) -> dict:
    import onnxruntime
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    if options.model:
        return {"command": "run", **options.settings(sets), "threads": options.threads, "batch_size": batch_size,
                "versions": {**versions, **_dist_versions("nnunetv2", "monai")}}
    return {
        "command": "run",
        **options.settings(sets),
        "threads": options.threads,
        "batch_size": batch_size,
        "net_batch": options.effective_net_batch(),
        "engine_sets": {name: {"status": set_status(sets.manifests[name]),
                               "model_config": json.loads((folder / sets.manifests[name]["config"]).read_text())}
                        for name, folder in sets.folders.items()},
        "versions": versions,
    }


def _dist_versions(*names: str) -> dict:
    """The installed versions of these packages (an ONNX model's run has no nnunetv2 to ask)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
