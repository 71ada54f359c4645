"""Accuracy of the shipped engines on synthetic studies from a seed never used in training.

The t1-t2 engine set (``engines/t1-t2/``) was trained on seed 1000 (see engines/t1-t2/TRAINING.md); these
studies come from seed 424242, rendered at clinical resolution, converted from DICOM
and segmented by ``kneebatch run`` exactly as a user would.
"""

import shutil

import numpy as np
import pytest

from kneebatch import labels as L
from kneebatch.inference.engine_dir import DEFAULT_ENGINES
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.convert import convert
from kneebatch.jobs.run import run
from kneebatch.outputs import read_rows
from kneebatch.synth.cohort import generate_cohort
from kneebatch.training.evaluate import dice_against_truth, study_scores

HELD_OUT_SEED = 424242
N = 4
# The product targets (issue 4), for every tissue of each group. The shipped demo engines
# reach all of them on these studies, with the defaults (the fibula at 0.951, the closest)
# and with mirror test-time augmentation (``--tta``; see docs/segmentation.md, "Accuracy").
TARGETS = {"bone": 0.95, "cartilage": 0.85, "meniscus": 0.80, "ligament": 0.80, "muscle": 0.90, "fluid": 0.85}
MEDIAN_EFFUSION_ERROR_PCT = 5.0  # the target of issue 4
# Regression floors: what the shipped engines do on these held-out studies, less a margin.
FLOORS = {"femur": 0.98, "tibia": 0.97, "patella": 0.97, "fibula": 0.93, "femoral_cartilage": 0.91,
          "medial_tibial_cartilage": 0.86, "lateral_tibial_cartilage": 0.90, "patellar_cartilage": 0.93,
          "medial_meniscus": 0.85, "lateral_meniscus": 0.79, "acl": 0.91, "pcl": 0.92, "mcl": 0.87, "lcl": 0.87,
          "patellar_tendon": 0.91, "quadriceps_muscle": 0.96, "hamstring_muscle": 0.98,
          "gastrocnemius_muscle": 0.97, "subcutaneous_fat": 0.94, "effusion": 0.89}

pytestmark = pytest.mark.skipif(not (DEFAULT_ENGINES / "sets.json").exists(), reason="no shipped engines")


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, key_file):
    """The held-out studies segmented with the defaults (ONNX Runtime, float32)."""
    root = tmp_path_factory.mktemp("heldout")
    generate_cohort(root / "cohort", N, seed=HELD_OUT_SEED, workers=2)
    convert(root / "cohort" / "dicom", root / "store.zarr", key_file=key_file, show_progress=False)
    report = run(root / "store.zarr", root / "out", show_progress=False)
    assert report.segmented == N and report.failed == 0
    return root


def _segment_copy(root, name, **options):
    """The same studies segmented again, in a copy of the store, with other ``run`` options."""
    shutil.copytree(root / "store.zarr", root / f"{name}.zarr")
    report = run(root / f"{name}.zarr", root / f"out-{name}", show_progress=False, **options)
    assert report.segmented == N and report.failed == 0
    return f"{name}.zarr"


@pytest.fixture(scope="module")
def segmented_tta(segmented):
    return _segment_copy(segmented, "tta", tta=True)


def _dice_table(root, store_name="store.zarr"):
    per_label, effusion_err = dice_against_truth(root / store_name, root / "cohort" / "truth")
    return {k: float(np.mean(v)) for k, v in per_label.items()}, effusion_err


def _targets_met(dice) -> set:
    return {g for g, t in TARGETS.items() if all(dice[lab.name] >= t for lab in L.in_group(g) if lab.name in dice)}


def test_dice_per_tissue_on_held_out_studies(segmented):
    dice, errors = _dice_table(segmented)
    print("held-out Dice:", {k: round(v, 4) for k, v in dice.items()})
    print("effusion volume error %:", [round(float(e), 2) for e in errors])
    assert len(dice) >= 19  # every tissue present in the field of view was scored
    for label in L.LABELS:
        if label.name in dice:
            assert dice[label.name] >= FLOORS[label.name], (label.name, dice[label.name])
    assert _targets_met(dice) == set(TARGETS)
    assert np.median(errors) <= MEDIAN_EFFUSION_ERROR_PCT, errors


def test_every_target_is_also_met_with_mirror_tta(segmented, segmented_tta):
    dice, errors = _dice_table(segmented, segmented_tta)
    print("held-out Dice, --tta:", {k: round(v, 3) for k, v in dice.items()})
    print("effusion volume error %, --tta:", [round(float(e), 2) for e in errors])
    assert len(dice) >= 19
    assert _targets_met(dice) == set(TARGETS), {k: round(v, 3) for k, v in dice.items()}
    assert np.median(errors) <= MEDIAN_EFFUSION_ERROR_PCT, errors
    plain, _ = _dice_table(segmented)
    assert np.mean(list(dice.values())) > np.mean(list(plain.values()))


UNFAMILIAR_SEED = 777001  # varied anatomy: knees the t1-t2 engines never saw (flexion, tears, extrusion)


def test_the_engines_are_sure_of_familiar_knees_and_say_where_they_are_not(segmented, tmp_path_factory, key_file):
    """QC catches what sizes cannot: on the held-out studies an ``uncertain:`` flag names only a
    tissue segmented below target (no false alarm on a good one), and each varied-anatomy study
    on which the engines lose a tissue (Dice < 0.6: a meniscus at a third of its size, as issue 30
    found) is flagged and not qc_ok, by the engines' own confidence."""
    held_out = {s.key: s.dice for s in study_scores(segmented / "store.zarr", segmented / "cohort" / "truth")}
    for row in read_rows(segmented / "out" / "measurements.parquet"):
        for flag in row["qc_flags"]:
            if flag.startswith("uncertain:"):
                tissue = flag.partition(":")[2]
                assert held_out[row["study_key"]][tissue] < 0.8, (flag, held_out[row["study_key"]][tissue])
        assert all(0.9 < row[f"{name}_confidence"] <= 1.0 for name in ("femur", "tibia", "femoral_cartilage"))
    root = tmp_path_factory.mktemp("unfamiliar")
    generate_cohort(root / "cohort", 2, seed=UNFAMILIAR_SEED, anatomy="varied", workers=2)
    convert(root / "cohort" / "dicom", root / "store.zarr", key_file=key_file, show_progress=False)
    assert run(root / "store.zarr", root / "out", show_progress=False).segmented == 2
    rows = {r["study_key"]: r for r in read_rows(root / "out" / "measurements.parquet")}
    lost = {s.key: [t for t, d in s.dice.items() if d < 0.6] for s in study_scores(root / "store.zarr",
                                                                                   root / "cohort" / "truth")}
    assert any(lost.values()), lost  # the engines do fail on these knees
    for key, tissues in lost.items():
        if tissues:
            assert not rows[key]["qc_ok"] and any(f.startswith("uncertain:") for f in rows[key]["qc_flags"]), \
                (tissues, rows[key]["qc_flags"])
    # measure on the run's stored maps gives the run's flags and confidence (the maps carry them)
    from kneebatch.jobs.measure import measure_store

    measure_store(root / "store.zarr", root / "measured", per_study={k: r["label_name"] for k, r in rows.items()},
                  show_progress=False)
    for again in read_rows(root / "measured" / "measurements.parquet"):
        row = rows[again["study_key"]]
        assert again["qc_flags"] == row["qc_flags"] and again["engine_set"] == row["engine_set"] == "t1-t2"
        assert all(again[c] == row[c] for c in row if c.endswith("_confidence"))


def test_measurements_come_from_the_segmentation(segmented):
    rows = read_rows(segmented / "out" / "measurements.parquet")
    store = CohortStore(segmented / "store.zarr")
    assert len(rows) == N
    for row in rows:
        labels = store.read_labels(row["study_key"])
        vv = store.grid(row["study_key"]).voxel_volume_mm3
        assert row["effusion_volume_mm3"] == pytest.approx(np.sum(labels == L.by_name("effusion").id) * vv)
        assert row["label_source"] == "segmentation"


def test_bfloat16_engines_on_the_cpu_keep_the_accuracy(segmented):
    """``--backend torch --half`` on the CPU (bfloat16) scores within 0.005 Dice of the float32 ONNX
    engines on every tissue."""
    full, _ = _dice_table(segmented)
    half, _ = _dice_table(segmented, _segment_copy(segmented, "bf16", backend="torch", half=True))
    print("bf16 - fp32 Dice:", {k: round(half[k] - full[k], 4) for k in full})
    assert set(half) == set(full)
    assert all(abs(half[k] - full[k]) < 0.005 for k in full)


def test_compiled_engines_keep_the_accuracy(segmented):
    """``--backend torch-compile`` (Inductor, frozen weights, crops padded to static buckets)
    scores within 0.005 Dice of the float32 ONNX engines on every tissue."""
    full, _ = _dice_table(segmented)
    compiled, _ = _dice_table(segmented, _segment_copy(segmented, "compiled", backend="torch-compile"))
    print("compiled - fp32 Dice:", {k: round(compiled[k] - full[k], 4) for k in full})
    assert set(compiled) == set(full)
    assert all(abs(compiled[k] - full[k]) < 0.005 for k in full)
