"""Per-worker engines: loaded once in ``WorkerPlugin.setup``, used by every task on that worker."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

ATTR = "kneebatch_engines"


class EngineLoader(WorkerPlugin):
    name = "kneebatch-engines"

    def __init__(self, engines_path: str | None, backend: str, device: str = "cpu", threads: int | None = None,
                 half: bool = False, tta: bool = False):
        self.engines_path, self.backend, self.device = engines_path, backend, device
        self.threads, self.half, self.tta = threads, half, tta

    def setup(self, worker):
        import torch

        from kneebatch.inference.engine_dir import load_engines

        if self.threads:
            torch.set_num_threads(self.threads)
        setattr(worker, ATTR, load_engines(self.engines_path, self.backend, self.device, self.threads, self.half,
                                             self.tta))

    def teardown(self, worker):
        if hasattr(worker, ATTR):
            delattr(worker, ATTR)


def worker_engines():
    from distributed import get_worker

    return getattr(get_worker(), ATTR)
