"""nnU-Net v2 model folders as engines: kneebatch run --model gives the labels nnU-Net's own
predictor gives (nnUNetv2_predict_from_modelfolder, its command line, on a NIfTI of the study),
measures only the tissues the model segments, and refuses bad folders in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2", reason="the nnunet extra: pip install 'kneebatch[nnunet]'")

from kneebatch import labels as L  # noqa: E402
from kneebatch.inference.external import label_lut  # noqa: E402
from kneebatch.inference.nnunet import NnUNetFolder, load_checkpoint  # noqa: E402
from kneebatch.ingest.store import CohortStore  # noqa: E402
from kneebatch.outputs import read_rows  # noqa: E402
from tests.nnunet_model import write_model  # noqa: E402

PREDICT = Path(sys.executable).with_name("nnUNetv2_predict_from_modelfolder")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("nnunet-model"), folds=(0, 1))


def _nnunet_reference(model: Path, image: np.ndarray, spacing_zyx, tmp: Path, tta: bool) -> np.ndarray:
    """nnU-Net's own command line on a NIfTI of the image (SimpleITK: array (z, y, x), spacing reversed)."""
    import SimpleITK as sitk

    (tmp / "in").mkdir(parents=True)
    itk = sitk.GetImageFromArray(image.astype(np.float32))
    itk.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(itk, str(tmp / "in" / "case_0000.nii.gz"))
    cmd = [str(PREDICT), "-i", str(tmp / "in"), "-o", str(tmp / "out"), "-m", str(model), "-f", "0", "1",
           "-device", "cpu", "-npp", "1", "-nps", "1"] + ([] if tta else ["--disable_tta"])
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "out" / "case.nii.gz")))


def test_run_with_an_nnunet_folder_gives_nnunets_own_labels(small_store, model, tmp_path, capsys):
    from kneebatch.cli import main

    store_path = tmp_path / "store.zarr"
    shutil.copytree(small_store, store_path)
    assert main(["run", str(store_path), str(tmp_path / "out"), "--model", str(model), "--tta", "-q"]) == 0
    assert "2 segmented" in capsys.readouterr().out
    store = CohortStore(store_path, create=False)
    lut = label_lut(NnUNetFolder.read(model).dataset["labels"])
    rows = {r["study_key"]: r for r in read_rows(tmp_path / "out" / "measurements.parquet")}
    for n, key in enumerate(store.study_keys()):
        t1 = store.channels(key).index("T1")
        image, grid = store.read_image(key, [t1])
        name, ours = store.chosen_labels(key, None)
        reference = lut[_nnunet_reference(model, image[0], grid.spacing, tmp_path / f"ref{n}", tta=True)]
        assert ours.shape == reference.shape == grid.shape
        assert np.array_equal(ours, reference), (key, int((ours != reference).sum()))
        present = np.bincount(ours.ravel(), minlength=L.N_CLASSES) / ours.size
        assert present[L.by_name("femur").id] > 0.01 and present[L.by_name("tibia").id] > 0.01
        row = rows[key]
        assert row["label_name"] == name and row["engine_set"].startswith("nnunet:Dataset990_KneeTiny")
        assert row["femur_volume_mm3"] == pytest.approx(np.sum(ours == 1) * grid.voxel_volume_mm3)
        # what the model does not segment is unknown, not absent
        assert row["patella_volume_mm3"] is None and row["femoral_cartilage_thickness_mean_mm"] is None
        assert row["total_bone_volume_mm3"] is None and row["cMF_thickness_mean_mm"] is None
        assert not any(f.endswith(("patella", "cartilage", "meniscus")) for f in row["qc_flags"])
    # stats and the report say which tissues the model does not segment
    import pandas as pd

    from kneebatch.report import build_report
    from kneebatch.stats import not_segmented

    unmeasured = not_segmented(pd.read_parquet(tmp_path / "out" / "measurements.parquet"))
    assert "femur" not in unmeasured and "tibia" not in unmeasured
    assert set(unmeasured) == {label.name for label in L.LABELS} - {"femur", "tibia"}
    text = build_report(tmp_path / "out").read_text()
    assert "Not segmented by nnunet:Dataset990_KneeTiny" in text and "patellar cartilage" in text


def test_shards_of_a_process_cluster_give_nnunets_labels_too(small_store, model, tmp_path, capsys):
    """Without mirroring (nnUNetv2_predict --disable_tta), as two shards on two worker processes
    each, for a model trained on RAS NIfTIs: each study turned to RAS exactly and back."""
    from kneebatch.cli import main
    from kneebatch.geometry import orientation_direction, to_canonical

    store_path = tmp_path / "store.zarr"
    shutil.copytree(small_store, store_path)
    for shard in ("0/2", "1/2"):
        assert main(["run", str(store_path), str(tmp_path / "out"), "--model", str(model), "--shard", shard,
                     "--workers", "2", "--axis-order", "RAS", "-q"]) == 0
    assert main(["merge", str(tmp_path / "out")]) == 0
    assert "2 rows, 0 failed" in capsys.readouterr().out
    store = CohortStore(store_path, create=False)
    lut = label_lut(NnUNetFolder.read(model).dataset["labels"])
    rows = read_rows(tmp_path / "out" / "measurements.parquet")
    assert len(rows) == 2 and all(r["label_name"].endswith("-notta") for r in rows)
    for n, row in enumerate(rows):
        image, grid = store.read_image(row["study_key"], [store.channels(row["study_key"]).index("T1")])
        turn = to_canonical(grid, orientation_direction("RAS"))
        assert not turn.is_identity
        ras, ras_grid = turn.apply(image[0], grid)
        predicted = _nnunet_reference(model, ras, ras_grid.spacing, tmp_path / f"ref{n}", tta=False)
        reference = turn.invert(lut[predicted], ras_grid)
        assert np.array_equal(store.read_labels(row["study_key"], row["label_name"]), reference)


def test_a_study_without_the_models_series_is_a_missing_role_row(small_store, tmp_path):
    from kneebatch.jobs.run import run

    other = write_model(tmp_path / "pdfs", folds=(0,), channel="PDFS", steps=1)
    report = run(small_store, tmp_path / "out", model=str(other), model_roles=("PDFS",))
    assert report.failed == 2 and report.segmented == 0
    failures = read_rows(tmp_path / "out" / "failures.parquet")
    assert {f["reason"] for f in failures} == {"missing_role"}
    assert all("takes PDFS" in f["message"] and "T1" in f["message"] for f in failures)


def test_bad_model_folders_are_refused_in_one_line(small_store, model, tmp_path, capsys):
    import json

    import torch

    from kneebatch.cli import main

    def refused(folder, *extra) -> str:
        assert main(["run", str(small_store), str(tmp_path / "never"), "--model", str(folder), *extra]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert not (tmp_path / "never").exists()
        return err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not an nnU-Net v2 model folder" in refused(empty)

    no_folds = tmp_path / "nofolds"
    shutil.copytree(model, no_folds, ignore=shutil.ignore_patterns("fold_*"))
    assert "no checkpoint_final.pth" in refused(no_folds)

    unnamed = tmp_path / "unnamed"
    shutil.copytree(model, unnamed)
    dataset = json.loads((unnamed / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "bone_a": 1, "tibia": 2}
    (unnamed / "dataset.json").write_text(json.dumps(dataset))
    assert "1:bone_a" in refused(unnamed)
    lut = label_lut(dataset["labels"], "1:femur")  # what --label-map 1:femur gives the run
    assert lut.tolist() == [0, L.by_name("femur").id, L.by_name("tibia").id]
    assert "femur" in refused(unnamed, "--label-map", "1:femurr")  # not a label of the schema

    other_role = tmp_path / "otherrole"
    shutil.copytree(model, other_role)
    dataset = json.loads((model / "dataset.json").read_text())
    dataset["channel_names"] = {"0": "MRI"}
    (other_role / "dataset.json").write_text(json.dumps(dataset))
    assert "--channels 0:ROLE" in refused(other_role)

    pickled = tmp_path / "pickled"
    shutil.copytree(model, pickled)
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint["trainer"] = Path("/")  # a Python object, as some trainers store
    torch.save(checkpoint, pickled / "fold_0" / "checkpoint_final.pth")
    assert "loads weights only" in refused(pickled, "--channels", "0:T1")


def test_checkpoints_with_numpy_logs_load_as_weights(model):
    checkpoint = load_checkpoint(model / "fold_0" / "checkpoint_final.pth")
    assert set(checkpoint) >= {"network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes"}
    assert isinstance(checkpoint["logging"]["train_losses"][0], np.floating)


def test_a_model_recorded_by_name_runs_by_name_and_stops_when_its_files_change(small_store, model, tmp_path,
                                                                                 monkeypatch, capsys):
    from kneebatch.cli import main

    monkeypatch.setenv("KNEEBATCH_MODELS", str(tmp_path / "models.json"))
    mine = tmp_path / "mine" / model.parent.name / model.name
    shutil.copytree(model, mine)
    assert main(["models", "add", str(mine), "--name", "tiny-knee", "--axis-order", "ras"]) == 0
    said = capsys.readouterr().out
    assert "takes T1" in said and "femur, tibia" in said and "axis order RAS" in said
    assert main(["models", "add", str(mine), "--name", "tiny-knee"]) != 0  # taken
    assert "--replace" in capsys.readouterr().err
    assert main(["models", "list"]) == 0
    assert "tiny-knee: nnunet:Dataset990_KneeTiny" in capsys.readouterr().out

    store_path = tmp_path / "store.zarr"
    shutil.copytree(small_store, store_path)
    assert main(["run", str(store_path), str(tmp_path / "out"), "--model", "tiny-knee", "--workers", "0", "-q"]) == 0
    capsys.readouterr()
    settings = __import__("json").loads((tmp_path / "out" / "provenance.json").read_text())
    assert settings["model"]["axis_order"] == "RAS" and settings["model"]["roles"] == ["T1"]
    rows = read_rows(tmp_path / "out" / "measurements.parquet")
    assert len(rows) == 2 and all(r["femur_volume_mm3"] > 0 for r in rows)

    # the folder changes under its name: the next run stops before it starts
    torch = pytest.importorskip("torch")
    checkpoint = torch.load(mine / "fold_1" / "checkpoint_final.pth", weights_only=False)
    torch.save(checkpoint | {"current_epoch": 61}, mine / "fold_1" / "checkpoint_final.pth")
    assert main(["run", str(store_path), str(tmp_path / "out2"), "--model", "tiny-knee", "-q"]) != 0
    err = capsys.readouterr().err
    assert "fold_1/checkpoint_final.pth changed since" in err and not (tmp_path / "out2").exists()
    assert main(["run", str(store_path), str(tmp_path / "out3"), "--model", "no-such-model", "-q"]) != 0
    assert "recorded models: tiny-knee" in capsys.readouterr().err


def test_a_cascade_runs_both_stages_as_nnunet_does(small_store, tmp_path, capsys):
    """--model on a cascade's second stage (3d_cascade_fullres) runs its first stage (3d_lowres)
    too: the labels equal nnUNetv2_predict_from_modelfolder on the first stage, then on the
    second with -prev_stage_predictions, as nnU-Net's documentation runs a cascade."""
    import SimpleITK as sitk

    from kneebatch.cli import main
    from tests.nnunet_model import write_cascade

    second = write_cascade(tmp_path / "models", folds=(0,), steps=40)
    first = second.with_name("nnUNetTrainer__nnUNetPlans__3d_lowres")
    store_path = tmp_path / "store.zarr"
    shutil.copytree(small_store, store_path)
    assert main(["run", str(store_path), str(tmp_path / "out"), "--model", str(second), "-q"]) == 0
    assert "2 segmented" in capsys.readouterr().out
    store = CohortStore(store_path, create=False)
    lut = label_lut(NnUNetFolder.read(second).dataset["labels"])
    for n, key in enumerate(store.study_keys()):
        image, grid = store.read_image(key, [store.channels(key).index("T1")])
        work = tmp_path / f"ref{n}"
        (work / "in").mkdir(parents=True)
        itk = sitk.GetImageFromArray(image[0].astype(np.float32))
        itk.SetSpacing(tuple(float(s) for s in reversed(grid.spacing)))
        sitk.WriteImage(itk, str(work / "in" / "case_0000.nii.gz"))
        common = ["-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"]
        for stage, out, extra in ((first, "low", []), (second, "out", ["-prev_stage_predictions", str(work / "low")])):
            done = subprocess.run([str(PREDICT), "-i", str(work / "in"), "-o", str(work / out), "-m", str(stage),
                                   *common, *extra], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        reference = lut[sitk.GetArrayFromImage(sitk.ReadImage(str(work / "out" / "case.nii.gz")))]
        low = lut[sitk.GetArrayFromImage(sitk.ReadImage(str(work / "low" / "case.nii.gz")))]
        _, ours = store.chosen_labels(key, None)
        assert np.array_equal(ours, reference), (key, int((ours != reference).sum()))
        assert not np.array_equal(reference, low)  # the second stage changed the first's labels
        assert len(np.unique(ours)) == 3
    rows = read_rows(tmp_path / "out" / "measurements.parquet")
    assert {r["engine_set"] for r in rows} == {"nnunet:Dataset990_KneeTiny/nnUNetTrainer__nnUNetPlans__3d_cascade_fullres"}
    # without its first stage beside it, the second is refused in one line
    shutil.rmtree(first)
    assert main(["run", str(store_path), str(tmp_path / "out2"), "--model", str(second), "-q"]) == 2
    assert "its first stage nnUNetTrainer__nnUNetPlans__3d_lowres must be next to it" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_a_variant_trainer_is_found_past_a_module_that_cannot_import(monkeypatch):
    """nnunetv2's optional architectures (Primus imports timm, then torchvision) may not import with
    the torch at hand: the trainer a model names (TotalSegmentator's nnUNetTrainerNoMirroring,
    nnUNetTrainer_2000epochs_NoMirroring) is still found."""
    import importlib

    from kneebatch.inference.nnunet import find_trainer

    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if "primus" in name or "variants.benchmarking" in name:
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", broken)
    for name in ("nnUNetTrainer", "nnUNetTrainerNoMirroring", "nnUNetTrainer_2000epochs_NoMirroring"):
        assert find_trainer(name).__name__ == name
    assert find_trainer("NoSuchTrainer") is None


@pytest.mark.parametrize("backend", ["onnxruntime", "torch-compile"])
def test_fast_backends_give_nnunets_labels_but_for_near_ties(small_store, model, backend):
    """The network on batches of tiles (ONNX Runtime, or compiled), mirrored copies in the same
    calls: every voxel agrees with nnU-Net's own predictor but where its two best classes are
    within rounding of a tie; a last, short batch is padded to full."""
    from kneebatch.inference.nnunet import NnUNetModel

    store = CohortStore(small_store, create=False)
    exact = NnUNetModel.open(model, tta=True)
    fast = NnUNetModel.open(model, tta=True, backend=backend, tiles_per_call=5)
    assert fast.label_name == exact.label_name + f"-{backend}" and fast.describe()["backend"] == backend
    agree = total = 0
    for key in store.study_keys():
        image, grid = store.read_image(key, [store.channels(key).index("T1")])
        spacing = [float(s) for s in grid.spacing]
        seg, probabilities = exact.predictor().predict_single_npy_array(image, {"spacing": spacing},
                                                                         save_or_return_probabilities=True)
        ours = fast._segment(image, spacing)
        assert ours.shape == seg.shape == grid.shape
        top2 = np.sort(probabilities, axis=0)[-2:]
        differ = ours != seg
        assert np.all(top2[1][differ] - top2[0][differ] < 1e-3)  # only near-ties
        assert len(np.unique(seg)) == 3
        agree, total = agree + int((~differ).sum()), total + seg.size
    assert agree / total >= 0.9999


def test_the_backend_of_a_model_run_is_named_and_other_kinds_refuse_one(small_store, model, tmp_path, capsys):
    from kneebatch.cli import main

    store_path = tmp_path / "store.zarr"
    shutil.copytree(small_store, store_path)
    assert main(["run", str(store_path), str(tmp_path / "out"), "--model", str(model), "--backend", "onnxruntime",
                 "--net-batch", "4", "-q"]) == 0
    rows = read_rows(tmp_path / "out" / "measurements.parquet")
    assert len(rows) == 2 and all(r["label_name"].endswith("-notta-onnxruntime") for r in rows)
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["model"]["backend"] == "onnxruntime" and provenance["model"]["tiles_per_call"] == 4
    onnx_model = tmp_path / "onnx-model"
    onnx_model.mkdir()
    (onnx_model / "model.json").write_text("{}")
    capsys.readouterr()
    assert main(["run", str(store_path), str(tmp_path / "out2"), "--model", str(onnx_model), "--backend",
                 "onnxruntime", "-q"]) == 2
    assert "this onnx model runs as its own tool runs it" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
