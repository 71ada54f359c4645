"""Physics contrasts, synthetic protocols, images synthesised for training, one-model inference."""

import json
import shutil

import numpy as np
import pytest
import torch

from kneebatch import labels as L
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.convert import convert
from kneebatch.synth import physics
from kneebatch.synth.anatomy import BODY
from kneebatch.synth.cohort import PRESETS, generate_cohort, plan_subject, ranges_for
from kneebatch.training.synthesis import (
    HELD_OUT_FAMILIES,
    TRAIN_FAMILIES,
    LabelVolume,
    draw_appearance,
    physics_appearance,
    random_appearance,
    subject_volume,
    synthesize,
)


# ---------------------------------------------------------------- physics
@pytest.mark.parametrize("field_t", [1.5, 3.0])
def test_physics_contrasts_order_tissues_as_radiologists_see_them(field_t):
    rng = np.random.default_rng(0)
    s = {name: physics.tissue_signal(physics.draw(name, rng, field_t)) for name in physics.FAMILIES}
    t1, t2fs, pdfs, dess, stir = s["T1_TSE"], s["T2_TSE_FS"], s["PD_TSE_FS"], s["DESS_WE"], s["STIR"]
    assert t1["fat"] == pytest.approx(0.9) and t1["fluid"] < t1["cartilage"] < t1["marrow"]  # T1: fat bright, fluid dark
    for table in (t2fs, pdfs, dess, stir):  # fluid-sensitive, fat-suppressed: fluid brightest, fat dark
        assert table["fluid"] == pytest.approx(0.9)
        assert table["fat"] < 0.15 and table["marrow"] < 0.2
    assert s["T2_TSE"]["fat"] > 0.5  # no fat suppression: fat stays bright on T2 TSE
    for table in s.values():  # menisci and tendon dark on every sequence, cortex black
        assert table["meniscus"] < table["cartilage"] and table["tendon"] < 0.12 and table["cortex"] < 0.01
    assert dess["cartilage"] > dess["meniscus"] * 2  # DESS: cartilage bright against menisci


def test_held_out_contrast_is_never_drawn_for_training():
    rng = np.random.default_rng(1)
    names = {draw_appearance(rng).name for _ in range(400)}
    assert names == {*TRAIN_FAMILIES, "random"} and not names & set(HELD_OUT_FAMILIES)


# ---------------------------------------------------------------- protocols
EXPECTED_ROLES = {"clinical": ["T1", "T2FS"], "oai": ["DESS", "PDFS"], "skmtea": ["DESS"], "pdfs": ["PDFS"],
                  "t2fs": ["T2FS"], "stir": ["other"]}


@pytest.fixture(scope="module")
def protocol_stores(tmp_path_factory, key_file):
    root = tmp_path_factory.mktemp("protocols")
    for protocol in EXPECTED_ROLES:
        generate_cohort(root / protocol, 2, seed=31, preset="small", protocol=protocol, workers=1)
        report = convert(root / protocol / "dicom", root / f"{protocol}.zarr", key_file=key_file, show_progress=False)
        assert report.converted == 2 and report.failed == 0
    return root


@pytest.mark.parametrize("protocol", list(EXPECTED_ROLES))
def test_each_protocol_writes_headers_its_contrast_is_recognised_by(protocol_stores, protocol):
    store = CohortStore(protocol_stores / f"{protocol}.zarr")
    for key in store.study_keys():
        assert store.channels(key) == EXPECTED_ROLES[protocol]
    manifest = json.loads((protocol_stores / protocol / "manifest.json").read_text())
    assert {s["protocol"] for s in manifest["studies"]} == {protocol}


def test_physics_images_follow_their_tissue_table(protocol_stores):
    """Mean stored intensity per tissue ranks as the physics table says (noise, bias, partial volume aside)."""
    from kneebatch.ingest.label_import import label_file, read_label_file
    from kneebatch.outputs import read_rows

    store = CohortStore(protocol_stores / "pdfs.zarr")
    uid = {r["study_key"]: r["study_uid"] for r in read_rows(store.keymap_path)}
    for key in store.study_keys():
        image, grid = store.read_image(key)
        truth, _ = read_label_file(label_file(protocol_stores / "pdfs" / "truth", [uid[key]]), grid)
        mean = {name: float(image[0][truth == L.by_name(name).id].mean())
                for name in ("effusion", "femoral_cartilage", "subcutaneous_fat", "medial_meniscus")}
        assert mean["effusion"] > mean["femoral_cartilage"] > mean["medial_meniscus"]
        assert mean["subcutaneous_fat"] < mean["femoral_cartilage"]  # fat suppressed


def test_mixed_draws_each_protocol_and_keeps_the_clinical_stream():
    plans = [plan_subject(7, i, ranges_for("small", "mixed")) for i in range(40)]
    assert {p.protocol for p in plans} == {"clinical", "oai", "skmtea", "pdfs", "t2fs"}
    for p in plans:
        if p.protocol == "clinical":  # the clinical cohort of a seed is the same with or without "mixed"
            same = plan_subject(7, p.index, PRESETS["small"])
            assert np.array_equal(same.t1.grid.affine, p.t1.grid.affine) and same.study_uid == p.study_uid
    single = [p for p in plans if p.protocol in ("skmtea", "pdfs", "t2fs")]
    assert single and all(p.t2 is None and len(p.series()) == 1 + len(p.extras) for p in single)


def test_one_knee_in_two_protocols_is_two_studies_of_one_subject(protocol_stores, tmp_path, key_file):
    """A seed draws the same knees in every protocol; each protocol's scan is a study of its own
    (UIDs of its own), so one store holds them all, and a mixed cohort's scan equals the protocol's."""
    from kneebatch.outputs import read_rows

    plans = {p: plan_subject(31, 0, ranges_for("small", p)) for p in ("clinical", "oai", "pdfs")}
    uids = {p: {plan.study_uid, plan.study["FrameOfReferenceUID"], *(a.series.uid for a in plan.series())}
            for p, plan in plans.items()}
    assert len(uids["clinical"] | uids["oai"] | uids["pdfs"]) == sum(len(u) for u in uids.values())
    assert plans["clinical"].patient == plans["pdfs"].patient  # the OAI's series draw on the identity's stream
    mixed = next(plan_subject(31, i, ranges_for("small", "mixed")) for i in range(40)
                 if plan_subject(31, i, ranges_for("small", "mixed")).protocol == "pdfs")
    assert mixed.study_uid == plan_subject(31, mixed.index, ranges_for("small", "pdfs")).study_uid
    for protocol in ("clinical", "pdfs"):
        report = convert(protocol_stores / protocol / "dicom", tmp_path / "both.zarr", key_file=key_file,
                         show_progress=False)
        assert (report.converted, report.already_done) == (2, 0)
    keymap = read_rows(CohortStore(tmp_path / "both.zarr").keymap_path)
    assert len(keymap) == 4 and len({r["subject_key"] for r in keymap}) == 2  # two knees, each in two protocols
    shutil.copytree(protocol_stores / "pdfs" / "dicom", tmp_path / "copy")  # the same studies in another folder
    for folder, elsewhere in ((protocol_stores / "pdfs" / "dicom", 0), (tmp_path / "copy", 2)):
        report = convert(folder, tmp_path / "both.zarr", key_file=key_file, show_progress=False)
        assert (report.converted, report.already_done, report.already_from_elsewhere) == (0, 2, elsewhere)
    sources = {r["source_path"] for r in read_rows(CohortStore(tmp_path / "both.zarr").keymap_path)}
    assert not any(str(tmp_path / "copy") in s for s in sources)  # the keymap names the files converted


def test_skmtea_and_oai_geometry():
    sk = plan_subject(3, 0, ranges_for("clinical", "skmtea"))
    assert sk.t1.grid.spacing[1:] == pytest.approx((0.31, 0.31)) and sk.t1.thickness_mm == pytest.approx(0.8)
    assert sk.t1.series.manufacturer == "GE MEDICAL SYSTEMS" and sk.t1.series.scanning_sequence == ("RM",)
    oai = plan_subject(3, 1, ranges_for("clinical", "oai"))
    assert oai.t1.thickness_mm == pytest.approx(0.7) and oai.t2.thickness_mm == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown protocol"):
        ranges_for("clinical", "flair")


# ---------------------------------------------------------------- images for training
@pytest.fixture(scope="module")
def volume():
    return subject_volume(5, 2, PRESETS["small"])


def test_label_volume_round_trip_is_exact(volume, tmp_path):
    path = tmp_path / "v.npz"
    volume.save(path)
    back = LabelVolume.load(path)
    assert np.array_equal(back.planes, volume.planes) and np.array_equal(back.cortex, volume.cortex)
    assert back.grid.same_as(volume.grid) and back.key == "v"
    assert BODY not in np.unique(volume.truth) and set(np.unique(volume.truth)) <= set(range(L.N_CLASSES))
    assert np.array_equal(volume.truth[volume.truth > 0], volume.planes[volume.planes.shape[0] // 2][volume.truth > 0])


def test_random_appearance_gives_each_label_its_own_intensity(volume):
    rng = np.random.default_rng(3)
    look = random_appearance(rng)
    look.snr, look.bias, look.texture, look.psf_voxels = 1e6, 0.0, 0.0, 0.0  # noise-free: the table itself
    image = synthesize(volume, look, rng)
    medians = []
    for lab in (1, 5, 16, 20):  # deep inside a tissue the signal is its table value
        inside = (volume.planes == lab).all(0) & ~volume.cortex.any(0)
        assert inside.any()
        medians.append(float(np.median(image[inside])))
        assert medians[-1] == pytest.approx(look.lut[lab], rel=1e-3)
    assert min(np.diff(sorted(medians))) > 1e-3 * max(medians)  # each its own intensity


def test_physics_appearance_matches_the_signal_table(volume):
    rng = np.random.default_rng(4)
    seq = physics.draw("DESS_WE", rng, 3.0)
    look = physics_appearance(seq, rng, jitter=0.0)
    table = physics.tissue_signal(seq)
    assert look.lut[L.by_name("effusion").id] == pytest.approx(table["fluid"])
    assert look.lut[L.by_name("femur").id] == pytest.approx(table["marrow"])
    assert look.lut[BODY] == pytest.approx(table["body"]) and look.cortex == pytest.approx(table["cortex"])


def test_synthesis_is_deterministic_per_seed(volume):
    a = synthesize(volume, draw_appearance(np.random.default_rng(9)), np.random.default_rng(10))
    b = synthesize(volume, draw_appearance(np.random.default_rng(9)), np.random.default_rng(10))
    c = synthesize(volume, draw_appearance(np.random.default_rng(8)), np.random.default_rng(10))
    assert np.array_equal(a, b) and not np.array_equal(a, c) and a.shape == volume.grid.shape


# ---------------------------------------------------------------- one model, any number of series
def test_series_mean_averages_a_one_channel_net_over_the_series():
    from kneebatch.inference.segment import series_mean
    from kneebatch.models.config import ModelConfig

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    weights = torch.tensor([1.0, -2.0, 0.5])[:, None, None, None]
    net = lambda v: v * weights  # noqa: E731  one input channel -> three "classes"
    out = series_mean(net, x, ModelConfig(in_channels=1, per_series=True))
    expected = (net(x[0:1]) + net(x[1:2])) / 2
    assert torch.allclose(out, expected)
    assert torch.equal(series_mean(net, x[:1], ModelConfig(in_channels=1, per_series=True)), net(x[:1]))
    cfg = ModelConfig(in_channels=1, per_series=True)
    assert cfg.input_channels(["DESS", "PDFS"]) == [0, 1] and cfg.input_channels(["other"]) == [0]


def test_deformation_is_smooth_bounded_and_keeps_every_tissue(volume):
    from kneebatch.training.synthesis import deform

    warped = deform(volume, np.random.default_rng(2), max_mm=4.0)
    assert warped.planes.shape == volume.planes.shape and warped.grid.same_as(volume.grid)
    changed = float(np.mean(warped.truth != volume.truth))
    assert 0.005 < changed < 0.25  # boundaries move, interiors stay
    before, after = np.bincount(volume.truth.ravel(), minlength=21), np.bincount(warped.truth.ravel(), minlength=21)
    big = before > 2000
    assert np.all(np.abs(after[big] - before[big]) / before[big] < 0.35)  # volumes change, tissues stay
    assert set(np.unique(warped.truth)) <= set(np.unique(volume.truth))  # nearest neighbour: no new labels
    assert np.array_equal(deform(volume, np.random.default_rng(2)).planes, warped.planes)


def test_a_series_votes_only_where_it_has_data():
    from kneebatch.inference.segment import series_mean
    from kneebatch.models.config import ModelConfig

    cfg = ModelConfig(in_channels=1, per_series=True)
    x = torch.stack([torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -4.0)])
    covered = torch.ones_like(x)
    covered[1, :, :, 2:] = 0  # the second series does not reach the last two columns
    net = lambda v: torch.cat([v, -v])  # noqa: E731  two "classes"
    out = series_mean(net, x, cfg, covered)
    assert torch.allclose(out[0, :, :, :2], torch.full((2, 3, 2), -1.0))  # both series: their mean
    assert torch.allclose(out[0, :, :, 2:], torch.full((2, 3, 2), 2.0), atol=0.01)  # the first alone
    none = torch.zeros_like(x)
    assert torch.allclose(series_mean(net, x, cfg, none), series_mean(net, x, cfg))  # no data anywhere: the mean


@pytest.fixture(scope="module")
def one_channel_engines(tmp_path_factory):
    """Tiny random one-channel engines (``per_series``): the mechanics of any-contrast inference."""
    from dataclasses import replace

    from kneebatch.models.checkpoints import save_weights
    from kneebatch.models.config import build_network
    from kneebatch.training.publish import publish
    from tests.conftest import TINY

    cfg = replace(TINY, in_channels=1, input_roles=[], per_series=True)
    train_dir = tmp_path_factory.mktemp("train1")
    (train_dir / "model_config.json").write_text(cfg.to_json())
    torch.manual_seed(0)
    for stage, net in (("coarse", cfg.coarse), ("fine", cfg.fine)):
        save_weights(train_dir / f"{stage}.safetensors", build_network(net, 1, cfg.n_classes).state_dict(),
                     {"stage": stage, "val_score": 0.0}, dtype=torch.float16)
    out = tmp_path_factory.mktemp("engines1")
    publish(train_dir, out)
    return out


def test_one_channel_engines_segment_every_protocol_with_every_series(protocol_stores, one_channel_engines, tmp_path):
    import shutil

    from kneebatch.jobs.run import run
    from kneebatch.outputs import read_rows

    for protocol, roles in EXPECTED_ROLES.items():
        work = tmp_path / f"{protocol}.zarr"
        shutil.copytree(protocol_stores / f"{protocol}.zarr", work)
        report = run(work, tmp_path / f"out-{protocol}", engines_path=one_channel_engines, show_progress=False)
        assert report.segmented == 2 and report.failed == 0, protocol
        rows = read_rows(tmp_path / f"out-{protocol}" / "measurements.parquet")
        assert [r["channels_used"] for r in rows] == ["+".join(roles)] * 2
        for key in CohortStore(work).study_keys():
            assert CohortStore(work).read_labels(key).shape == CohortStore(work).grid(key).shape
