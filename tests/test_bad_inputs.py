"""A corpus of bad inputs converted in one run: every one becomes a failure row with its
reason, and the intact studies beside them still convert."""

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.convert import convert
from kneebatch.keys import load_or_create_key, study_key
from kneebatch.outputs import read_rows


def _t1_files(cohort, entry, root):
    folder = root / Path(entry["series"][entry["t1_series_uid"]]["folder"]).name
    return sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).SliceLocation))


def _copy_study(cohort, entry, dst):
    src = cohort / Path(entry["series"][entry["t1_series_uid"]]["folder"]).parent
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def corpus(cohort, manifest, key_file, tmp_path_factory):
    src = tmp_path_factory.mktemp("bad")
    expect_files = {}  # file name -> reason (stage scan)
    expect_studies = {}  # study uid -> reason (stage convert)
    # files from pydicom's own test data
    for name, reason in [("MR_small.dcm", "not_sagittal"), ("MR_small_RLE.dcm", "not_sagittal"),
                         ("CT_small.dcm", "not_mr"), ("rtplan.dcm", "not_an_image")]:
        shutil.copy(get_testdata_file(name), src / name)
        ds = pydicom.dcmread(src / name)
        if reason == "not_an_image":
            expect_files[name] = reason
        else:
            expect_studies[ds.StudyInstanceUID] = reason
    shutil.copy(get_testdata_file("zipMR.gz"), src / "zipMR.gz")
    expect_files["zipMR.gz"] = "not_dicom"
    (src / "empty").write_bytes(b"")
    expect_files["empty"] = "not_dicom"
    (src / "notes.txt").write_text("scan notes, not an image\n")
    expect_files["notes.txt"] = "not_dicom"
    os.symlink(src / "does-not-exist", src / "dangling")
    expect_files["dangling"] = "unreadable_file"
    (src / "loop").mkdir()
    os.symlink(src / "loop", src / "loop" / "again")  # a directory link loop must not trap the walk

    entries = manifest["studies"]
    # 0: intact, with its T1 slices RLE-compressed (decoded by pydicom itself)
    root = _copy_study(cohort, entries[0], src / "s0")
    for p in _t1_files(cohort, entries[0], root):
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless)
        ds.save_as(p)
    # 1: pixel data shorter than the header says
    root = _copy_study(cohort, entries[1], src / "s1")
    p = _t1_files(cohort, entries[1], root)[4]
    ds = pydicom.dcmread(p)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(p)
    expect_studies[entries[1]["study_uid"]] = "pixel_data_length"  # half the bytes the header describes
    # 2: absurd dimensions in every T1 header: refused before any pixel is read
    root = _copy_study(cohort, entries[2], src / "s2")
    for p in _t1_files(cohort, entries[2], root):
        ds = pydicom.dcmread(p)
        ds.Rows, ds.Columns = 60000, 60000
        ds.save_as(p)
    expect_studies[entries[2]["study_uid"]] = "too_large"
    # 3: only the axial PD series (no sagittal series at all)
    root = _copy_study(cohort, entries[3], src / "s3")
    for info in entries[3]["series"].values():
        ds = pydicom.dcmread(next((root / Path(info["folder"]).name).iterdir()))
        if ds.SeriesDescription != "AX PD FS":
            shutil.rmtree(root / Path(info["folder"]).name)
    expect_studies[entries[3]["study_uid"]] = "not_sagittal"
    # 4: enhanced multi-frame objects only
    root = src / "s4"
    root.mkdir()
    t1_folder = cohort / Path(entries[4]["series"][entries[4]["t1_series_uid"]]["folder"]).parent
    ds = pydicom.dcmread(_t1_files(cohort, entries[4], t1_folder)[0])
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.NumberOfFrames = 12
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.save_as(root / "enhanced")
    # its frames carry no position (no functional groups): the series is refused
    # (classify: multiframe_no_positions) and the study has no other
    expect_studies[ds.StudyInstanceUID] = "no_usable_series"
    # a single sagittal slice
    ds.StudyInstanceUID = ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.NumberOfFrames = 1
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.save_as(root / "single")
    expect_studies[ds.StudyInstanceUID] = "too_few_slices"
    # 5: a JPEG 2000 transfer syntax with data no decoder can read
    root = _copy_study(cohort, entries[5], src / "s5")
    p = _t1_files(cohort, entries[5], root)[0]
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds.save_as(p, enforce_file_format=True)
    expect_studies[entries[5]["study_uid"]] = "unreadable_pixels"

    report = convert(src, tmp_path_factory.mktemp("bad-store") / "s.zarr", key_file=key_file, show_progress=False)
    return src, report, expect_files, expect_studies


def test_every_bad_input_has_a_row_and_the_good_study_converts(corpus, manifest, key_file):
    src, report, expect_files, expect_studies = corpus
    key = load_or_create_key(key_file)
    keymap = {r["study_key"]: r for r in read_rows(_store_of(report) / "keymap.parquet")}
    failures = {r["study_key"]: r for r in read_rows(_store_of(report) / "failures.parquet")}
    by_path = {os.path.basename(r["source_path"]): k for k, r in keymap.items() if r["study_uid"] == ""}
    for name, reason in expect_files.items():
        f = failures[by_path[name]]
        assert (f["stage"], f["reason"]) == ("scan", reason), name
    for uid, reason in expect_studies.items():
        f = failures[study_key(uid, key)]
        assert (f["stage"], f["reason"]) == ("convert", reason), (uid, f)
    assert report.files_rejected == len(expect_files)
    assert report.failed == len(expect_studies)
    converted = CohortStore(_store_of(report)).study_keys()
    assert converted == [study_key(manifest["studies"][0]["study_uid"], key)]
    # every study and rejected file is in exactly one place
    assert set(failures) | set(converted) == set(keymap)
    assert not set(failures) & set(converted)


def test_failure_messages_help_and_hold_no_paths(corpus):
    src, report, _, _ = corpus
    failures = read_rows(_store_of(report) / "failures.parquet")
    for f in failures:
        assert f["message"] and str(src) not in f["message"]
    msgs = {f["reason"]: f["message"] for f in failures}
    from pydicom.pixels.decoders.base import get_decoder

    # no JPEG 2000 decoder: the message says what to install; with one, the bogus code stream fails to decode
    decoder = get_decoder(pydicom.uid.JPEG2000Lossless).is_available
    assert ("kneebatch[dicom-codecs]" in msgs["unreadable_pixels"]) is (not decoder)
    assert msgs["unreadable_pixels"].startswith("pixel data could not be decoded: ") and "slice" in msgs["unreadable_pixels"]
    assert "60000 x 60000" in msgs["too_large"]


def test_rle_compressed_study_decodes_exactly(corpus, manifest, key_file, store):
    _, report, _, _ = corpus
    key = study_key(manifest["studies"][0]["study_uid"], load_or_create_key(key_file))
    a, _ = CohortStore(_store_of(report)).read_image(key)
    b, _ = CohortStore(store).read_image(key)
    assert np.array_equal(a, b)


def _store_of(report):
    return Path(report.store_path)
