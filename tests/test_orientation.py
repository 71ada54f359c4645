"""One canonical voxel order whatever the source: exact reorientation, and the same
segmentation from DICOM, from dcm2niix's NIfTI, from NIfTI in other axis orders and from
a mirrored (other-side) knee.

The end-to-end test segments held-out synthetic studies (seed 424242, never trained on)
with the shipped engines through every path, in one store and one run.
"""

import itertools
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kneebatch.geometry import CANONICAL_LPS, Grid, Reorientation, obliquity_deg, to_canonical
from kneebatch.inference.engine_dir import DEFAULT_ENGINES
from kneebatch.ingest.label_import import read_label_file
from kneebatch.measure import dice_per_label
from kneebatch.outputs import read_rows
from kneebatch.synth.cohort import PRESETS, _rotation, generate_cohort

HELD_OUT_SEED = 424242
ORIENTATIONS = ("RAS", "LPI", "PSR", "AIL")  # NIfTI axis codes the files are rewritten in


def _grid(direction, shape=(9, 11, 13), spacing=(3.0, 0.5, 0.6)):
    return Grid.from_parts(shape, spacing, (10.0, -20.0, 30.0), direction)


def test_every_axis_order_and_flip_maps_back_exactly():
    rng = np.random.default_rng(0)
    canonical = _grid(_rotation(2, 0, 7) @ CANONICAL_LPS)
    volume = rng.integers(0, 1000, canonical.shape)
    probe = np.array([[3, 5, 7], [0, 0, 0], [8, 10, 12]])
    for perm in itertools.permutations(range(3)):
        for flip in itertools.product((False, True), repeat=3):
            other, other_grid = Reorientation(perm, flip).apply(volume, canonical)
            back = to_canonical(other_grid)
            data, grid = back.apply(other, other_grid)
            assert np.array_equal(data, volume)
            assert np.allclose(grid.affine, canonical.affine, atol=1e-9)
            assert np.array_equal(back.invert(data, other_grid), other)
            # a voxel keeps its patient position through the reorientation
            src_idx = np.argwhere(other == volume[tuple(probe[0])])
            worlds = other_grid.index_to_world(src_idx)
            assert np.min(np.linalg.norm(worlds - canonical.index_to_world(probe[0]), axis=1)) < 1e-9


def test_oblique_grids_stay_oblique_and_obliquity_is_recorded():
    oblique = _grid(_rotation(0, 0, 8) @ CANONICAL_LPS)
    assert obliquity_deg(oblique) == pytest.approx(8.0, abs=1e-6)
    assert to_canonical(oblique).is_identity
    # rows S->I and columns A->P swapped and reversed: a permutation, still 8 degrees oblique
    swapped, grid = Reorientation((0, 2, 1), (True, False, True)).apply(np.zeros(oblique.shape), oblique)
    assert obliquity_deg(grid) == pytest.approx(8.0, abs=1e-6)
    # the inverse: canonical y is the source's x reversed, canonical x the source's y
    assert to_canonical(grid) == Reorientation((0, 2, 1), (True, True, False))
    assert to_canonical(grid).grid(grid).same_as(oblique, atol_mm=1e-9)


def test_canonical_axes_point_right_inferior_posterior():
    """The store's order as the shipped nets were trained: z to the patient's right (LPS -x),
    y inferior (LPS -z), x posterior (LPS +y)."""
    ras_direction = np.diag([-1.0, -1.0, 1.0])[:, [2, 1, 0]]  # a NIfTI RAS file's (z, y, x) axes in LPS
    data, grid = to_canonical(_grid(ras_direction)).apply(np.zeros((9, 11, 13)), _grid(ras_direction))
    assert np.allclose(grid.direction, CANONICAL_LPS)
    assert data.shape == (13, 9, 11)  # R-L from the file's i, S-I from its k, A-P from its j


# ---------------------------------------------------------------- end to end
def _dcm2niix():
    exe = shutil.which("dcm2niix", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix)")
    return exe


def _to_nifti(exe, series_folder: Path, out: Path, name: str) -> Path:
    subprocess.run([exe, "-z", "y", "-b", "n", "-f", name, "-o", str(out), str(series_folder)],
                   check=True, capture_output=True)
    (found,) = out.glob(f"{name}*.nii.gz")
    if found.name != f"{name}.nii.gz":
        found = found.rename(out / f"{name}.nii.gz")
    return found


def _reoriented(img, codes: str):
    target = nib.orientations.axcodes2ornt(tuple(codes))
    return img.as_reoriented(nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine), target))


def _mirrored(img):
    """The mirror image of the knee (a right knee from a left one): the same voxels placed
    mirrored in the patient's left-right (x -> -x); every series and the truth alike."""
    data = np.asarray(img.dataobj).astype(img.get_data_dtype())
    return nib.Nifti1Image(data, np.diag([-1.0, 1.0, 1.0, 1.0]) @ img.affine)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, key_file):
    """Two held-out 2-D studies and one 3-D slab study, each as DICOM and as dcm2niix NIfTI;
    the 2-D ones also rewritten in other axis orders and mirrored; all in one store, one run."""
    if not (DEFAULT_ENGINES / "sets.json").exists():
        pytest.skip("no shipped engines")
    exe = _dcm2niix()
    from kneebatch.jobs.convert import convert
    from kneebatch.jobs.run import run

    root = tmp_path_factory.mktemp("orientation")
    generate_cohort(root / "c2d", 2, seed=HELD_OUT_SEED, workers=1, ranges=replace(PRESETS["clinical"], p_3d=0.0))
    generate_cohort(root / "c3d", 1, seed=HELD_OUT_SEED + 1, workers=1,
                    ranges=replace(PRESETS["clinical"], p_3d=1.0, p_t2_other_grid=0.0))
    src = root / "src"
    truth_of = {}  # case or StudyInstanceUID -> (truth file, variant, study)
    for cohort in ("c2d", "c3d"):
        import json

        manifest = json.loads((root / cohort / "manifest.json").read_text())
        for i, entry in enumerate(manifest["studies"]):
            study = f"{cohort}-{i}"
            dicom_dir = root / cohort / Path(entry["series"][entry["t1_series_uid"]]["folder"]).parent
            shutil.copytree(dicom_dir, src / "dicom" / study)
            truth = root / cohort / "truth" / f"{entry['study_uid']}.nii.gz"
            truth_of[entry["study_uid"]] = (truth, "dicom", study)
            tmp = root / "dcm2niix" / study
            tmp.mkdir(parents=True)
            files = {role: _to_nifti(exe, root / cohort / entry["series"][entry[f"{role.lower()}_series_uid"]]["folder"],
                                     tmp, role) for role in ("T1", "T2")}
            variants = {"dcm2niix": lambda img: img}
            if cohort == "c2d":
                variants.update({codes: (lambda c: lambda img: _reoriented(img, c))(codes) for codes in ORIENTATIONS})
                variants["mirrored"] = _mirrored
            for variant, change in variants.items():
                case = f"{variant}-{study}"
                (src / "nifti" / variant).mkdir(parents=True, exist_ok=True)
                for role, path in files.items():
                    nib.save(change(nib.load(path)), src / "nifti" / variant / f"{case}_{role}.nii.gz")
                truth_file = truth
                if variant == "mirrored":  # the truth of the mirrored knee: mirrored alike
                    truth_file = root / "mirrored-truth" / f"{case}.nii.gz"
                    truth_file.parent.mkdir(exist_ok=True)
                    nib.save(_mirrored(nib.load(truth)), truth_file)
                truth_of[case] = (truth_file, variant, study)
    report = convert(src, root / "store.zarr", key_file=key_file, show_progress=False)
    assert report.failed == 0 and report.converted == len(truth_of)
    run(root / "store.zarr", root / "out", show_progress=False)
    return root, truth_of


def _scores(root, truth_of):
    from kneebatch.ingest.store import CohortStore

    store = CohortStore(root / "store.zarr")
    out = {}
    for row in read_rows(store.keymap_path):
        truth_file, variant, study = truth_of[row["study_uid"]]
        key = row["study_key"]
        truth, how = read_label_file(truth_file, store.grid(key))
        pred = store.read_labels(key)
        dice = dice_per_label(pred, truth)
        out[(variant, study)] = {"key": key, "dice": float(np.mean(list(dice.values()))), "grid": store.grid(key),
                                 "labels": pred, "how": how, "attrs": store.study_attrs(key)}
    return out


def test_every_path_gives_the_dicom_segmentation(paths):
    root, truth_of = paths
    scores = _scores(root, truth_of)
    studies = sorted({s for _, s in scores})
    assert len(scores) == 2 * (2 + len(ORIENTATIONS) + 1) + 2
    for (variant, study), score in sorted(scores.items()):
        base = scores[("dicom", study)]
        print(f"{study} {variant}: mean Dice {score['dice']:.4f} (DICOM {base['dice']:.4f})")
        assert base["dice"] > 0.85
        assert abs(score["dice"] - base["dice"]) <= 0.01, (variant, study)
        if variant != "mirrored":
            # the same physical image: the same canonical grid and (up to float32 affines) the same labels
            assert score["grid"].same_as(base["grid"], atol_mm=1e-3)
            agree = np.mean(score["labels"] == base["labels"])
            assert agree > 0.999, (variant, study, agree)
    assert {s: scores[("dicom", s)]["attrs"]["to_canonical"]["permutation"] for s in studies}
    # dcm2niix and the other axis orders arrive in another voxel order and are reordered exactly
    for variant in ("dcm2niix", *ORIENTATIONS):
        attrs = scores[(variant, "c2d-0")]["attrs"]
        assert Reorientation.from_attrs(attrs["to_canonical"]).is_identity is False or variant == "PSR"


def test_side_is_found_from_the_anatomy_and_mirroring_swaps_it(paths):
    root, truth_of = paths
    rows = {r["study_key"]: r for r in read_rows(root / "out" / "measurements.parquet")}
    scores = _scores(root, truth_of)
    for study in ("c2d-0", "c2d-1"):
        plain, mirrored = rows[scores[("dicom", study)]["key"]], rows[scores[("mirrored", study)]["key"]]
        assert plain["knee_side_source"] == "anatomy" and mirrored["knee_side_source"] == "anatomy"
        assert {plain["knee_side"], mirrored["knee_side"]} == {"left", "right"}
        for variant in ("dcm2niix", *ORIENTATIONS):
            assert rows[scores[(variant, study)]["key"]]["knee_side"] == plain["knee_side"]
