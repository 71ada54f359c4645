"""Compiled engines: crop-size buckets, and torch.compile (Inductor, frozen weights) against
eager on the CPU.

The CUDA path (the same buckets, CUDA graphs, float16) runs the same code with another
``torch.compile`` mode; it ran on a lent H200 once (benchmarks/README.md, 2026-12-04), where
its labels were not compared with eager's there: ``test_compiled_cuda_engine_labels_are_eager_fp32s``
is that comparison, for the next lease.
"""

import math

import numpy as np
import pytest
import torch

from kneebatch.inference import segment as seg
from kneebatch.inference.engine_dir import load_engines
from kneebatch.inference.engines import BUCKET_STEPS, TorchEngine, bucket_shape


def test_buckets_hold_the_crop_with_at_most_a_quarter_more_per_axis():
    divisor = (4, 16, 16)
    for z in range(1, 200, 3):
        for y in range(16, 700, 37):
            got = bucket_shape((z, y, y), divisor)
            for n, b, d in zip((z, y, y), got, divisor):
                units = math.ceil(n / d)
                assert b >= n and b % d == 0
                assert b / d <= max(units * 1.25, units + 1) or units > BUCKET_STEPS[-1]
    assert bucket_shape((36, 160, 144), divisor) == (40, 160, 160)
    assert len({bucket_shape((z, 180, 180), divisor)[0] for z in range(20, 61)}) == 7  # 41 crop depths, 7 shapes


class _Recorder:
    """An engine that records the shapes it is run at."""

    def __init__(self, engine):
        self.engine, self.shapes = engine, []
        self.device = engine.device

    def input_shape(self, shape, divisor):
        return self.engine.input_shape(shape, divisor)

    def __call__(self, x):
        self.shapes.append(tuple(x.shape[2:]))
        return self.engine(x)


def test_bucketed_crops_run_at_few_shapes_and_keep_their_labels(tiny_engines):
    engines = load_engines(tiny_engines, "torch")
    cfg = engines.config
    plain = _Recorder(engines.fine)
    bucketed = _Recorder(engines.fine)
    bucketed.engine = TorchEngine.from_module(engines.fine.model)
    bucketed.engine.buckets = True
    rng = np.random.default_rng(3)
    agree = []
    for _ in range(8):
        shape = (int(rng.integers(20, 29)), int(rng.integers(120, 161)), int(rng.integers(120, 161)))
        x = torch.from_numpy(rng.normal(size=(2, *shape)).astype(np.float32))
        a = seg.fine_logits(plain, x, cfg)
        b = seg.fine_logits(bucketed, x, cfg)
        assert a.shape == b.shape == (cfg.n_classes, *shape)
        agree.append(float((a.argmax(0) == b.argmax(0)).float().mean()))
    assert len(set(plain.shapes)) == 8
    # depths 20-28 and sides 120-160 fall in 2 x 2 x 2 buckets
    assert set(bucketed.shapes) <= {(z, y, x) for z in (24, 28) for y in (128, 160) for x in (128, 160)}
    assert all(s == bucket_shape(s, cfg.fine.divisor()) for s in bucketed.shapes)
    # the crop's own voxels see a little more replicated edge: labels change only there
    assert min(agree) > 0.9 and np.mean(agree) > 0.95


def test_compiled_cpu_engine_equals_eager(tiny_engines):
    eager = load_engines(tiny_engines, "torch")
    compiled = load_engines(tiny_engines, "torch-compile")
    assert compiled.fine.buckets and not eager.fine.buckets
    rng = np.random.default_rng(4)
    for shape in ((12, 48, 48), (16, 64, 48)):  # two buckets: two static graphs
        x = torch.from_numpy(rng.normal(size=(1, 2, *shape)).astype(np.float32))
        want, got = eager.fine(x), compiled.fine(x)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_cuda_engine_labels_are_eager_fp32s(tiny_engines):
    eager = load_engines(tiny_engines, "torch", device="cuda")
    compiled = load_engines(tiny_engines, "torch-compile", device="cuda", half=True)  # CUDA graphs, fp16
    rng = np.random.default_rng(5)
    for shape in ((12, 48, 48), (16, 64, 48), (12, 48, 48)):  # the third replays the first's graph
        x = torch.from_numpy(rng.normal(size=(1, 2, *shape)).astype(np.float32)).cuda()
        want, got = eager.fine(x), compiled.fine(x)
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert float((got.argmax(1) == want.argmax(1)).float().mean()) > 0.99


def test_a_batch_reports_engine_loading_and_compiling_apart_from_the_per_study_stages(tiny_engines, store, tmp_path):
    """On a GPU the one-off costs (a set's loading, CUDA start-up, a compiled engine's first call
    per shape) outweighed 12 studies' work (benchmarks/README.md, H200): a run reports them apart."""
    import shutil
    import time

    from kneebatch.inference.engine_dir import EngineSets
    from kneebatch.ingest.store import CohortStore
    from kneebatch.jobs.segment import STAGES, process_batch

    copy = tmp_path / "cohort.zarr"
    shutil.copytree(store, copy)
    keys = CohortStore(copy).study_keys()[:2]

    def load_slowly(folder):  # a known loading time, as a GPU's context and weights take
        time.sleep(0.3)
        engines = load_engines(folder, "torch")
        for stage in ("coarse", "fine"):  # compiled-engine bookkeeping over the eager nets
            engine = TorchEngine.from_module(getattr(engines, stage).model)
            engine.buckets = True
            setattr(engines, stage, engine)
        return engines

    sets = EngineSets({"tiny": tiny_engines}, load_slowly)
    first = process_batch(keys, str(copy), sets)
    assert not first["failures"] and set(first["seconds"]) == set(STAGES)
    assert 0.3 <= first["seconds"]["engines"] < 5
    engines = sets.get("tiny")
    compiled = engines.coarse.compile_seconds + engines.fine.compile_seconds
    assert compiled > 0 and first["seconds"]["compile"] == pytest.approx(compiled)
    # the same studies again: every shape has been seen, the set is loaded: no one-off cost left
    again = process_batch(keys, str(copy), sets)
    assert again["seconds"]["engines"] < 0.01 and again["seconds"]["compile"] == 0.0
    assert again["seconds"]["coarse"] > 0 and again["seconds"]["fine"] > 0
    assert [r["femur_volume_mm3"] for r in again["rows"]] == [r["femur_volume_mm3"] for r in first["rows"]]


def test_tensorrt_plans_are_cached_in_the_users_cache_not_the_package(tmp_path, monkeypatch):
    """The installed package may be read-only or shared by many users' workers; two workers
    building one plan each write a temporary file of their own and rename it whole."""
    from concurrent.futures import ThreadPoolExecutor

    from kneebatch.inference.engine_dir import shipped_engines
    from kneebatch.inference.tensorrt_engine import PROFILE, plan_path
    from kneebatch.outputs import write_bytes_atomic

    monkeypatch.delenv("KNEEBATCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    onnx = shipped_engines() / "t1-t2" / "fine.onnx"
    path = plan_path(onnx, "ab" * 32, "NVIDIA H200", "10.9", PROFILE, True)
    assert path.parent == tmp_path / "xdg" / "kneebatch" / "tensorrt" and onnx.parent not in path.parents
    assert path.name.startswith("fine.NVIDIA_H200.trt10.9.abababababab.") and path.name.endswith(".fp16.plan")
    assert plan_path(onnx, "ab" * 32, "NVIDIA H200", "10.9", PROFILE, False) != path  # precision in the name
    monkeypatch.setenv("KNEEBATCH_CACHE", str(tmp_path / "mine"))
    assert plan_path(onnx, "ab" * 32, "NVIDIA H200", "10.9", PROFILE, True).parent == tmp_path / "mine" / "tensorrt"
    target = tmp_path / "plan"
    blobs = [bytes([i]) * 200_000 for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda b: write_bytes_atomic(target, b), blobs))
    assert target.read_bytes() in blobs and [p.name for p in tmp_path.iterdir() if p.name.startswith(".plan")] == []
