"""``kneebatch clinical``: a clinical table with its identifiers replaced by the store's keys.

The StudyInstanceUID column becomes ``study_key`` and the PatientID column ``subject_key``,
with the same keyed hashes convert used (the store's secret, checked against its
fingerprint); every other identifying column (names, birth dates, accession numbers, any
date) is dropped. Then every cell that is left is looked at by value
(:mod:`kneebatch.identifiers`): the cohort's known identifiers and identifier shapes
under innocent column names or inside free text refuse the table, naming the columns and
the kind of finding, never the value. Analysts then join on keys and never handle an
identifier.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from kneebatch.identifiers import KNOWN, KnownIdentifiers, copies, find_shapes, kinds_in
from kneebatch.ingest.store import CohortStore
from kneebatch.keys import default_key_file, key_fingerprint, load_or_create_key, study_key, subject_key
from kneebatch.outputs import read_rows, write_table_atomic

# column names compared lower-case without spaces, underscores or dashes
STUDY_COLUMNS = ("studyinstanceuid", "studyuid", "study_uid")
SUBJECT_COLUMNS = ("patientid", "subjectid", "participantid", "patid", "mrn", "id")
IDENTIFYING = ("patientname", "name", "firstname", "lastname", "surname", "givenname", "birthdate", "patientbirthdate",
               "dob", "dateofbirth", "accessionnumber", "accession", "address", "phone", "telephone", "email",
               "referringphysicianname", "institutionname", "seriesinstanceuid", "sopinstanceuid", "otherpatientids",
               "ssn", "zip", "postcode")
PERSON_NAMES = ("patientname", "name", "firstname", "lastname", "surname", "givenname", "referringphysicianname")
KEYMAP_IDENTIFIERS = ("study_uid", "patient_id", "study_date", "source_path")  # the keymap's (no names there)

# why a column was dropped (reason codes, in the report, the console line and the file's metadata)
REPLACED_BY_KEY = "replaced_by_key"
IDENTIFYING_NAME = "identifying_name"
DROP_OPTION = "drop_option"
COLUMNS_META = b"kneebatch-clinical-columns"


MARK = b"kneebatch-clinical"


def _made_here(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        return MARK in (pq.read_schema(path).metadata or {})
    except Exception:
        return False


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


@dataclass
class ClinicalReport:
    rows: int = 0
    study_column: str | None = None
    subject_column: str | None = None
    dropped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    dropped_why: dict[str, str] = field(default_factory=dict)  # column -> reason code
    kept_despite: dict[str, list[str]] = field(default_factory=dict)  # a --keep column -> the shapes found in it
    studies_in_store: int = 0
    studies_not_in_store: int = 0


def find_column(columns: list[str], given: str | None, names: tuple[str, ...], what: str) -> str | None:
    if given:
        if given not in columns:
            raise ValueError(f"no column {given!r} ({what}) in the clinical table; it has: {', '.join(columns)}")
        return given
    return next((c for c in columns if _norm(c) in {_norm(n) for n in names}), None)


def named_identifying(column: str) -> bool:
    """A column whose very name says it holds an identifier (a name, a birth date, an accession number...)."""
    return _norm(column) in {_norm(c) for c in IDENTIFYING}


def is_identifying(column: str) -> bool:
    n = _norm(column)
    return named_identifying(column) or "date" in n or "uid" in n


class IdentifiersFound(ValueError):
    """Columns that hold identifiers by value: {column: reason codes}. The message names
    columns and kinds only, never a value."""

    def __init__(self, columns: dict[str, list[str]]):
        self.columns = columns
        listed = "; ".join(f"{c} ({', '.join(kinds)})" for c, kinds in columns.items())
        super().__init__(f"identifiers found by value in {listed}: nothing written. Leave a column out with "
                         f"--drop COLUMN; keep one that only has an identifier's shape with --keep COLUMN "
                         f"({KNOWN}: a value that identifies someone in this cohort, never kept)")


def _known_identifiers(store: CohortStore, records: list[dict], dropped_why: dict[str, str]) -> KnownIdentifiers:
    """Every identifier the command knows of: the store's keymap (UIDs, PatientIDs, study
    dates, source paths) and the values of the columns it drops for their names (the key
    columns' UIDs and IDs, names, birth dates, accession numbers, ...); of a column dropped by
    --drop or for a 'date'/'uid' in its name, only what has an identifier's shape."""
    known = KnownIdentifiers()
    for row in read_rows(store.keymap_path):
        for name in KEYMAP_IDENTIFIERS:
            known.add(row.get(name))
    for column, why in dropped_why.items():
        whole = why == REPLACED_BY_KEY or named_identifying(column)
        person = _norm(column) in PERSON_NAMES
        for value in {(r.get(column) or "").strip() for r in records}:
            if whole:
                known.add(value, person_name=person)
            else:
                for _, text in find_shapes(value):
                    known.add(text)
    return known


def _typed(cells: list[str]) -> list:
    """A CSV column as ints, else floats, else text (an empty cell: None)."""
    values = [c.strip() for c in cells]
    for cast in (int, float):
        try:
            return [cast(v) if v else None for v in values]
        except ValueError:
            pass
    return [v or None for v in values]


def pseudonymise_clinical(store_path, clinical_csv, out, key_file=None, study_column: str | None = None,
                          subject_column: str | None = None, drop: tuple[str, ...] = (),
                          keep: tuple[str, ...] = ()) -> ClinicalReport:
    """Write ``out`` (Parquet): the rows of ``clinical_csv`` with ``study_key`` and/or
    ``subject_key`` instead of their identifier columns, ``in_store`` (the study is in the
    store), and the remaining non-identifying columns. ``drop``: more columns to leave out;
    ``keep``: columns to keep although their name looks identifying or their values only have
    an identifier's shape (never the key columns, never a column with a known identifier).
    Raises :class:`IdentifiersFound` (nothing written) when a column holds identifiers by value."""
    store = CohortStore(store_path, create=False)
    key_file = Path(key_file) if key_file else default_key_file()
    if not key_file.exists():  # never made here: a new secret would match nothing
        raise FileNotFoundError(f"no study-key secret at {key_file}: give the key file the store was converted with "
                                "(--key-file)")
    key = load_or_create_key(key_file)
    recorded = store.key_fingerprint()
    if recorded is not None and recorded != key_fingerprint(key):
        raise ValueError(f"this key file is not the one {store.path} was converted with (fingerprint {recorded}); "
                         "give that one with --key-file, or the keys would match nothing")
    out = Path(out)
    if out.exists() and out.is_dir():
        raise ValueError(f"{out} is a folder; give the Parquet file to write, e.g. {out / 'clinical.parquet'}")
    if out.exists() and not _made_here(out):
        raise ValueError(f"{out} exists and was not written by kneebatch clinical; choose a new file name")
    with open(clinical_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        records = list(reader)
    report = ClinicalReport(rows=len(records))
    report.study_column = find_column(columns, study_column, STUDY_COLUMNS, "--study-column")
    report.subject_column = find_column(columns, subject_column, SUBJECT_COLUMNS, "--subject-column")
    if report.study_column is None and report.subject_column is None:
        raise ValueError("found neither a StudyInstanceUID nor a PatientID column (named e.g. StudyInstanceUID, "
                         "study_uid, PatientID, subject_id); name them with --study-column / --subject-column")
    for given, option in ((drop, "--drop"), (keep, "--keep")):
        for c in given:
            find_column(columns, c, (), option)
    keys = {report.study_column, report.subject_column}
    for c in columns:
        if c in keys:
            report.dropped_why[c] = REPLACED_BY_KEY
        elif c in drop:
            report.dropped_why[c] = DROP_OPTION
        elif is_identifying(c) and c not in keep:
            report.dropped_why[c] = IDENTIFYING_NAME
    report.dropped = [c for c in columns if c in report.dropped_why]
    report.kept = [c for c in columns if c not in report.dropped_why]
    # what is left is looked at by value; a --keep column may hold shapes, never a known identifier
    known = _known_identifiers(store, records, report.dropped_why)
    id_columns = [[r.get(k) or "" for r in records] for k in keys if k]
    refused = {}
    for c in report.kept:
        cells = [r.get(c) or "" for r in records]
        found = kinds_in(cells, known)
        if any(copies(cells, ids) for ids in id_columns):
            found.add(KNOWN)
        if found and (c not in keep or KNOWN in found):
            refused[c] = sorted(found)
        elif found:
            report.kept_despite[c] = sorted(found)
    if refused:
        raise IdentifiersFound(refused)
    data = {}
    if report.study_column:
        uids = [(r[report.study_column] or "").strip() for r in records]
        data["study_key"] = [study_key(uid, key) if uid else None for uid in uids]
        in_store = set(store.study_keys())
        data["in_store"] = [k in in_store for k in data["study_key"]]
        report.studies_in_store = sum(data["in_store"])
        report.studies_not_in_store = report.rows - report.studies_in_store
    if report.subject_column:
        data["subject_key"] = [subject_key(p, key) if p else None
                               for p in ((r[report.subject_column] or "").strip() for r in records)]
    for c in report.kept:
        data[c] = _typed([r[c] or "" for r in records])
    table = pa.table(data)
    columns_why = {"dropped": report.dropped_why, "kept": {c: report.kept_despite.get(c, []) for c in report.kept}}
    table = table.replace_schema_metadata({MARK: b"clinical table, identifiers replaced by keyed hashes",
                                           COLUMNS_META: json.dumps(columns_why).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_table_atomic(table, out)
    return report

