"""Compiled engines: crop-size buckets, and torch.compile (Inductor, frozen weights) against
eager on the CPU.

The CUDA path (the same buckets, CUDA graphs, float16) runs the same code with another
``torch.compile`` mode; it has not run on a GPU here.
"""

import math

import numpy as np
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
