"""Subjects and visits, pseudonymously: ``STORE/visits.parquet`` (study key, subject key, days
since the subject's first study), made from the keymap so that no output needs an identifier
or an absolute date to follow a knee over time."""

from __future__ import annotations

from datetime import date
from functools import lru_cache
from pathlib import Path

from kneebatch.outputs import VISIT_SCHEMA, read_rows, write_rows

VISITS = "visits.parquet"


def _day(study_date: str | None) -> date | None:
    """A DICOM date (YYYYMMDD; also YYYY.MM.DD from old writers); None if absent or not a date."""
    digits = "".join(c for c in (study_date or "") if c.isdigit())
    if len(digits) != 8:
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def visit_rows(keymap: list[dict]) -> list[dict]:
    """Per keymap row: its subject key and the days since that subject's first dated study."""
    first: dict[str, date] = {}
    for r in keymap:
        day = _day(r.get("study_date"))
        if r.get("subject_key") and day is not None:
            first[r["subject_key"]] = min(day, first.get(r["subject_key"], day))
    rows = []
    for r in keymap:
        day, subject = _day(r.get("study_date")), r.get("subject_key")
        days = (day - first[subject]).days if subject and day is not None else None
        rows.append({"study_key": r["study_key"], "subject_key": subject or None, "visit_days": days})
    return rows


def write_visits(store_path, keymap: list[dict]) -> Path:
    return write_rows(visit_rows(keymap), VISIT_SCHEMA, Path(store_path) / VISITS)


NO_VISIT = {"subject_key": None, "visit_days": None}


@lru_cache(maxsize=4)
def _visits(path: str, mtime_ns: int) -> dict[str, dict]:
    return {r["study_key"]: {"subject_key": r["subject_key"], "visit_days": r["visit_days"]}
            for r in read_rows(path, VISIT_SCHEMA)}


def visit_of(store_path, key: str) -> dict:
    """``{"subject_key", "visit_days"}`` of a study (None each for stores made before visits were
    recorded, and for sources without a PatientID or StudyDate)."""
    path = Path(store_path) / VISITS
    if not path.exists():
        return dict(NO_VISIT)
    return dict(_visits(str(path), path.stat().st_mtime_ns).get(key, NO_VISIT))


def study_context(store, key: str) -> dict:
    """What a measurement row takes from the store besides the arrays: the knee side the DICOM
    headers gave and the study's subject and visit (``measure_study(..., **study_context(...))``)."""
    return {"knee_side": store.study_attrs(key).get("knee_side"), "visit": visit_of(store.path, key)}
