"""Engine sets: each study of a mixed cohort is segmented by the set its series fit, in one run,
each set loaded once; a study no set fits is a failure row that names its roles and the sets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from kneebatch.errors import StudyError
from kneebatch.inference.engine_dir import EngineSets, describe_sets, load_engines, read_manifest, set_dirs
from kneebatch.ingest.store import CohortStore
from kneebatch.models.checkpoints import load_weights, save_weights
from kneebatch.models.config import build_network
from kneebatch.outputs import read_rows
from kneebatch.synth.cohort import generate_cohort, ranges_for
from kneebatch.training.evaluate import StudyScore, rate
from kneebatch.training.publish import publish

from .conftest import TINY

# tiny sets (random weights: the mechanics, not the accuracy), listed in this order of preference
ROLES = {"t1-t2": [["T1"], ["T2FS", "T2"]], "dess-pdfs": [["DESS"], ["PDFS"]], "dess": [["DESS"]],
         "pdfs": [["PDFS"]], "gre": [["GRE3D"]]}
# the set each protocol's study should get from ROLES (t2fs: none of them)
EXPECTED = {"clinical": "t1-t2", "oai": "dess-pdfs", "skmtea": "dess", "pdfs": "pdfs", "t2fs": None}


def _tiny_set(folder, roles, seed):
    from dataclasses import replace

    cfg = replace(TINY, input_roles=roles, in_channels=len(roles))
    train = folder.parent / f"train-{folder.name}"
    train.mkdir(parents=True)
    (train / "model_config.json").write_text(cfg.to_json())
    torch.manual_seed(seed)
    for stage, net in (("coarse", cfg.coarse), ("fine", cfg.fine)):
        save_weights(train / f"{stage}.safetensors", build_network(net, cfg.in_channels, cfg.n_classes).state_dict(),
                     {"stage": stage, "val_score": 0.0}, dtype=torch.float16)
    publish(train, folder)


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets") / "engines"
    for i, (name, roles) in enumerate(ROLES.items()):
        _tiny_set(root / name, roles, i)
    (root / "sets.json").write_text(json.dumps({"sets": list(ROLES)}))
    return root


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory, key_file):
    """One small study of each protocol (the same knee), converted into one store; study key -> protocol."""
    from kneebatch.jobs.convert import convert

    root = tmp_path_factory.mktemp("mixed")
    uid_protocol = {}
    for i, protocol in enumerate(EXPECTED):
        cohort = generate_cohort(root / protocol, 1, seed=9300 + i, ranges=ranges_for("small", protocol))
        uid_protocol.update({s["study_uid"]: protocol for s in json.loads((cohort / "manifest.json").read_text())["studies"]})
        report = convert(cohort / "dicom", root / "store.zarr", key_file=key_file, show_progress=False)
        assert report.failed == 0
    keymap = read_rows(CohortStore(root / "store.zarr").keymap_path)
    return root / "store.zarr", {r["study_key"]: uid_protocol[r["study_uid"]] for r in keymap}


def test_a_study_gets_the_set_with_the_most_inputs_it_has(tiny_sets):
    sets = EngineSets(set_dirs(tiny_sets), loader=None)
    assert sets.choose(["T1", "T2FS"]) == ("t1-t2", [0, 1])
    assert sets.choose(["PDFS", "DESS"]) == ("dess-pdfs", [1, 0])  # two inputs beat DESS alone
    assert sets.choose(["DESS"]) == ("dess", [0])
    assert sets.choose(["T2", "PDFS", "T1"]) == ("t1-t2", [2, 0])  # T2 stands in for T2FS
    assert sets.choose(["PDFS", "T2FS"]) == ("pdfs", [0])
    with pytest.raises(StudyError) as e:
        sets.choose(["T2FS", "STIR"])
    assert e.value.reason == "unsupported_contrast"
    assert "found T2FS, STIR" in e.value.message
    for name in ROLES:
        assert f"{name} needs" in e.value.message
    assert "t1-t2 needs T1 + T2FS|T2" in e.value.message


def test_a_mixed_cohort_is_segmented_set_by_set_in_one_run(tiny_sets, mixed_store, tmp_path):
    from kneebatch.jobs.run import run

    store, protocol_of = mixed_store
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    report = run(work, tmp_path / "out", engines_path=tiny_sets, show_progress=False, threads=1)
    assert (report.segmented, report.failed) == (4, 1)
    rows = read_rows(tmp_path / "out" / "measurements.parquet")
    got = {r["study_key"]: r["engine_set"] for r in rows}
    assert got == {k: s for k, p in protocol_of.items() if (s := EXPECTED[p])}
    hashes = {n: load_engines(tiny_sets / n).model_hash for n in ROLES}
    channels = {"t1-t2": "T1+T2FS", "dess-pdfs": "DESS+PDFS", "dess": "DESS", "pdfs": "PDFS"}
    s = CohortStore(work)
    for r in rows:
        assert r["model_hash"] == hashes[r["engine_set"]]
        assert r["channels_used"] == channels[r["engine_set"]]
        assert r["label_name"] in s.label_names(r["study_key"])  # each set's own label map
    [failure] = read_rows(tmp_path / "out" / "failures.parquet")
    assert protocol_of[failure["study_key"]] == "t2fs"
    assert failure["reason"] == "unsupported_contrast"
    assert "found T2FS" in failure["message"] and all(f"{n} needs" in failure["message"] for n in ROLES)
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert list(provenance["engine_sets"]) == list(ROLES)
    assert set(provenance["engines"]) == set(ROLES)
    assert provenance["engine_sets"]["dess"]["model_config"]["input_roles"] == [["DESS"]]
    assert provenance["studies_per_engine_set"] == {s: list(got.values()).count(s) for s in set(got.values())}

    # --engines SET (one set's folder) forces it: the OAI study gets DESS alone, the others fail
    forced = run(work, tmp_path / "forced", engines_path=tiny_sets / "dess", show_progress=False, threads=1)
    assert (forced.segmented, forced.failed) == (2, 3)
    rows = read_rows(tmp_path / "forced" / "measurements.parquet")
    assert sorted(protocol_of[r["study_key"]] for r in rows) == ["oai", "skmtea"]
    assert {r["engine_set"] for r in rows} == {"dess"} and {r["channels_used"] for r in rows} == {"DESS"}


def test_each_set_is_loaded_once_and_only_when_a_study_needs_it(tiny_sets, mixed_store, tmp_path):
    from kneebatch.jobs.segment import process_batch

    store, protocol_of = mixed_store
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    loads = []

    def loader(folder):
        loads.append(folder.name)
        return load_engines(folder, "onnxruntime", threads=1)

    sets = EngineSets(set_dirs(tiny_sets), loader)  # as a worker holds them, across its tasks
    keys = sorted(protocol_of)
    first = process_batch(keys[:3], str(work), sets)
    second = process_batch(keys[3:], str(work), sets)
    assert len(first["rows"]) + len(second["rows"]) == 4
    assert sorted(loads) == sorted(["t1-t2", "dess-pdfs", "dess", "pdfs"])  # gre: no study needed it


def test_a_set_is_named_by_its_folder_or_by_a_shipped_name(tiny_sets):
    assert set_dirs(tiny_sets / "pdfs") == {"pdfs": tiny_sets / "pdfs"}
    assert list(set_dirs(tiny_sets)) == list(ROLES)
    shipped = set_dirs()
    assert "t1-t2" in shipped and set_dirs("t1-t2") == {"t1-t2": shipped["t1-t2"]}
    with pytest.raises(FileNotFoundError, match="shipped: t1-t2"):
        set_dirs("no-such-set")


def test_a_set_for_every_series_never_beats_one_made_for_the_study(tiny_sets, tmp_path):
    from kneebatch.models.config import ModelConfig

    configs = {"any": ModelConfig(in_channels=1, input_roles=[], per_series=True),
               **{n: ModelConfig.load(tiny_sets / n / "model_config.json") for n in ("t1-t2", "dess")}}
    sets = EngineSets({n: None for n in configs}, None, configs=configs)
    assert sets.choose(["T1", "T2FS", "PDFS"])[0] == "t1-t2"
    assert sets.choose(["DESS"])[0] == "dess"
    assert sets.choose(["STIR"]) == ("any", [0])


def test_an_exported_set_joins_the_folder_of_sets(tiny_sets, tiny_engines, tmp_path):
    root = tmp_path / "engines"
    shutil.copytree(tiny_sets, root)
    train = tmp_path / "train"
    train.mkdir()
    for f in ("model_config.json", "coarse.safetensors", "fine.safetensors"):
        shutil.copy(tiny_engines / f, train / f)
    with pytest.raises(ValueError, match="folder of engine sets"):
        publish(train, root)  # would hide every set behind one engines.json
    publish(train, root / "mine")
    assert list(set_dirs(root)) == [*ROLES, "mine"]


def test_a_damaged_set_stops_the_run_before_any_study(tiny_sets, mixed_store, tmp_path):
    from kneebatch.jobs.run import run

    root = tmp_path / "engines"
    shutil.copytree(tiny_sets, root)
    fine = root / "pdfs" / "fine.onnx"
    fine.write_bytes(fine.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="engine set pdfs: fine.onnx does not match"):
        run(mixed_store[0], tmp_path / "out", engines_path=root, show_progress=False, threads=1)
    assert not (tmp_path / "out" / "measurements.parquet").exists()


def test_a_set_that_fails_to_load_fails_its_studies_once_loaded(tiny_sets):
    calls = []

    def loader(folder):
        calls.append(folder.name)
        raise RuntimeError("no such provider")

    sets = EngineSets(set_dirs(tiny_sets), loader)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="no such provider"):
            sets.get("dess")
    assert calls == ["dess"]


def test_engines_list_shows_every_set_with_its_inputs_and_status(tiny_sets):
    manifest = read_manifest(tiny_sets / "dess")
    manifest["set"] = {"status": "preview", "test_dice": {"femur": 0.9, "tibia": 0.8}, "what": "DESS alone",
                       "evaluated_on": "2 studies"}
    (tiny_sets / "dess" / "engines.json").write_text(json.dumps(manifest))
    rows = {r["name"]: r for r in describe_sets(tiny_sets)}
    assert list(rows) == list(ROLES)
    assert rows["dess"]["status"] == "preview" and rows["dess"]["mean_dice"] == pytest.approx(0.85)
    assert rows["pdfs"]["status"] == "unrated" and rows["pdfs"]["needs"] == "PDFS"
    out = subprocess.run([sys.executable, "-m", "kneebatch.cli", "engines", "list", "--engines", str(tiny_sets)],
                         capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith(" ")]
    assert [ln.split()[0] for ln in lines] == list(ROLES)
    assert "preview" in lines[2] and "mean Dice 0.850 (2 studies)" in lines[2]
    assert "T1 + T2FS|T2" in lines[0]


def _score(slice_mm, effusion=5.0, **dice):
    base = {n: 0.97 for n in ("femur", "tibia", "patella")}
    base.update({n: 0.9 for n in ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
                                  "patellar_cartilage", "medial_meniscus", "lateral_meniscus", "acl", "pcl", "mcl",
                                  "lcl", "effusion")})
    base.update({n: 0.95 for n in ("quadriceps_muscle", "hamstring_muscle", "gastrocnemius_muscle")})
    base.update(dice)
    return StudyScore("k", base, effusion, slice_mm)


def test_a_set_is_rated_ready_preview_or_not_shippable():
    assert rate([_score(0.7), _score(3.0)])["status"] == "ready"
    # collateral ligaments on thick slices are reported, not held to the target
    thick = rate([_score(0.7), _score(3.0, mcl=0.3, lcl=0.4)])
    assert thick["status"] == "ready"
    assert thick["collateral_by_slices"] == {"mcl_thin_slices": 0.9, "mcl_thick_slices": 0.3,
                                             "lcl_thin_slices": 0.9, "lcl_thick_slices": 0.4}
    thin = rate([_score(1.2, mcl=0.7), _score(3.0)])
    assert thin["status"] == "preview" and thin["misses"] == ["mcl 0.700 < 0.8"]
    effusion = rate([_score(0.7, 12.0), _score(0.7, 14.0), _score(0.7, 1.0)])
    assert effusion["median_effusion_error_pct"] == 12.0
    assert effusion["misses"] == ["median effusion-volume error 12.0 % > 10 %"]
    assert rate([])["status"] == "not_shippable"
    poor = rate([_score(0.7, femur=0.2, tibia=0.2, patella=0.2, acl=0.3, pcl=0.3)])
    assert poor["status"] == "not_shippable" and poor["mean_dice"] < 0.85 and len(poor["misses"]) == 5


def test_train_synthetic_protocol_fine_tunes_a_set_from_two_channel_engines(tiny_engines, tmp_path, key_file):
    from kneebatch.models.engine_sets import spec_for
    from kneebatch.training.protocol import train_protocol
    from kneebatch.training.train import Trainer

    spec = spec_for("pdfs")
    metrics = train_protocol(spec, tmp_path / "run", n=4, volume_seed=9400, init_from=tiny_engines,
                             minutes_coarse=0.03, minutes_fine=0.03, threads=1, eval_every_fine=5)
    assert metrics["engine_set"] == "pdfs" and metrics["split"] == {"val": 1, "test": 1, "train": 2}
    cfg = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert (cfg["in_channels"], cfg["input_roles"], cfg["per_series"]) == (1, [["PDFS"]], False)
    store = CohortStore(tmp_path / "run" / "data" / "store.zarr")
    assert len(store.study_keys()) == 4
    assert all(store.channels(k) == ["PDFS"] and "truth" in store.label_names(k) for k in store.study_keys())
    # the first convolution of the two-channel engines, summed over T1 and T2, starts the one-channel net
    two, _ = load_weights(tiny_engines / "coarse.safetensors")
    one = build_network(TINY.coarse, 1, TINY.n_classes)
    Trainer._initialise(one, tiny_engines / "coarse.safetensors")
    first = "model.0.conv.unit0.conv.weight"
    assert two[first].shape[1] == 2
    assert torch.equal(one.state_dict()[first], two[first].sum(1, keepdim=True))


def test_an_oai_study_as_dcm2niix_nifti_is_stored_on_its_dess_grid_as_from_dicom(tmp_path, key_file):
    """dcm2niix's NIfTI carries no acquisition type: the DESS (0.7 mm slices, 0.36-0.46 mm in-plane)
    must still be the study's reference grid, as it is from DICOM, so the same set sees the same grid."""
    import os
    import shutil as sh

    from kneebatch.jobs.convert import convert

    exe = sh.which("dcm2niix", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix)")
    cohort = generate_cohort(tmp_path / "c", 1, seed=9500, protocol="oai")
    study = json.loads((cohort / "manifest.json").read_text())["studies"][0]
    (tmp_path / "nii").mkdir()
    for series in study["series"].values():
        if series["role"] == "other":  # the axial PD and the localizer: not what this test is about
            continue
        out = tmp_path / series["contrast"]
        out.mkdir()
        subprocess.run([exe, "-z", "y", "-f", "x", "-o", str(out), str(cohort / series["folder"])], check=True,
                       capture_output=True)
        sh.copy(out / "x.nii.gz", tmp_path / "nii" / f"case_{series['contrast']}.nii.gz")
    for src, name in ((cohort / "dicom", "dcm.zarr"), (tmp_path / "nii", "nii.zarr")):
        assert convert(src, tmp_path / name, key_file=key_file, show_progress=False).converted == 1
    dcm, nii = CohortStore(tmp_path / "dcm.zarr"), CohortStore(tmp_path / "nii.zarr")
    (kd,), (kn,) = dcm.study_keys(), nii.study_keys()
    assert dcm.channels(kd) == nii.channels(kn) == ["DESS", "PDFS"]
    assert dcm.grid(kd).shape == nii.grid(kn).shape and dcm.grid(kd).spacing[0] == pytest.approx(0.7, abs=1e-3)
    assert nii.grid(kn).same_as(dcm.grid(kd), atol_mm=1e-3)


def test_a_sets_own_mirror_tta_is_what_the_settings_record(tiny_engines, tmp_path):
    """Provenance says what ran: a set whose config asks for mirror TTA records it, whatever the
    option; the loaded engines run with it and name their label maps by it."""
    import shutil

    from kneebatch.inference.engine_dir import InferenceOptions
    from kneebatch.models.config import ModelConfig
    from kneebatch.training.publish import publish

    plain = InferenceOptions(engines=str(tiny_engines))
    assert plain.settings()["engines"][tiny_engines.name]["mirror_tta"] is False
    # a set exported with mirror TTA in its config (its own hash, so its own label maps)
    train_dir = tmp_path / "train"
    shutil.copytree(tiny_engines, train_dir)
    cfg = ModelConfig.load(train_dir / "model_config.json")
    cfg.mirror_tta = True
    (train_dir / "model_config.json").write_text(cfg.to_json())
    publish(train_dir, tmp_path / "tta-set")
    options = InferenceOptions(engines=str(tmp_path / "tta-set"))
    sets = options.load_sets()
    recorded = options.settings(sets)
    assert recorded["mirror_tta"] is False and recorded["engines"]["tta-set"]["mirror_tta"] is True
    engines = sets.get("tta-set")
    assert engines.config.mirror_tta and engines.label_name.endswith("-tta")
    assert recorded["engines"]["tta-set"]["config"] != plain.settings()["engines"][tiny_engines.name]["config"]
