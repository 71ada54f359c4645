"""One factory for Dask clusters: local processes, a running scheduler's address, or SLURM jobs
(dask-jobqueue, adaptive).

Per-worker state belongs in a ``WorkerPlugin``; nothing here creates globals.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

# Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in workers; setting it turns off glibc's
# dynamic mmap threshold, so every large NumPy temporary becomes a fresh mmap and is
# page-faulted in again: measured 1.9x slower per study in convert. Unset it.
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                 # a task whose worker dies 3 times is handed back (KilledWorker) and split or recorded
                 "distributed.scheduler.allowed-failures": 2}


@dataclass
class Resources:
    """What each SLURM job of a cluster or an array asks for (None: the site's default)."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None  # e.g. 02:00:00
    mem: str | None = None  # e.g. 16G
    cpus_per_task: int | None = None
    gpus_per_task: int | None = None
    setup: str = ""  # shell lines run before kneebatch in every task

    def directives(self) -> list[str]:
        pairs = [("partition", self.partition), ("account", self.account), ("time", self.time), ("mem", self.mem),
                 ("cpus-per-task", self.cpus_per_task), ("gpus-per-task", self.gpus_per_task)]
        return [f"#SBATCH --{name}={value}" for name, value in pairs if value not in (None, "")]


def available_cores() -> int:
    """The cores this process may use: a SLURM task's allocation (``SLURM_CPUS_PER_TASK``) or
    the CPU affinity mask, not the whole node's count."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks on this OS
        return max(1, os.cpu_count() or 1)


def worker_kind(client) -> str:
    """Where a client's workers run: ``here`` (no client: this process), ``local`` (processes on this
    machine sharing its cores), ``cuda`` (dask-cuda: one per GPU) or ``remote`` (a scheduler's or
    SLURM's, each sized to its own allocation)."""
    if client is None:
        return "here"
    from distributed import LocalCluster

    cluster = getattr(client, "cluster", None)
    try:
        from dask_cuda import LocalCUDACluster

        if isinstance(cluster, LocalCUDACluster):  # a LocalCluster too: asked first
            return "cuda"
    except ImportError:
        pass
    return "local" if isinstance(cluster, LocalCluster) else "remote"


def default_workers() -> int:
    return max(1, min(available_cores(), 8))


def client_for(workers: int | None, cluster: str = "local", gpus: str | None = None, device: str = "cpu",
               resources: Resources | None = None):
    """The Dask client a command runs on (a context manager): dask-cuda workers, one per GPU of
    ``gpus``; up to ``workers`` SLURM jobs (``cluster="slurm"``, default 4); a local cluster of
    ``workers`` processes (default one per core, at most 8; one for ``device="cuda"``: one process
    per GPU); or none (the work runs in this process) for 0 or 1 workers."""
    if gpus is not None:
        if cluster != "local":
            raise ValueError("--gpus runs a dask-cuda cluster on this node's GPUs: leave out --cluster")
        return dask_client("cuda", gpus=gpus)
    if cluster == "slurm":
        return dask_client("slurm", n_workers=workers or 4, resources=resources)
    if workers is None and device == "cuda":
        workers = 1
    n = default_workers() if workers is None else workers
    return dask_client("local", n_workers=n) if n > 1 else nullcontext(None)


@contextmanager
def dask_client(kind: str = "local", n_workers: int | None = None, threads_per_worker: int = 1,
                processes: bool = True, address: str | None = None, resources=None, gpus: str = "all"):
    """Yields a ``distributed.Client``; the cluster lives as long as the block.

    ``kind``: ``local`` (CPU processes), ``address`` (connect to a running scheduler) or ``slurm``
    (up to ``n_workers`` SLURM jobs of one worker each, started and stopped as work needs them;
    ``resources``: :class:`Resources`, the jobs' partition, time, memory,
    cores, GPUs and setup lines) or ``cuda`` (dask-cuda: one worker per GPU of ``gpus``, ``all``
    or a count).
    """
    import logging

    import dask
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)  # cluster chatter is not user output

    if kind == "address" or address:
        with Client(address) as client:
            yield client
        return
    if kind == "slurm":
        with dask.config.set(WORKER_CONFIG), slurm_cluster(n_workers or 4, resources) as cluster:
            with Client(cluster) as client:
                yield client
        return
    if kind == "cuda":
        with dask.config.set(WORKER_CONFIG), cuda_cluster(gpus) as cluster:
            with Client(cluster) as client:
                yield client
        return
    if kind != "local":
        raise ValueError(f"unknown cluster kind {kind!r}; choose 'local', 'cuda' or 'slurm', or give an address")
    with dask.config.set(WORKER_CONFIG):
        cluster = LocalCluster(n_workers=n_workers or default_workers(), threads_per_worker=threads_per_worker,
                               processes=processes, dashboard_address=None, scheduler_kwargs={"dashboard": False},
                               silence_logs=logging.ERROR)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def cuda_devices(gpus: str, visible: str | None = None) -> list[str] | None:
    """The GPUs ``--gpus`` names: None for ``all`` (dask-cuda finds them), else the first N of
    those this process may use (``CUDA_VISIBLE_DEVICES``, as SLURM sets it), else 0..N-1."""
    if str(gpus) == "all":
        return None
    n = int(gpus)
    if n < 1:
        raise ValueError(f"--gpus must be 'all' or a positive count, not {gpus!r}")
    listed = [d.strip() for d in (visible or "").split(",") if d.strip()]
    if listed and n > len(listed):
        raise ValueError(f"--gpus {n}: only {len(listed)} GPU(s) visible (CUDA_VISIBLE_DEVICES={visible})")
    return listed[:n] if listed else [str(i) for i in range(n)]


@contextmanager
def cuda_cluster(gpus: str = "all"):
    """dask-cuda's LocalCUDACluster: a worker process per GPU, each pinned to its device (and its
    CPU cores) before it starts; the client process never touches CUDA."""
    import logging

    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ValueError("--gpus needs dask-cuda: pip install 'kneebatch[gpu]'") from None
    devices = cuda_devices(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    kwargs = {"CUDA_VISIBLE_DEVICES": devices} if devices is not None else {}
    cluster = LocalCUDACluster(threads_per_worker=1, dashboard_address=None, silence_logs=logging.ERROR, **kwargs)
    try:
        yield cluster
    finally:
        cluster.close()


@contextmanager
def slurm_cluster(max_jobs: int, resources=None):
    """dask-jobqueue's SLURMCluster: one worker process per job with the job's cores as threads,
    adaptive between one job and ``max_jobs``. Workers run this interpreter (a shared file system)."""
    import sys

    import dask

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ValueError("--cluster slurm needs dask-jobqueue: pip install 'kneebatch[slurm]'") from None
    r = resources or Resources()
    # what the command line does not say comes from dask's jobqueue.slurm config (cluster/jobqueue.yaml)
    cores = r.cpus_per_task or dask.config.get("jobqueue.slurm.cores", None) or 1
    chosen = {"queue": r.partition, "account": r.account, "walltime": r.time,
              "memory": r.mem or dask.config.get("jobqueue.slurm.memory", None) or f"{4 * cores}GB",
              "job_extra_directives": [f"--gpus-per-task={r.gpus_per_task}"] if r.gpus_per_task else None,
              "job_script_prologue": [r.setup] if r.setup else None}
    cluster = SLURMCluster(cores=cores, processes=1, python=sys.executable, scheduler_options={"dashboard_address": None},
                           **{k: v for k, v in chosen.items() if v is not None})
    cluster.adapt(minimum=1, maximum=max_jobs)
    try:
        yield cluster
    finally:
        cluster.close()
