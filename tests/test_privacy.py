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
