"""`kneebatch evaluate`: Dice, HD95 (equal to MONAI's) and volume error against reference files,
from a folder of label files (kneebatch's exports, nnU-Net-style names and ids) or a run's folder."""

import json
import shutil

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from kneebatch import labels as L
from kneebatch.cli import main
from kneebatch.evaluate import evaluate, hd95
from kneebatch.jobs.run import run
from kneebatch.training.evaluate import dice_against_truth


def _blob(shape, centre, radii):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 <= 1


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.5, 0.7)])
def test_hd95_equals_monais(spacing):
    import torch
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(3)
    truth = _blob((30, 40, 36), (15, 20, 18), (8, 12, 10))
    pred = _blob((30, 40, 36), (16, 22, 17), (7, 13, 9)) | (rng.random((30, 40, 36)) > 0.995)

    def onehot(m):
        return torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))

    theirs = float(compute_hausdorff_distance(onehot(pred), onehot(truth), include_background=False, percentile=95,
                                              spacing=list(spacing))[0, 0])
    assert hd95(pred, truth, spacing) == pytest.approx(theirs, rel=1e-5)  # MONAI returns float32
    assert hd95(truth, truth, spacing) == 0.0 and np.isnan(hd95(pred, np.zeros_like(truth), spacing))


def test_files_scored_with_foreign_ids_and_names(cohort, tmp_path, capsys):
    """nnU-Net-style predictions (<case>.nii.gz, their own ids) against the cohort's truth: a copy
    scores Dice 1, HD95 0; one tissue moved by 2 slices scores what the overlap says."""
    truth_dir = cohort / "truth"
    first = sorted(truth_dir.glob("*.nii.gz"))[:2]
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    femur, tibia = L.by_name("femur").id, L.by_name("tibia").id
    # the prediction's ids: 1 femur, 2 tibia, everything else 0 (a model that knows two bones)
    for i, path in enumerate(first):
        img = nib.load(path)
        data = np.asarray(img.dataobj).astype(np.uint8)
        ours = np.where(data == femur, 1, np.where(data == tibia, 2, 0)).astype(np.uint8)
        if i == 1:  # the femur shifted by 2 voxels along the first array axis
            moved = np.zeros_like(ours)
            moved[2:] = (ours[:-2] == 1)
            ours = np.where(ours == 1, 0, ours)
            ours = np.where(moved == 1, 1, ours).astype(np.uint8)
        nib.save(nib.Nifti1Image(ours, img.affine), pred_dir / path.name)
    keep_bones = ",".join(f"{lab.id}:background" for lab in L.LABELS if lab.id not in (femur, tibia))
    assert main(["evaluate", str(pred_dir), str(truth_dir), str(tmp_path / "ev"), "--label-map", "1:femur,2:tibia",
                 "--truth-label-map", f"{femur}:femur,{tibia}:tibia,{keep_bones}", "-q"]) == 0
    assert "2 studies scored" in capsys.readouterr().out
    rows = pq.read_table(tmp_path / "ev" / "evaluation.parquet").to_pylist()
    by = {(r["case"], r["tissue"]): r for r in rows}
    same, moved = (p.name[: -len(".nii.gz")] for p in first)
    assert {r["tissue"] for r in rows} == {"femur", "tibia"} and len(rows) == 4
    assert by[(same, "femur")]["dice"] == 1.0 and by[(same, "femur")]["hd95_mm"] == 0.0
    assert by[(same, "tibia")]["volume_error_pct"] == 0.0
    truth_femur = np.asarray(nib.load(first[1]).dataobj) == femur
    overlap = (truth_femur[2:] & truth_femur[:-2]).sum()
    assert by[(moved, "femur")]["dice"] == pytest.approx(2 * overlap / (2 * truth_femur.sum() - truth_femur[-2:].sum()))
    assert by[(moved, "tibia")]["dice"] == 1.0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["tissues"]["tibia"]["mean_dice"] == 1.0
    # names that match nothing (an export named by study key against truth named by UID) stop with a hint
    (pred_dir / first[0].name).rename(pred_dir / "k0000.nii.gz")
    (pred_dir / first[1].name).unlink()
    assert main(["evaluate", str(pred_dir), str(truth_dir), str(tmp_path / "ev2"), "--label-map", "1:femur,2:tibia",
                 "-q"]) == 2
    assert "has a reference file" in capsys.readouterr().err


def test_a_run_folder_is_scored_from_its_store(store, cohort, tiny_engines, tmp_path):
    """The same Dice the accuracy benchmarks compute, from a run's folder; studies without a
    reference are listed, not scored."""
    store = shutil.copytree(store, tmp_path / "store.zarr")  # the session's store keeps no label maps
    out = tmp_path / "run"
    run(store, out, engines_path=tiny_engines, show_progress=False)
    truth = tmp_path / "truth"
    shutil.copytree(cohort / "truth", truth)
    missing = sorted(truth.glob("*.nii.gz"))[0]
    missing.unlink()
    summary = evaluate(out, truth, tmp_path / "ev", show_progress=False)
    assert summary["cases"] == 5 and len(summary["without_truth"]) == 1
    per_label, _ = dice_against_truth(store, truth)
    for tissue, values in per_label.items():
        assert summary["tissues"][tissue]["mean_dice"] == pytest.approx(np.mean(values)), tissue
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(tmp_path / "nowhere", truth, tmp_path / "ev2")
