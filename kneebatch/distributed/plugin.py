"""Per-worker engines: loaded once in ``WorkerPlugin.setup``, used by every task on that worker."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

ATTR = "kneebatch_engines"


class EngineLoader(WorkerPlugin):
    name = "kneebatch-engines"

    def __init__(self, options):
        self.options = options  # kneebatch.inference.engine_dir.InferenceOptions

    def setup(self, worker):
        import torch

        from kneebatch.distributed.cluster import available_cores

        options = self.options
        options.check()  # on this worker's own device (a dask-cuda worker sees only its GPU)
        options = options.with_cpu_threads(available_cores())  # a SLURM job's worker: its own allocation
        if options.threads:
            torch.set_num_threads(options.threads)
        setattr(worker, ATTR, options.load_sets())  # each set loaded on first use

    def teardown(self, worker):
        if hasattr(worker, ATTR):
            delattr(worker, ATTR)


def worker_engines():
    from distributed import get_worker

    return getattr(get_worker(), ATTR)
