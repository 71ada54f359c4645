"""``--gpus``: a dask-cuda cluster from the same factory, engines loaded once per worker, no
CUDA in the client. The factory, plugin and driver run here on a stand-in for dask-cuda's
LocalCUDACluster (a LocalCluster that records what it was asked for); the real thing is
marked ``gpu``."""

from __future__ import annotations

import sys
import types

import pandas as pd
import pytest
import torch

from kneebatch.distributed.cluster import cuda_devices


def test_gpus_name_the_devices_this_process_may_use():
    assert cuda_devices("all") is None  # dask-cuda finds them
    assert cuda_devices("2") == ["0", "1"]
    assert cuda_devices("2", visible="3,5,7") == ["3", "5"]  # SLURM's allocation, not the node's first GPUs
    with pytest.raises(ValueError, match="only 2 GPU"):
        cuda_devices("4", visible="3,5")
    with pytest.raises(ValueError, match="positive"):
        cuda_devices("0")


@pytest.fixture
def fake_dask_cuda(monkeypatch):
    from distributed import LocalCluster

    asked = {}

    class LocalCUDACluster(LocalCluster):
        def __init__(self, CUDA_VISIBLE_DEVICES=None, **kwargs):
            asked.update(kwargs, CUDA_VISIBLE_DEVICES=CUDA_VISIBLE_DEVICES)
            super().__init__(n_workers=len(CUDA_VISIBLE_DEVICES or [0]), processes=True, **kwargs)

    module = types.ModuleType("dask_cuda")
    module.LocalCUDACluster = LocalCUDACluster
    monkeypatch.setitem(sys.modules, "dask_cuda", module)
    return asked


def test_run_on_a_cuda_cluster_loads_engines_per_worker(store, tiny_engines, tmp_path, fake_dask_cuda):
    import shutil

    from kneebatch.distributed.cluster import dask_client

    store = shutil.copytree(store, tmp_path / "store")  # run writes label maps: not into the shared store
    from kneebatch.inference.engine_dir import InferenceOptions
    from kneebatch.jobs.run import run

    with dask_client("cuda", gpus="2") as client:
        assert type(client.cluster).__name__ == "LocalCUDACluster" and len(client.nthreads()) == 2
        report = run(store, tmp_path / "out", InferenceOptions(str(tiny_engines), "torch", "cpu", threads=1),
                     client=client, batch_size=2, show_progress=False)
        loaded = client.run(lambda dask_worker: hasattr(dask_worker, "kneebatch_engines"))
    assert fake_dask_cuda["CUDA_VISIBLE_DEVICES"] == ["0", "1"] and fake_dask_cuda["threads_per_worker"] == 1
    assert all(loaded.values()) and len(loaded) == 2  # WorkerPlugin.setup on each worker
    assert report.segmented == 6 and report.failed == 0
    assert len(pd.read_parquet(tmp_path / "out" / "measurements.parquet")) == 6
    assert not torch.cuda.is_initialized()


def test_gpus_without_dask_cuda_says_what_to_install(store, tmp_path, capsys, monkeypatch):
    from kneebatch.cli import main

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails
    assert main(["run", str(store), str(tmp_path / "o"), "--gpus", "1"]) == 2
    assert "pip install 'kneebatch[gpu]'" in capsys.readouterr().err
    assert main(["run", str(store), str(tmp_path / "o"), "--gpus", "1", "--device", "cpu"]) == 2
    assert "leave out --device cpu" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and dask-cuda")
def test_run_on_every_gpu_with_no_cuda_in_the_client(store, tmp_path):
    import shutil

    pytest.importorskip("dask_cuda")
    from kneebatch.cli import main

    store = shutil.copytree(store, tmp_path / "store")
    assert main(["run", str(store), str(tmp_path / "out"), "--gpus", "all", "--backend", "torch", "-q"]) == 0
    assert len(pd.read_parquet(tmp_path / "out" / "measurements.parquet")) == 6
    assert not torch.cuda.is_initialized()  # the client process never made a CUDA context
