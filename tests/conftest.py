"""Shared fixtures: one small synthetic cohort and its store, built once per test session."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from kneebatch.synth.cohort import PRESETS, generate_cohort

SEED = 11
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
    os.environ["KNEEBATCH_KEY_FILE"] = str(path)  # nothing in tests touches ~/.config
    return path


@pytest.fixture(scope="session")
def store(cohort, key_file, tmp_path_factory) -> Path:
    from kneebatch.ingest.convert import convert

    path = tmp_path_factory.mktemp("store") / "cohort.zarr"
    report = convert(cohort / "dicom", path, key_file=key_file, show_progress=False)
    assert report.converted == 6 and report.failed == 0, report
    return path
