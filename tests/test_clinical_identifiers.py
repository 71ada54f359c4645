"""``kneebatch clinical`` finds identifiers by value, not only by column name: under innocent
column names, inside free text, in any letter case and date format; refuses the table (exit 2,
one line naming columns and kinds, never a value, nothing written); ``--drop`` and ``--keep``;
and an epidemiologist's table (age, sex, BMI, KL, WOMAC, visit) passes unchanged.

The tables and the store are made by hand here (csv, pyarrow), not by kneebatch's generator,
except for one test on a real converted store's keymap.
"""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kneebatch.cli import main

KEY = "c0ffee" * 8  # the study-key secret of the hand-made store

# an OAI-like clinical table, one row per subject and visit (subject IDs as the OAI writes them)
OAI_HEADER = ["ID", "visit", "side", "age", "sex", "BMI", "KL", "WOMAC_pain", "WOMAC_total", "cartilage_mm3",
              "height_m", "group"]
OAI_ROWS = [
    ["9000099", "V00", "R", "61", "F", "27.4", "2", "5", "23.5", "1234.5", "1.62", "OA"],
    ["9000099", "V01", "R", "62", "F", "27.9", "3", "7", "31", "1198.25", "1.62", "OA"],
    ["9000296", "V00", "L", "58", "M", "24.1", "0", "0", "2", "1710.0", "1.80", "normal"],
    ["9000296", "V06", "L", "62", "M", "25", "1", "1", "4.5", "1702.75", "1.80", "normal"],
]
OAI_TYPED = {"visit": ["V00", "V01", "V00", "V06"], "side": ["R", "R", "L", "L"], "age": [61, 62, 58, 62],
             "sex": ["F", "F", "M", "M"], "BMI": [27.4, 27.9, 24.1, 25.0], "KL": [2, 3, 0, 1],
             "WOMAC_pain": [5, 7, 0, 1], "WOMAC_total": [23.5, 31.0, 2.0, 4.5],
             "cartilage_mm3": [1234.5, 1198.25, 1710.0, 1702.75], "height_m": [1.62, 1.62, 1.80, 1.80],
             "group": ["OA", "OA", "normal", "normal"]}


@pytest.fixture
def hand_store(tmp_path):
    """An empty cohort store with its key's fingerprint and a keymap, written with pyarrow."""
    from kneebatch.ingest.store import CohortStore
    from kneebatch.keys import key_fingerprint

    (tmp_path / "study.key").write_text(KEY + "\n")
    s = CohortStore(tmp_path / "store")
    s.check_key(key_fingerprint(KEY.encode()))
    pq.write_table(pa.table({"study_key": ["k" + "0" * 20], "study_uid": ["1.2.3.4.5.6.7.8.9"],
                             "source_path": ["/archive/dicom/4471122/20040312"], "patient_id": ["4471122"],
                             "study_date": ["20040312"], "subject_key": ["s" + "0" * 20]}), s.keymap_path)
    return s.path


def _csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _with(column, values):
    """The OAI table with one more column (``values``: one per row, missing ones empty)."""
    values = list(values) + [""] * (len(OAI_ROWS) - len(values))
    return [*OAI_HEADER, column], [[*r, v] for r, v in zip(OAI_ROWS, values)]


def _clinical(store, table, out, *options):
    return main(["clinical", str(store), str(table), str(out), "--key-file", str(store.parent / "study.key"),
                 *options])


def _err_line(capsys) -> str:
    said = capsys.readouterr()
    err = said.err.strip().splitlines()
    assert len(err) == 1 and not said.out, said  # one line, no traceback, nothing claimed done
    return err[0]


def _refusal(columns: str) -> str:
    return f"kneebatch clinical: error: identifiers found by value in {columns}: nothing written. "


# ---------------------------------------------------------------- found by value
@pytest.mark.parametrize("column, value, kinds", [
    ("ref", "1.2.840.113619.2.55.3.604688119.971.1234", "uid"),  # a StudyInstanceUID under 'ref'
    ("v1", "19610304", "date, long_number"),  # a birth date as DICOM writes it
    ("v1", "1961-03-04", "date"),
    ("v1", "04/03/1961", "date"),
    ("v1", "4.3.1961", "date"),
    ("v1", "4 March 1961", "date"),
    ("v1", "born 4 MARCH 1961, retired", "date"),  # in free text, upper case
    ("v1", "march 4, 1961", "date"),
    ("contact", "J.Doe@Example.ORG", "email"),
    ("remarks", "wife: anne.doe@mail.example.com", "email"),
    ("tel", "+49 30 1234567", "phone"),
    ("tel", "+1 (555) 123-4567", "phone"),
    ("tel", "(555) 123-4567", "phone"),
    ("tel", "030 1234567", "phone"),
    ("remarks", "call back on 020 7946 0958 after 5", "phone"),
    ("x", "12345678", "long_number"),  # an MRN
    ("x", "MRN 0012345678", "long_number"),
])
def test_identifier_shapes_under_innocent_names_are_refused(hand_store, tmp_path, capsys, column, value, kinds):
    table = _csv(tmp_path / "t.csv", *_with(column, [value]))
    out = tmp_path / "out" / "clinical.parquet"
    assert _clinical(hand_store, table, out) == 2
    err = _err_line(capsys)
    assert err.startswith(_refusal(f"{column} ({kinds})")), err
    assert value.casefold() not in err.casefold()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("remark", ["Mr DOE said the knee gave way", "seen by doe today", "Doe-Smith, knee pain",
                                    "John came alone"])
def test_a_patients_name_inside_free_text_in_any_case_is_refused(hand_store, tmp_path, capsys, remark):
    """The name is known from the table's Patient Name column (dropped by its name)."""
    header, rows = _with("remarks", [remark])
    header, rows = ["Patient Name", *header], [[name, *r] for name, r in zip(["Doe^John", "Doe^John", "Roe^Ann",
                                                                              "Roe^Ann"], rows)]
    out = tmp_path / "clinical.parquet"
    assert _clinical(hand_store, _csv(tmp_path / "t.csv", header, rows), out) == 2
    err = _err_line(capsys)
    assert err.startswith(_refusal("remarks (known_identifier)")), err
    assert "doe" not in err.casefold() and "john" not in err.casefold()
    assert not out.exists()


def test_the_study_and_subject_columns_values_are_known_identifiers(hand_store, tmp_path, capsys):
    """The subject column's IDs (upper case there) inside a note and a code in lower case:
    found by value."""
    header = ["StudyInstanceUID", "PatientID", "note", "code", "KL"]
    rows = [["1.2.826.0.1.3680043.2.1125.1", "AB771234", "follow-up of ab771234 at V01", "", "2"],
            ["1.2.826.0.1.3680043.2.1125.2", "AB771299", "", "x ab771234 y", "3"]]
    out = tmp_path / "clinical.parquet"
    assert _clinical(hand_store, _csv(tmp_path / "t.csv", header, rows), out) == 2
    assert _err_line(capsys).startswith(_refusal("note (known_identifier); code (known_identifier)"))
    assert not out.exists()


def test_identifiers_known_only_from_the_stores_keymap(hand_store, tmp_path, capsys):
    """The keymap's PatientID (7 digits: no shape) and source path, in a table without a
    subject column."""
    header = ["StudyInstanceUID", "pid", "where", "KL"]
    rows = [["1.2.3.4.5.6.7.8.9", "4471122", "", "2"], ["1.2.3.4.5.6.7.8.10", "", "/archive/dicom/4471122/20040312",
                                                          "1"]]
    out = tmp_path / "clinical.parquet"
    assert _clinical(hand_store, _csv(tmp_path / "t.csv", header, rows), out, "--keep", "pid,where") == 2
    assert _err_line(capsys).startswith(_refusal("pid (known_identifier); where (date, known_identifier, long_number)"))
    assert not out.exists()


def test_patient_ids_of_a_converted_store_are_found_under_another_name(cohort, store, key_file, tmp_path, capsys):
    """The session's synthetic cohort converted by kneebatch: its keymap's PatientIDs (from
    the DICOM headers) found in a column 'code' of a per-study table that has no subject column."""
    source = list(csv.DictReader(open(cohort / "clinical.csv")))
    rows = [[r["study_uid"], r["subject_id"], r["kl_grade"]] for r in source]
    table = _csv(tmp_path / "t.csv", ["study_uid", "code", "KL"], rows)
    out = tmp_path / "clinical.parquet"
    assert main(["clinical", str(store), str(table), str(out), "--key-file", str(key_file)]) == 2
    assert _err_line(capsys).startswith(_refusal("code (known_identifier)"))
    assert not out.exists()


# ---------------------------------------------------------------- --keep and --drop
def test_keep_keeps_a_column_that_only_has_an_identifiers_shape(hand_store, tmp_path, capsys):
    table = _csv(tmp_path / "t.csv", *_with("v1", ["1961-03-04", "1961-03-04", "04/05/1950", "04/05/1950"]))
    out = tmp_path / "clinical.parquet"
    assert _clinical(hand_store, table, out, "--keep", "v1") == 0
    said = capsys.readouterr().out
    assert "dropped ID (replaced_by_key); kept visit, side, " in said and "v1 (--keep: date)" in said
    written = pq.read_table(out)
    assert written.column_names == ["subject_key", *OAI_HEADER[1:], "v1"]
    assert json.loads(written.schema.metadata[b"kneebatch-clinical-columns"]) == {
        "dropped": {"ID": "replaced_by_key"}, "kept": {**{c: [] for c in OAI_HEADER[1:]}, "v1": ["date"]}}


def test_keep_never_keeps_a_known_identifier(hand_store, tmp_path, capsys):
    """Copies of the study and subject columns under other names, kept with --keep: refused.
    The subject IDs are short numbers (61, 62), which also are ages in the table: the copy is
    found row for row, and the age column is not refused."""
    header = ["StudyInstanceUID", "subject_id", "ref", "pid", "age", "KL"]
    rows = [["1.2.826.0.1.3680043.2.1125.1", "61", "1.2.826.0.1.3680043.2.1125.1", "61", "62", "2"],
            ["1.2.826.0.1.3680043.2.1125.2", "62", "1.2.826.0.1.3680043.2.1125.2", "62", "61", "3"],
            ["1.2.826.0.1.3680043.2.1125.3", "62", "", "62", "62", "3"]]
    out = tmp_path / "clinical.parquet"
    assert _clinical(hand_store, _csv(tmp_path / "t.csv", header, rows), out, "--keep", "ref", "--keep", "pid") == 2
    assert _err_line(capsys).startswith(_refusal("ref (known_identifier, uid); pid (known_identifier)"))
    assert not out.exists()
    assert _clinical(hand_store, _csv(tmp_path / "t.csv", header, rows), out, "--drop", "ref", "--drop", "pid") == 0
    assert pq.read_table(out).column_names == ["study_key", "in_store", "subject_key", "age", "KL"]


def test_drop_is_repeatable_and_says_why_each_column_went(hand_store, tmp_path, capsys):
    header, rows = _with("remarks", ["call +49 30 1234567", "", "J.Doe@example.org"])
    header, rows = [*header, "tel"], [[*r, "030 1234567"] for r in rows]
    header, rows = [*header, "Birth Date"], [[*r, "19610304"] for r in rows]
    table = _csv(tmp_path / "t.csv", header, rows)
    out = tmp_path / "clinical.parquet"
    assert _clinical(hand_store, table, out, "--drop", "remarks", "--drop", "tel") == 0
    said = capsys.readouterr().out
    assert ("dropped ID (replaced_by_key), remarks (drop_option), tel (drop_option), Birth Date (identifying_name);"
            in said)
    written = pq.read_table(out)
    assert written.column_names == ["subject_key", *OAI_HEADER[1:]]
    assert json.loads(written.schema.metadata[b"kneebatch-clinical-columns"])["dropped"] == {
        "ID": "replaced_by_key", "remarks": "drop_option", "tel": "drop_option", "Birth Date": "identifying_name"}


def test_a_drop_or_keep_naming_no_column_is_refused(hand_store, tmp_path, capsys):
    table = _csv(tmp_path / "t.csv", OAI_HEADER, OAI_ROWS)
    out = tmp_path / "clinical.parquet"
    assert _clinical(hand_store, table, out, "--keep", "remraks") == 2
    assert _err_line(capsys).startswith("kneebatch clinical: error: no column 'remraks' (--keep) in the clinical table")
    assert _clinical(hand_store, table, out, "--drop", "BMI", "--drop", "nope") == 2
    assert _err_line(capsys).startswith("kneebatch clinical: error: no column 'nope' (--drop) in the clinical table")
    assert not out.exists()


# ---------------------------------------------------------------- what must pass
def test_an_oai_like_clinical_table_passes_unchanged(hand_store, tmp_path):
    from kneebatch.clinical import pseudonymise_clinical

    out = tmp_path / "clinical.parquet"
    report = pseudonymise_clinical(hand_store, _csv(tmp_path / "t.csv", OAI_HEADER, OAI_ROWS), out,
                                   key_file=hand_store.parent / "study.key")
    assert report.dropped_why == {"ID": "replaced_by_key"} and report.kept_despite == {}
    assert report.kept == OAI_HEADER[1:]
    written = pq.read_table(out).to_pydict()
    assert list(written) == ["subject_key", *OAI_HEADER[1:]]
    assert {c: written[c] for c in OAI_HEADER[1:]} == OAI_TYPED


# ---------------------------------------------------------------- refusing
def test_a_refusal_names_no_value_and_writes_nothing(hand_store, tmp_path, capsys):
    from kneebatch.clinical import IdentifiersFound, pseudonymise_clinical

    out = tmp_path / "clinical.parquet"
    assert _clinical(hand_store, _csv(tmp_path / "ok.csv", OAI_HEADER, OAI_ROWS), out) == 0  # an earlier, good table
    capsys.readouterr()
    before = out.read_bytes()
    values = {"ref": "1.2.840.113619.2.55.3.604688119.971", "notes": "Jane Roe (DOB 04/03/1961) +44 20 7946 0958",
              "mail": "jane.roe@example.org", "mrn2": "004471199"}
    header, rows = [*OAI_HEADER, "Patient Name", *values], [[*r, "Roe^Jane", *values.values()] for r in OAI_ROWS]
    table = _csv(tmp_path / "t.csv", header, rows)
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert _clinical(hand_store, table, out) == 2
    err = _err_line(capsys)
    assert err.startswith(_refusal("ref (uid); notes (date, known_identifier, phone); mail (email); "
                                   "mrn2 (long_number)")), err
    for secret in ("roe", "jane", "1961", "7946", "113619", "example", "4471199", "9000099"):
        assert secret not in err.casefold(), secret
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == listing
    with pytest.raises(IdentifiersFound) as refused:
        pseudonymise_clinical(hand_store, table, out, key_file=hand_store.parent / "study.key")
    assert refused.value.columns == {"ref": ["uid"], "notes": ["date", "known_identifier", "phone"],
                                     "mail": ["email"], "mrn2": ["long_number"]}
    assert out.read_bytes() == before
