"""Shared fixtures (one small synthetic cohort and its store, built once per test session) and helpers."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kneebatch.models.checkpoints import save_weights
from kneebatch.models.config import ModelConfig, NetConfig, build_network
from kneebatch.synth.cohort import PRESETS, generate_cohort
from kneebatch.training.publish import publish

SEED = 11
# the tests' engines are randomly initialised (validation Dice 0, recorded so by export): run them as
# --allow-low-accuracy does; tests/test_misuse.py checks the refusal without this
os.environ["KNEEBATCH_ALLOW_LOW_ACCURACY"] = "1"
# every study gets T2 on its own grid, extra (axial, localizer) series and shuffled files,
# so that each ingest rule is exercised on every study
HARD = replace(PRESETS["small"], p_t2_other_grid=0.5, p_extra_series=1.0, p_shuffled_files=0.5)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, 6, seed=SEED, ranges=HARD, workers=1)
    return out


@pytest.fixture(scope="session")
def manifest(cohort) -> dict:
    return json.loads((cohort / "manifest.json").read_text())


@pytest.fixture(scope="session")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "study.key"
    # one fixed key: study keys, and so the shard split of the session's cohort, are the same in every
    # run (a random key put all 6 studies in one shard of two about once in 32 runs)
    path.write_text("kneebatch-test-key-" + "5" * 45 + "\n")
    path.chmod(0o600)
    os.environ["KNEEBATCH_KEY_FILE"] = str(path)  # nothing in tests touches ~/.config
    return path


@pytest.fixture(scope="session")
def store(cohort, key_file, tmp_path_factory) -> Path:
    from kneebatch.jobs.convert import convert

    path = tmp_path_factory.mktemp("store") / "cohort.zarr"
    report = convert(cohort / "dicom", path, key_file=key_file, show_progress=False)
    assert report.converted == 6 and report.failed == 0, report
    return path


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, key_file) -> Path:
    """Two small T1 + T2 studies (the small preset: ~1.1 mm in-plane, 2.5-4 mm slices) in a store:
    what the tests of other tools' models run on. Tests that segment copy it first."""
    from kneebatch.jobs.convert import convert

    root = tmp_path_factory.mktemp("small-store")
    generate_cohort(root / "cohort", 2, seed=2929, ranges=PRESETS["small"], workers=1)
    assert convert(root / "cohort" / "dicom", root / "store.zarr", key_file=key_file, show_progress=False).converted == 2
    return root / "store.zarr"


def comparable(rows):
    """Table rows comparable with ==: NaN (an absent tissue's thickness) never equals itself."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]


TINY = ModelConfig(coarse=NetConfig([4, 8], [2]), fine=NetConfig([4, 8, 8], [[1, 2, 2], [2, 2, 2]], norm="BATCH"),
                   coarse_shape=[16, 32, 32], fine_spacing_mm=[4.0, 2.0, 2.0], fine_patch=[8, 32, 32])


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory):
    """Small randomly initialised engines: the pipeline's mechanics, not its accuracy."""
    train_dir = tmp_path_factory.mktemp("train")
    (train_dir / "model_config.json").write_text(TINY.to_json())
    torch.manual_seed(0)
    for stage, net in (("coarse", TINY.coarse), ("fine", TINY.fine)):
        model = build_network(net, 2, TINY.n_classes)
        save_weights(train_dir / f"{stage}.safetensors", model.state_dict(), {"stage": stage, "val_score": 0.0},
                     dtype=torch.float16)
    out = tmp_path_factory.mktemp("engines")
    publish(train_dir, out)
    return out
