"""Inputs that would leak, vanish or skew a cohort (issue 27): colliding UIDs, impossible
geometry, junk and special files in the source, header values in messages.

Every DICOM file here is written from scratch with pydicom (no kneebatch writer), the NIfTI
with nibabel, so the inputs are made independently of the code that reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from kneebatch.cli import main
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.convert import convert
from kneebatch.keys import load_or_create_key, study_key
from kneebatch.outputs import read_rows

SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # rows along +y, columns along -z: slice normal along x
ROWS = COLS = 32
N_SLICES = 12


def write_series(folder: Path, study_uid: str, *, patient="PAT-A", date="20240102", series_uid=None,
                 contrast="T1", orientation=SAGITTAL, spacing=(0.5, 0.5), n=N_SLICES, float_pixels=False,
                 seed=0, **extra) -> list[Path]:
    """A sagittal MR series of ``n`` slices, 3 mm apart, one file per slice (pydicom only)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    tr, te = (500.0, 15.0) if contrast == "T1" else (3000.0, 80.0)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:ROWS, :COLS]
    paths = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.StudyDate, ds.Modality = patient, date, "MR"
        ds.SeriesDescription = f"sag {contrast}"
        ds.RepetitionTime, ds.EchoTime = tr, te
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [3.0 * i, 0.0, 0.0]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = 3.0
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        image = 100 + 10 * yy + 5 * xx + rng.integers(0, 20, (ROWS, COLS)) + 30 * i
        if float_pixels:
            ds.BitsAllocated = 32
            ds.FloatPixelData = image.astype(np.float32).tobytes()
        else:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.PixelData = image.astype(np.uint16).tobytes()
        for k, v in extra.items():
            setattr(ds, k, v)
        path = folder / f"{contrast}-{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_study(folder: Path, study_uid: str | None = None, **kw) -> str:
    study_uid = study_uid or generate_uid()
    write_series(folder / "t1", study_uid, contrast="T1", **kw)
    write_series(folder / "t2", study_uid, contrast="T2", **{k: v for k, v in kw.items() if k in ("patient", "date")})
    return study_uid


def convert_rows(src, tmp_path, key_file):
    report = convert(src, tmp_path / "store.zarr", key_file=key_file, show_progress=False)
    failures = {r["study_key"]: r for r in read_rows(tmp_path / "store.zarr" / "failures.parquet")}
    return report, failures, CohortStore(tmp_path / "store.zarr"), load_or_create_key(key_file)


# ------------------------------------------------------------------ colliding studies
@pytest.mark.parametrize("second", [dict(patient="PAT-B"), dict(date="20240303")], ids=["two-patients", "two-dates"])
def test_one_study_uid_with_two_patients_or_dates_is_refused_and_nothing_merged(tmp_path, key_file, second):
    uid = generate_uid()
    write_study(tmp_path / "src" / "a", uid)  # a PACS or anonymiser fault: one UID, two studies
    write_series(tmp_path / "src" / "b", uid, contrast="T1", seed=1, **second)
    good = write_study(tmp_path / "src" / "good")
    report, failures, store, key = convert_rows(tmp_path / "src", tmp_path, key_file)
    assert report.studies_found == 2 and report.converted == 1 and report.failed == 1
    assert failures[study_key(uid, key)]["reason"] == "uid_collision"
    assert store.study_keys() == [study_key(good, key)]
    keymap = {r["study_key"]: r for r in read_rows(store.keymap_path)}
    assert keymap[study_key(uid, key)]["patient_id"] is None  # neither patient is attached to it


def test_a_series_uid_in_two_studies_fails_both(tmp_path, key_file):
    shared = generate_uid()
    a = write_study(tmp_path / "src" / "a", series_uid=shared, patient="PAT-A")
    b = write_study(tmp_path / "src" / "b", series_uid=shared, patient="PAT-B")
    report, failures, store, key = convert_rows(tmp_path / "src", tmp_path, key_file)
    assert report.failed == 2 and report.converted == 0 and store.study_keys() == []
    assert {failures[study_key(u, key)]["reason"] for u in (a, b)} == {"uid_collision"}


def test_one_series_uid_over_two_geometries_is_refused(tmp_path, key_file):
    uid, series = generate_uid(), generate_uid()
    write_series(tmp_path / "src" / "a", uid, series_uid=series)
    write_series(tmp_path / "src" / "b", uid, series_uid=series, orientation=[0, 1, 0, 1, 0, 0], seed=2)  # coronal
    write_series(tmp_path / "src" / "t2", uid, contrast="T2")
    report, failures, store, key = convert_rows(tmp_path / "src", tmp_path, key_file)
    assert failures[study_key(uid, key)]["reason"] == "uid_collision" and store.study_keys() == []


# ------------------------------------------------------------------ impossible geometry
def test_pixel_data_longer_than_rows_times_columns_is_refused(tmp_path, key_file):
    uid = write_study(tmp_path / "src" / "s")
    path = sorted((tmp_path / "src" / "s" / "t1").iterdir())[5]
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData * 2  # twice the bytes 32 x 32 x 16 bits describe
    ds.save_as(path)
    report, failures, store, key = convert_rows(tmp_path / "src", tmp_path, key_file)
    assert failures[study_key(uid, key)]["reason"] == "pixel_data_length" and store.study_keys() == []


def test_nan_float_pixels_are_refused_not_stored_as_zero(tmp_path, key_file):
    uid = write_study(tmp_path / "src" / "s", float_pixels=True)
    path = sorted((tmp_path / "src" / "s" / "t1").iterdir())[3]
    ds = pydicom.dcmread(path)
    pixels = np.frombuffer(ds.FloatPixelData, np.float32).copy()
    pixels[100] = np.nan
    ds.FloatPixelData = pixels.tobytes()
    ds.save_as(path)
    report, failures, store, key = convert_rows(tmp_path / "src", tmp_path, key_file)
    assert failures[study_key(uid, key)]["reason"] == "non_finite_values" and store.study_keys() == []


@pytest.mark.parametrize("bad", [dict(spacing=(-0.5, 0.5)), dict(spacing=(0.0, 0.5)),
                                 dict(orientation=[0.0] * 6), dict(orientation=[float("nan")] + SAGITTAL[1:]),
                                 dict(orientation=[0.0, 1.0, 0.0, 0.0, 0.6, -0.8])],
                         ids=["negative-spacing", "zero-spacing", "zero-orientation", "nan-orientation",
                              "not-orthogonal"])
def test_a_series_with_impossible_geometry_is_left_out_with_its_reason(tmp_path, key_file, bad):
    uid = generate_uid()
    write_series(tmp_path / "src" / "t1", uid, contrast="T1", **bad)
    write_series(tmp_path / "src" / "t2", uid, contrast="T2")
    report, failures, store, key = convert_rows(tmp_path / "src", tmp_path, key_file)
    k = study_key(uid, key)
    assert store.study_keys() == [k] and store.channels(k) == ["T2"]  # a T2-only study ...
    left_out = [r for r in store.study_attrs(k)["series"] if not r["used"]]
    assert left_out == [{"role": None, "used": False, "reason": "bad_geometry", "n_files": N_SLICES}]  # ... says why
    # the same fault in every series: the study is refused, never measured
    uid2 = generate_uid()
    for contrast in ("T1", "T2"):
        write_series(tmp_path / "src2" / contrast, uid2, contrast=contrast, **bad)
    report, failures, store, key = convert_rows(tmp_path / "src2", tmp_path / "x", key_file)
    assert failures[study_key(uid2, key)]["reason"] == "bad_geometry" and store.study_keys() == []


# ------------------------------------------------------------------ junk in the source
def test_junk_and_special_files_are_never_parsed(tmp_path, key_file, monkeypatch):
    src = tmp_path / "src"
    uid = write_study(src / "dicom")
    junk = src / "backup" / "disk.img"  # 3 GB of zeros, sparse: parsed, it would stall the scan
    junk.parent.mkdir()
    with open(junk, "wb") as f:
        f.truncate(3 * 1024 ** 3)
    (src / "notes.bin").write_bytes(os.urandom(4096))
    os.mkfifo(src / "pipe")  # a FIFO: reading it blocks for ever
    nifti = src / "nifti"
    nifti.mkdir()
    affine = np.diag([3.0, 0.5, 0.5, 1.0])
    t2 = np.random.default_rng(0).integers(0, 400, (12, 32, 32)).astype(np.int16)
    nib.save(nib.Nifti1Image(t2, affine), nifti / "knee1_T2.nii.gz")
    os.symlink("/dev/zero", nifti / "knee1_T1.nii.gz")  # a device named as the case's T1
    parsed = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda p, *a, **k: parsed.append(str(p)) or real(p, *a, **k))
    report, failures, store, key = convert_rows(src, tmp_path, key_file)
    assert not [p for p in parsed if Path(p).name in ("disk.img", "notes.bin", "pipe")]
    reasons = sorted(r["reason"] for r in failures.values() if r["stage"] == "scan")
    assert reasons == ["not_dicom", "not_dicom", "special_file", "special_file"]
    assert report.converted == 2 and study_key(uid, key) in store.study_keys()
    knee1 = study_key("knee1", key)
    assert store.channels(knee1) == ["T2"]
    assert [r for r in store.study_attrs(knee1)["series"] if not r["used"]] == [
        {"role": "T1", "used": False, "reason": "special_file"}]


# ------------------------------------------------------------------ no header value in a message
SECRET = "Zsecretname^Zq"


def test_failure_messages_and_console_never_quote_header_values(tmp_path, key_file, capsys):
    src = tmp_path / "src"
    text = dict(SeriesDescription=SECRET, ProtocolName=SECRET, SequenceName=SECRET, Manufacturer=SECRET,
                BodyPartExamined=SECRET[:16], InstitutionName=SECRET, ReferringPhysicianName=SECRET)
    write_study(src / "ok", patient=SECRET, **text)
    write_series(src / "not-mr", generate_uid(), Modality=SECRET[:16], **text)  # not_mr
    write_series(src / "few", generate_uid(), n=3, **text)  # too_few_slices
    write_series(src / "axial", generate_uid(), orientation=[1, 0, 0, 0, 1, 0], **text)  # not_sagittal
    uid = generate_uid()
    write_study(src / "collide-a", uid, patient=SECRET)
    write_series(src / "collide-b", uid, patient=SECRET + "2", seed=3)  # uid_collision
    report_only = write_series(src / "sr", generate_uid(), n=1, **text)[0]  # not_an_image
    ds = pydicom.dcmread(report_only)
    del ds.Rows, ds.Columns, ds.PixelData
    ds.Modality = SECRET[:16]
    ds.ImageType = [SECRET[:16]]
    ds.save_as(report_only)
    assert main(["convert", str(src), str(tmp_path / "store.zarr"), "--key-file", str(key_file), "-q",
                 "--workers", "1"]) == 0
    console = capsys.readouterr()
    rows = read_rows(tmp_path / "store.zarr" / "failures.parquet")
    assert {r["reason"] for r in rows} >= {"not_mr", "too_few_slices", "not_sagittal", "uid_collision", "not_an_image"}
    found = [str(r) for r in rows if "secret" in str(r).lower()]
    assert not found and "secret" not in (console.out + console.err).lower()
