"""No identifier leaves the keymap: store, tables, provenance, exports and console output are
scanned for every synthetic patient name, ID, birth date, accession number, institution and UID."""

from pathlib import Path

import pydicom
import pytest

from kneebatch.cli import main
from kneebatch.ingest.store import CohortStore


def _identifiers(cohort, manifest):
    ids = set()
    for entry in manifest["studies"]:
        for info in entry["series"].values():
            ds = pydicom.dcmread(next((cohort / info["folder"]).iterdir()))
            ids |= {str(ds.PatientName), ds.PatientName.family_name, ds.PatientID, ds.PatientBirthDate,
                    ds.AccessionNumber, ds.InstitutionName, str(ds.ReferringPhysicianName), ds.StudyInstanceUID,
                    ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID}
    return {i for i in ids if len(i) >= 4}


def test_no_identifiers_anywhere_but_the_keymap(cohort, manifest, tiny_engines, tmp_path, capsys, key_file):
    ids = _identifiers(cohort, manifest)
    assert len(ids) > 50
    store, out, export = tmp_path / "s.zarr", tmp_path / "out", tmp_path / "nifti"
    assert main(["convert", str(cohort / "dicom"), str(store), "--workers", "1"]) == 0
    assert main(["run", str(store), str(out), "--engines", str(tiny_engines), "--workers", "1"]) == 0
    assert main(["measure", str(store), str(tmp_path / "m"), "--labels", str(cohort / "truth"), "--workers", "1"]) == 0
    assert main(["export", str(store), str(export)]) == 0
    console = capsys.readouterr()
    text = console.out + console.err
    files = [p for root in (store, out, export, tmp_path / "m") for p in Path(root).rglob("*") if p.is_file()]
    assert len(files) > 50
    for ident in ids:
        assert ident not in text
        for path in files:
            if path.name != "keymap.parquet":
                assert ident.encode() not in path.read_bytes(), (path.relative_to(tmp_path), ident)
    assert any(ident.encode() in (store / "keymap.parquet").read_bytes() for ident in ids)


def test_study_keys_cannot_name_paths(store):
    s = CohortStore(store)
    for bad in ("../escape", "/etc", "k..", "K0123456789"):
        with pytest.raises(ValueError, match="not a study key"):
            s.has_study(bad)


@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_results_follow_the_umask_and_only_the_identifiers_stay_private(cohort, tiny_engines, tmp_path, key_file,
                                                                         mask):
    """Colleagues in a shared project folder can read the results (as the umask allows); the keymap
    (identifiers) and the study-key secret are the owner's alone."""
    import os
    import stat

    old = os.umask(mask)
    try:
        store, out = tmp_path / "s.zarr", tmp_path / "out"
        key = tmp_path / "study.key"
        assert main(["convert", str(cohort / "dicom"), str(store), "--workers", "1", "--key-file", str(key)]) == 0
        assert main(["run", str(store), str(out), "--engines", str(tiny_engines), "--workers", "1", "-q"]) == 0
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    shared = 0o666 & ~mask
    for path in (out / "measurements.parquet", out / "failures.parquet", out / "provenance.json",
                 store / "failures.parquet", store / "visits.parquet", *sorted((out / "parts").glob("*.arrow"))):
        assert mode(path) == shared, path.name
    assert mode(store / "keymap.parquet") == 0o600 and mode(key) == 0o600
