"""TotalSegmentator task weights as engines: kneebatch run --model on a task's folder gives the
labels TotalSegmentator's own code gives (its nnUNet_predict_image: closest canonical, 1.5 mm
resampling cast to int32, nnU-Net with tile step 0.8 and no mirroring, resampled back and
turned back), on the NIfTI kneebatch exports of the study."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2", reason="the nnunet extra: pip install 'kneebatch[nnunet]'")

from kneebatch import labels as L  # noqa: E402
from kneebatch.ingest.nifti import write_image_nifti  # noqa: E402
from kneebatch.ingest.store import CohortStore  # noqa: E402
from kneebatch.outputs import read_rows  # noqa: E402
from tests.nnunet_model import write_model  # noqa: E402

TASK = "Dataset851_TotalSegMRI_part2_muscles_1088subj"
TRAINER = "nnUNetTrainer_2000epochs_NoMirroring"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny nnU-Net model laid out as TotalSegmentator's total_mr part 2 on disk; its second
    label named as a structure outside the knee (a whole-body task has many)."""
    root = tmp_path_factory.mktemp("totalseg")
    made = write_model(root / "made")
    folder = root / "results" / TASK / f"{TRAINER}__nnUNetPlans__3d_fullres"
    shutil.copytree(made, folder)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "femur_left": 1, "spleen": 2}
    dataset["channel_names"] = {"0": "MRI"}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def _totalsegmentator(results: Path, nifti: Path, out: Path) -> np.ndarray:
    """TotalSegmentator's own prediction of one image with that task (in a process of its own:
    nnU-Net reads its results folder from the environment when imported)."""
    script = (f"from totalsegmentator.nnunet import nnUNet_predict_image\n"
              f"nnUNet_predict_image({str(nifti)!r}, {str(out)!r}, 851, model='3d_fullres', folds=[0], "
              f"trainer={TRAINER!r}, tta=False, multilabel_image=True, resample=1.5, task_name='total_mr', "
              f"quiet=True, device='cpu', nr_threads_resampling=1, nr_threads_saving=1)\n")
    env = {**os.environ, "nnUNet_results": str(results), "TOTALSEG_HOME_DIR": str(out.parent / "home")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    import nibabel as nib

    return np.asarray(nib.load(str(out)).dataobj).transpose(2, 1, 0)


def test_a_totalsegmentator_task_gives_totalsegmentators_own_labels(small_store, weights, tmp_path, capsys):
    pytest.importorskip("totalsegmentator", reason="pip install --no-deps TotalSegmentator==2.18.0 dicom2nifti")
    from kneebatch.cli import main

    store_path = tmp_path / "store.zarr"
    shutil.copytree(small_store, store_path)
    assert main(["run", str(store_path), str(tmp_path / "out"), "--model", str(weights), "--channels", "0:T1",
                 "-q"]) == 0
    assert "2 segmented" in capsys.readouterr().out
    store = CohortStore(store_path, create=False)
    rows = {r["study_key"]: r for r in read_rows(tmp_path / "out" / "measurements.parquet")}
    for n, key in enumerate(store.study_keys()):
        image, grid = store.read_image(key, [store.channels(key).index("T1")])
        write_image_nifti(tmp_path / f"case{n}.nii.gz", image[0], grid)  # as kneebatch export --images writes it
        theirs = _totalsegmentator(weights.parents[1], tmp_path / f"case{n}.nii.gz", tmp_path / f"ts{n}.nii.gz")
        name, ours = store.chosen_labels(key, None)
        assert theirs.shape == ours.shape == grid.shape
        femur = L.by_name("femur").id
        assert np.array_equal(ours, np.where(theirs == 1, femur, 0).astype(np.uint8)), int((ours != femur * (theirs == 1)).sum())
        assert 0.01 < np.mean(theirs == 1) and 0.01 < np.mean(theirs == 2)  # both labels predicted; "spleen" dropped
        row = rows[key]
        assert row["engine_set"] == f"totalsegmentator:total_mr:{TASK}/{TRAINER}__nnUNetPlans__3d_fullres"
        assert row["femur_volume_mm3"] == pytest.approx(np.sum(ours == femur) * grid.voxel_volume_mm3)
        assert row["tibia_volume_mm3"] is None
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["model"]["kind"] == "totalsegmentator" and provenance["model"]["folds"] == ["0"]
    assert provenance["model"]["resample_mm"] == 1.5 and provenance["model"]["tile_step_size"] == 0.8


def test_the_task_table_is_totalsegmentators():
    config = pytest.importorskip("totalsegmentator.map_tasks_config",
                                 reason="pip install --no-deps TotalSegmentator==2.18.0 dicom2nifti")
    from kneebatch.inference.totalseg import DATASETS, TASKS

    theirs = {}
    for name, task in config.TASK_CONFIGS.items():
        for mode in task.get("sub_modes", {"": task}).values():
            ids = mode["task_id"] if isinstance(mode["task_id"], list) else [mode["task_id"]]
            for i in ids:
                theirs.setdefault(i, (name, mode.get("resample")))
    source = Path(config.__file__).read_text()  # where it names the folders it downloads into
    assert set(DATASETS) == set(TASKS)
    for i, name in DATASETS.items():
        assert f"Dataset{i}_{name}" in source, i
    for i, task in TASKS.items():
        assert theirs[i][1] == task.spacing_mm, i
        assert theirs[i][0].removesuffix("_mr") == task.name.removesuffix("_mr") or theirs[i][0] == task.name, i
        assert task.tile_step == (0.8 if task.name in ("total", "total_v3", "total_mr") else 0.5)


def test_totalsegmentator_folders_refuse_an_axis_order(small_store, weights, tmp_path, capsys):
    from kneebatch.cli import main

    assert main(["run", str(small_store), str(tmp_path / "out"), "--model", str(weights), "--channels", "0:T1",
                 "--axis-order", "LPS", "-q"]) == 2
    assert "TotalSegmentator turns every image to RAS itself" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_is_totalsegmentators_only_by_its_dataset_name(tmp_path):
    """A group's own Dataset851 is a plain nnU-Net model, not TotalSegmentator's task."""
    from kneebatch.inference.totalseg import task_of

    trained = "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert task_of(tmp_path / TASK / trained).name == "total_mr"
    assert task_of(tmp_path / "Dataset851_MyKnees" / trained) is None
    assert task_of(tmp_path / "Dataset297_TotalSegmentator_total_3mm_1559subj_v204" / trained).spacing_mm == 3.0
    assert task_of(tmp_path / "Dataset123_Knee" / trained) is None
