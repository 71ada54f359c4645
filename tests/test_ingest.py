import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from kneebatch.geometry import CANONICAL_LPS, Grid, resample, to_canonical
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.convert import convert
from kneebatch.keys import load_or_create_key, study_key
from kneebatch.outputs import read_rows
from kneebatch.synth.cohort import plan_subject, render_subject
from tests.conftest import HARD, SEED


def _key(uid, key_file):
    return study_key(uid, load_or_create_key(key_file))


def _series_attrs(store, key, role):
    (record,) = [r for r in store.study_attrs(key)["series"] if r["role"] == role]
    return record


def _rendered(entry):
    plan = plan_subject(SEED, entry["index"], HARD)
    images, _ = render_subject(plan)
    return plan, images


def test_store_geometry_is_exact(store, manifest, key_file):
    s = CohortStore(store)
    assert len(s.study_keys()) == 6
    for entry in manifest["studies"]:
        key = _key(entry["study_uid"], key_file)
        t1 = entry["series"][entry["t1_series_uid"]]
        grid = s.grid(key)
        assert grid.shape == tuple(t1["shape_zyx"])
        # DICOM DS strings carry 10 significant digits: sub-micrometre agreement
        assert np.abs(grid.affine - np.array(t1["affine"])).max() < 1e-5
        assert s.channels(key) == ["T1", "T2FS"]  # the synthetic T2 is fat-suppressed (ScanOptions FS)
        assert s.study_attrs(key)["reference_role"] == "T1"


def test_slices_ordered_by_position_not_files(store, manifest, key_file):
    """The T1 channel equals the rendered volume voxel for voxel, also for shuffled file order."""
    s = CohortStore(store)
    assert any(e["shuffled_files"] for e in manifest["studies"])
    for entry in manifest["studies"]:
        plan, images = _rendered(entry)
        image, _ = s.read_image(_key(entry["study_uid"], key_file))
        assert image.dtype == np.uint16
        assert np.array_equal(image[0], images[plan.t1.series.uid])


def test_t2_on_another_grid_is_resampled_onto_t1(store, manifest, key_file):
    s = CohortStore(store)
    other = [e for e in manifest["studies"] if not e["t2_on_t1_grid"]]
    same = [e for e in manifest["studies"] if e["t2_on_t1_grid"]]
    assert other and same
    for entry in other:
        plan, images = _rendered(entry)
        key = _key(entry["study_uid"], key_file)
        image, grid = s.read_image(key)
        expected = np.clip(np.rint(resample(images[plan.t2.series.uid], plan.t2.grid, grid)), 0, 65535)
        assert np.array_equal(image[1], expected.astype(np.uint16))
        t2 = _series_attrs(s, key, "T2FS")
        assert t2["resampled_to_reference"] is True and t2["overlap_fraction"] > 0.5
        assert t2["shape_zyx"] == list(plan.t2.grid.shape)
    for entry in same:
        plan, images = _rendered(entry)
        image, _ = s.read_image(_key(entry["study_uid"], key_file))
        assert np.array_equal(image[1], images[plan.t2.series.uid])


def test_geometry_agrees_with_dcm2niix(cohort, store, manifest, key_file, tmp_path):
    """An independent converter puts every voxel at the same patient position."""
    exe = shutil.which("dcm2niix", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix)")
    s = CohortStore(store)
    for entry in manifest["studies"][:3]:
        folder = cohort / entry["series"][entry["t1_series_uid"]]["folder"]
        out = tmp_path / entry["study_uid"]
        out.mkdir()
        subprocess.run([exe, "-z", "y", "-b", "n", "-f", "t1", "-o", str(out), str(folder)],
                       check=True, capture_output=True)
        ref = nib.load(next(out.glob("t1*.nii.gz")))
        ref_data = np.asarray(ref.dataobj)
        image, grid = s.read_image(_key(entry["study_uid"], key_file))
        rng = np.random.default_rng(0)
        idx = np.stack([rng.integers(0, n, 500) for n in grid.shape], 1)
        lps = grid.index_to_world(idx)
        ras = lps * [-1, -1, 1]
        ijk = (np.linalg.inv(ref.affine) @ np.c_[ras, np.ones(len(ras))].T)[:3].T
        assert np.abs(ijk - np.round(ijk)).max() < 1e-3  # lands on dcm2niix voxel centres
        ijk = np.round(ijk).astype(int)
        assert np.array_equal(ref_data[ijk[:, 0], ijk[:, 1], ijk[:, 2]], image[0][tuple(idx.T)])


def _copy_study(cohort, entry, dst):
    src = cohort / Path(entry["series"][entry["t1_series_uid"]]["folder"]).parent
    shutil.copytree(src, dst / src.name)
    return dst / src.name


def test_flat_shuffled_tree_with_mixed_studies(cohort, manifest, key_file, store, tmp_path):
    """All files of three studies in one folder under random names: same store content."""
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(1)
    files = [p for e in manifest["studies"][:3] for p in
             (cohort / Path(e["series"][e["t1_series_uid"]]["folder"]).parent).rglob("*") if p.is_file()]
    names = rng.permutation(len(files))
    for p, n in zip(files, names):
        shutil.copy(p, flat / f"IM{n:05d}")
    (flat / "README.txt").write_text("not dicom")
    report = convert(flat, tmp_path / "flat.zarr", key_file=key_file, show_progress=False)
    assert (report.studies_found, report.converted, report.failed, report.files_rejected) == (3, 3, 0, 1)
    scan = [f for f in read_rows(tmp_path / "flat.zarr" / "failures.parquet") if f["stage"] == "scan"]
    assert [f["reason"] for f in scan] == ["not_dicom"] and "README" not in scan[0]["message"]
    ref, new = CohortStore(store), CohortStore(tmp_path / "flat.zarr")
    for e in manifest["studies"][:3]:
        k = _key(e["study_uid"], key_file)
        a, ga = ref.read_image(k)
        b, gb = new.read_image(k)
        assert np.array_equal(a, b) and ga.same_as(gb, atol_mm=0)


def _series_files(root, entry, role):
    uid = entry[f"{role}_series_uid"]
    folder = root / Path(entry["series"][uid]["folder"]).name
    return sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).SliceLocation))


def test_broken_studies_fail_with_reasons_and_the_rest_converts(cohort, manifest, key_file, tmp_path):
    src = tmp_path / "src"
    entries = manifest["studies"][:5]
    roots = [_copy_study(cohort, e, src / str(i)) for i, e in enumerate(entries)]
    # 0: a slice missing from the middle of T1
    files = _series_files(roots[0], entries[0], "t1")
    files[len(files) // 2].unlink()
    # 1: a duplicate slice (same position, new SOP instance)
    files = _series_files(roots[1], entries[1], "t1")
    ds = pydicom.dcmread(files[3])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(files[3].parent / "dup")
    # 2: no T2 series: stored with its T1 alone (run then records unsupported_contrast)
    shutil.rmtree(_series_files(roots[2], entries[2], "t2")[0].parent)
    # 3: one slice with another matrix size
    files = _series_files(roots[3], entries[3], "t1")
    ds = pydicom.dcmread(files[2])
    ds.Rows, ds.Columns = 8, 8
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    ds.save_as(files[2])
    # 4: intact
    report = convert(src, tmp_path / "s.zarr", key_file=key_file, show_progress=False)
    assert (report.studies_found, report.converted, report.failed) == (5, 2, 3)
    failures = {f["study_key"]: f for f in read_rows(tmp_path / "s.zarr" / "failures.parquet")}
    expected = {0: "missing_slice", 1: "duplicate_slice", 3: "inconsistent_size"}
    for i, reason in expected.items():
        f = failures[_key(entries[i]["study_uid"], key_file)]
        assert f["reason"] == reason and f["stage"] == "convert" and f["message"]
    s = CohortStore(tmp_path / "s.zarr")
    assert s.study_keys() == sorted(_key(entries[i]["study_uid"], key_file) for i in (2, 4))
    assert s.channels(_key(entries[2]["study_uid"], key_file)) == ["T1"]
    assert "1 slice(s) missing" in failures[_key(entries[0]["study_uid"], key_file)]["message"]
    # every study found is in the keymap and in exactly one of store / failures
    keymap = read_rows(tmp_path / "s.zarr" / "keymap.parquet")
    assert len(keymap) == 5
    assert {r["study_key"] for r in keymap} == set(failures) | set(s.study_keys())
    assert not set(failures) & set(s.study_keys())


def test_mixed_series_pick_the_sagittal_t1_and_t2(store, manifest, key_file):
    s = CohortStore(store)
    for entry in manifest["studies"]:
        roles = sorted(v["role"] for v in entry["series"].values())
        assert roles == ["other", "other", "t1", "t2"]  # an axial PD and a localizer besides
        key = _key(entry["study_uid"], key_file)
        attrs = s.study_attrs(key)
        assert attrs["n_series_in_study"] == 4
        assert [r["role"] for r in attrs["series"] if r["used"]] == ["T1", "T2FS"]
        # the axial PD and the localizer are left out, each with its reason
        assert sorted(r["reason"] for r in attrs["series"] if not r["used"]) == ["localizer", "not_sagittal"]
        assert _series_attrs(s, key, "T1")["repetition_time_ms"] < 1000
        assert _series_attrs(s, key, "T2FS")["echo_time_ms"] >= 50


def test_rerun_resumes_and_changes_nothing(cohort, store, key_file):
    before = {p: p.stat().st_mtime_ns for p in Path(store).rglob("*.json")}
    report = convert(cohort / "dicom", store, key_file=key_file, show_progress=False)
    assert (report.converted, report.already_done, report.failed) == (0, 6, 0)
    assert {p: p.stat().st_mtime_ns for p in Path(store).rglob("*.json")} == before


def test_no_identifiers_in_the_store_except_keymap(cohort, store, manifest):
    ids = []
    for entry in manifest["studies"]:
        folder = cohort / entry["series"][entry["t1_series_uid"]]["folder"]
        ds = pydicom.dcmread(next(folder.iterdir()))
        ids += [str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber, ds.InstitutionName,
                entry["study_uid"], ds.SeriesInstanceUID]
    for path in Path(store).rglob("*"):
        if path.is_file() and path.name != "keymap.parquet":
            data = path.read_bytes()
            for ident in ids:
                assert ident.encode() not in data, (path.name, ident)
    keymap = read_rows(Path(store) / "keymap.parquet")
    assert {r["study_uid"] for r in keymap} == {e["study_uid"] for e in manifest["studies"]}


def test_study_keys_depend_on_the_secret(tmp_path):
    k1 = load_or_create_key(tmp_path / "a.key")
    k2 = load_or_create_key(tmp_path / "b.key")
    assert load_or_create_key(tmp_path / "a.key") == k1
    assert (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600
    assert study_key("1.2.3", k1) != study_key("1.2.3", k2)
    assert study_key("1.2.3", k1) == study_key("1.2.3", k1) and len(study_key("1.2.3", k1)) == 21


def test_nifti_pairs_convert_with_geometry_and_reject_nan(tmp_path, key_file):
    rng = np.random.default_rng(0)
    # sagittal slices, every axis reversed against the store's order (z to the left, y superior, x anterior)
    direction = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]).T
    t1_grid = Grid.from_parts((12, 40, 36), (3.0, 0.5, 0.5), (30.0, -20.0, 40.0), direction)
    t2_grid = Grid.from_parts((10, 30, 30), (3.5, 0.6, 0.6), (29.0, -19.0, 39.0), direction)
    t1 = rng.integers(0, 4000, t1_grid.shape).astype(np.int16)
    t2 = rng.random(t2_grid.shape).astype(np.float32) * 100
    from kneebatch.geometry import affine_to_nifti

    def save(arr, grid, name):
        nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0), affine_to_nifti(grid.affine)), tmp_path / name)

    save(t1, t1_grid, "caseA_T1.nii.gz")
    save(t2, t2_grid, "caseA_T2.nii.gz")
    bad = t2.copy()
    bad[0, 0, 0] = np.nan
    save(t1, t1_grid, "caseB_0000.nii.gz")
    save(bad, t2_grid, "caseB_0001.nii.gz")
    save(t1, t1_grid, "caseC_T1.nii.gz")
    report = convert(tmp_path, tmp_path / "n.zarr", key_file=key_file, show_progress=False)
    assert (report.studies_found, report.converted, report.failed) == (3, 2, 1)
    assert report.reasons == {"non_finite_values": 1}
    s = CohortStore(tmp_path / "n.zarr")
    image, grid = s.read_image(_key("caseA", key_file))
    expected, expected_grid = to_canonical(t1_grid).apply(t1.astype(np.uint16), t1_grid)
    assert to_canonical(t1_grid).flip == (True, True, True)
    assert grid.same_as(expected_grid, atol_mm=1e-4) and np.allclose(grid.direction, CANONICAL_LPS)
    assert np.array_equal(image[0], expected)
    assert _series_attrs(s, _key("caseA", key_file), "T2")["resampled_to_reference"] is True
    assert s.channels(_key("caseC", key_file)) == ["T1"]


def test_metaimage_round_trip_and_training_folder_import(tmp_path, key_file):
    from kneebatch.ingest.label_import import import_labels
    from kneebatch.ingest.metaimage import read_metaimage, write_metaimage
    from kneebatch.label_sets import parse_label_map

    # an oblique sagittal stack (its 3 mm slice axis within 30 degrees of left-right)
    direction = np.linalg.qr(np.array([[0.1, 1.0, 0.2], [0.9, 0.0, 0.3], [0.2, 0.1, -1.0]]))[0][:, [1, 0, 2]]
    grid = Grid.from_parts((7, 20, 16), (3.0, 0.5, 0.4), (10.0, -5.0, 2.5), direction)
    rng = np.random.default_rng(3)
    t1 = rng.integers(0, 3000, grid.shape).astype(np.uint16)
    write_metaimage(tmp_path / "knee01_0000.mha", t1, grid)
    data, g = read_metaimage(tmp_path / "knee01_0000.mha")
    assert np.array_equal(data, t1) and g.same_as(grid, atol_mm=1e-6)
    write_metaimage(tmp_path / "knee01_0001.mha", t1 // 2, grid)
    seg = np.zeros(grid.shape, np.uint8)
    seg[2:4, 5:9, 3:7] = 1  # OAI-ZIB: 1 femur, 2 femoral cartilage
    seg[4, 5:9, 3:7] = 2
    (tmp_path / "labels").mkdir()
    write_metaimage(tmp_path / "labels" / "knee01.mha", seg, grid)
    report = convert(tmp_path, tmp_path / "t.zarr", key_file=key_file, show_progress=False)
    assert (report.studies_found, report.converted) == (1, 1)
    n, missing = import_labels(tmp_path / "t.zarr", tmp_path / "labels", name="truth",
                               label_map=parse_label_map("1:femur,2:femoral_cartilage"))
    assert (n, missing) == (1, [])
    s = CohortStore(tmp_path / "t.zarr")
    truth = s.read_labels(s.study_keys()[0], "truth")
    assert int((truth == 1).sum()) == 2 * 4 * 4 and int((truth == 5).sum()) == 16 and truth.max() == 5
