"""Part files: every job's unit of saved work, and the one way results are gathered.

``OUT/parts/part-<hash of the batch's keys>.arrow`` holds a finished batch's rows and
``....failures.arrow`` its failure rows, each written atomically; the rows file is written
last and marks the batch saved. Shards of one job write into the same folder (their keys
never overlap, nor do their part names). Parts are Arrow IPC files, not Parquet: a row of
~230 columns costs Parquet ~10 ms of metadata per file to read back, Arrow IPC ~1 ms
(``benchmarks/bookkeeping.py``); gathering concatenates them with no per-row Python.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from kneebatch.outputs import FAILURE_SCHEMA, latest_per_key, write_rows

FAILURES_SUFFIX = ".failures.arrow"


class Parts:
    def __init__(self, out, schema: pa.Schema):
        self.dir = Path(out) / "parts"
        self.schema = schema

    def row_files(self) -> list[Path]:
        return self._files(lambda name: not name.endswith(FAILURES_SUFFIX))

    def failure_files(self) -> list[Path]:
        return self._files(lambda name: name.endswith(FAILURES_SUFFIX))

    def _files(self, keep) -> list[Path]:
        if not self.dir.is_dir():
            return []
        files = [p for p in self.dir.glob("part-*.arrow") if keep(p.name)]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))  # later saves win in gather

    def save(self, keys, rows: list[dict], failures: list[dict]) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = "part-" + hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
        write_rows(failures, FAILURE_SCHEMA, self.dir / f"{name}{FAILURES_SUFFIX}")
        write_rows(rows, self.schema, self.dir / f"{name}.arrow")  # last: marks the batch saved
        return name

    def done_keys(self) -> set[str]:
        """Studies with a saved row: a re-run skips them (failed ones are tried again)."""
        table = _read(self.row_files(), pa.schema([self.schema.field("study_key")]))
        return set(table.column("study_key").to_pylist())

    def gather(self) -> tuple[pa.Table, pa.Table]:
        """(rows, failures), one per study, sorted by key: a study with a row has no failure row;
        of several saves of one study the last counts."""
        rows = latest_per_key(_read(self.row_files(), self.schema))
        failures = latest_per_key(_read(self.failure_files(), FAILURE_SCHEMA))
        return rows, failures.filter(pc.invert(pc.is_in(failures["study_key"], value_set=rows["study_key"])))


def _read(files: list[Path], schema: pa.Schema) -> pa.Table:
    tables = []
    for f in files:
        with pa.OSFile(str(f)) as source:
            tables.append(pa.ipc.open_file(source).read_all().select(schema.names))
    # one chunk per column: taking rows from 10,000 small chunks is slow
    return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()


def concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
