"""Tables kneebatch writes: explicit pyarrow schemas and atomic writes.

A file is written under a temporary name in the same directory and renamed into
place, so a reader never sees a half-written table.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

KEYMAP_SCHEMA = pa.schema([
    pa.field("study_key", pa.string(), nullable=False),
    pa.field("study_uid", pa.string(), nullable=False),
    pa.field("source_path", pa.string(), nullable=False),
])

FAILURE_SCHEMA = pa.schema([
    pa.field("study_key", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),  # convert, measure, run
    pa.field("reason", pa.string(), nullable=False),  # a stable code, see ingest.errors
    pa.field("message", pa.string(), nullable=False),  # for a person; never holds identifiers
])


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_rows(rows: list[dict], schema: pa.Schema, path) -> Path:
    return write_table_atomic(pa.Table.from_pylist(rows, schema=schema), path)


def read_rows(path, schema: pa.Schema | None = None) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return pq.read_table(path, schema=schema).to_pylist()


def merge_rows(old: list[dict], new: list[dict], drop_keys=(), key: str = "study_key") -> list[dict]:
    """Rows by ``key``: ``new`` replaces ``old``; keys in ``drop_keys`` go. Sorted by key."""
    merged = {r[key]: r for r in old}
    merged.update({r[key]: r for r in new})
    for k in drop_keys:
        merged.pop(k, None)
    return [merged[k] for k in sorted(merged)]
