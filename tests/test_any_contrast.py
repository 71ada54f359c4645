"""One model for any knee contrast: accuracy of the shipped engines per protocol (issue 16's targets).

Held-out synthetic cohorts (seed 515151; training used 1000) of each protocol go through
DICOM -> convert -> run with the shipped engines, as a user's would. These tests need
one-channel engines trained on many contrasts (``per_series``, ``kneebatch train-synthetic``);
with the two-channel T1 + T2 engines they are skipped, and say so.
"""

import numpy as np
import pytest

from kneebatch import labels as L
from kneebatch.inference.engine_dir import engines_dir
from kneebatch.models.config import ModelConfig
from kneebatch.training.evaluate import held_out_accuracy

SEED = 515151
N = 2
TARGETS = {"bone": 0.95, "cartilage": 0.85, "meniscus": 0.80, "ligament": 0.80, "tendon": 0.80, "muscle": 0.90,
           "fat": 0.90, "fluid": 0.85}
MEDIAN_EFFUSION_ERROR_PCT = 5.0


def _one_model_engines() -> bool:
    path = engines_dir() / "model_config.json"
    return path.exists() and ModelConfig.load(path).per_series


pytestmark = pytest.mark.skipif(not _one_model_engines(), reason="the shipped engines are the two-channel T1 + T2 "
                                "ones; one-model (per_series) engines have not shipped yet")


def _below_target(acc) -> list[str]:
    return [f"{lab.name} {acc.dice[lab.name]:.3f} < {TARGETS[lab.group]}" for lab in L.LABELS
            if lab.name in acc.dice and acc.dice[lab.name] < TARGETS[lab.group]]


@pytest.fixture(scope="module")
def accuracy(tmp_path_factory, key_file):
    cache = {}

    def get(protocol, anatomy=None):
        if (protocol, anatomy) not in cache:
            from kneebatch.synth.cohort import ranges_for

            root = tmp_path_factory.mktemp(f"acc-{protocol}-{anatomy or 'typical'}")
            cache[protocol, anatomy] = held_out_accuracy(root, protocol, N, SEED, key_file=key_file,
                                                         ranges=ranges_for("clinical", protocol, anatomy))
        return cache[protocol, anatomy]

    return get


@pytest.mark.parametrize("protocol", ["clinical", "oai", "skmtea", "pdfs", "t2fs"])
def test_every_protocol_meets_the_targets(accuracy, protocol):
    acc = accuracy(protocol)
    assert acc.failed == 0
    assert not _below_target(acc), _below_target(acc)
    assert acc.median_effusion_error_pct <= MEDIAN_EFFUSION_ERROR_PCT


def test_a_contrast_never_trained_on_is_within_005_of_the_trained_ones(accuracy):
    from kneebatch.training.synthesis import HELD_OUT_FAMILIES

    assert HELD_OUT_FAMILIES == ("STIR",)
    trained = np.mean([accuracy(p).mean_dice for p in ("clinical", "oai", "skmtea", "pdfs", "t2fs")])
    assert accuracy("stir").mean_dice >= trained - 0.05


def test_knees_at_the_anatomy_ranges_ends_meet_the_targets(accuracy):
    acc = accuracy("pdfs", "extreme")
    assert not _below_target(acc), _below_target(acc)
    assert acc.median_effusion_error_pct <= MEDIAN_EFFUSION_ERROR_PCT


def test_partial_label_fine_tuning_lifts_its_labels_and_keeps_the_rest(tmp_path, key_file):
    """OAI-ZIB's four classes only, on a contrast the engines never saw (STIR): a short fine-tune
    with the marginal loss raises those classes' Dice; every other tissue stays within 0.02."""
    from kneebatch.ingest.label_import import label_file, read_label_file
    from kneebatch.ingest.store import CohortStore
    from kneebatch.jobs.convert import convert
    from kneebatch.label_sets import LABEL_SETS
    from kneebatch.outputs import read_rows
    from kneebatch.synth.cohort import generate_cohort
    from kneebatch.training.publish import publish
    from kneebatch.training.train import train

    zib = LABEL_SETS["oai-zib"]
    generate_cohort(tmp_path / "train", 8, seed=616161, preset="small", protocol="stir", workers=1)
    convert(tmp_path / "train" / "dicom", tmp_path / "train.zarr", key_file=key_file, show_progress=False)
    store = CohortStore(tmp_path / "train.zarr")
    uid = {r["study_key"]: r["study_uid"] for r in read_rows(store.keymap_path)}
    lut = np.zeros(L.N_CLASSES, np.uint8)
    for i, ids in zib.ids.items():
        lut[list(ids)] = i
    for key in store.study_keys():
        truth, _ = read_label_file(label_file(tmp_path / "train" / "truth", [uid[key]]), store.grid(key))
        store.write_labels(key, lut[truth], {"label_set": zib.name}, name=zib.name)
    before = held_out_accuracy(tmp_path / "before", "stir", 3, 717171, key_file=key_file, preset="small")
    train(tmp_path / "train.zarr", tmp_path / "run", minutes_coarse=0, minutes_fine=3, init_from=engines_dir(),
          lr=3e-4, label_name=zib.name, label_set=zib, eval_every_fine=40)
    publish(tmp_path / "run", tmp_path / "engines")
    after = held_out_accuracy(tmp_path / "after", "stir", 3, 717171, key_file=key_file, preset="small",
                              engines=str(tmp_path / "engines"))
    annotated = {"femur", "femoral_cartilage", "tibia", "medial_tibial_cartilage", "lateral_tibial_cartilage"}
    table = {n: (round(before.dice[n], 3), round(after.dice.get(n, 0.0), 3)) for n in before.dice}
    assert np.mean([after.dice[n] for n in annotated]) > np.mean([before.dice[n] for n in annotated]), table
    dropped = {n: v for n, v in table.items() if n not in annotated and v[1] < v[0] - 0.02}
    assert not dropped, (dropped, table)
