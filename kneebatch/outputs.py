"""Tables kneebatch writes: explicit pyarrow schemas and atomic writes.

A file is written under a temporary name in the same directory and renamed into
place, so a reader never sees a half-written table.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

KEYMAP_SCHEMA = pa.schema([
    pa.field("study_key", pa.string(), nullable=False),
    pa.field("study_uid", pa.string(), nullable=False),
    pa.field("source_path", pa.string(), nullable=False),
    # the subject and the visit (identifiers, null where the source has none); subject_key is not
    pa.field("patient_id", pa.string()),
    pa.field("study_date", pa.string()),  # YYYYMMDD
    pa.field("subject_key", pa.string()),
])

# STORE/visits.parquet, made from the keymap: the pseudonymous side of the subject and the visit
VISIT_SCHEMA = pa.schema([
    pa.field("study_key", pa.string(), nullable=False),
    pa.field("subject_key", pa.string()),
    pa.field("visit_days", pa.int64()),  # days since the subject's first study in the store
])

FAILURE_SCHEMA = pa.schema([
    pa.field("study_key", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),  # convert, measure, run
    pa.field("reason", pa.string(), nullable=False),  # a stable code, see ingest.errors
    pa.field("message", pa.string(), nullable=False),  # for a person; never holds identifiers
])


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def umask() -> int:
    """The process's file-mode creation mask, read without changing it where the OS allows
    (Linux: /proc/self/status), as setting it to read it would race with other threads."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _set_mode(tmp, private: bool) -> None:
    """A temporary file (made 0600) gets the mode a plain ``open`` would give it: results are
    shared as the umask allows; files with identifiers (the keymap) stay 0600."""
    os.chmod(tmp, 0o600 if private else 0o666 & ~umask())


def write_table_atomic(table: pa.Table, path: str | os.PathLike, private: bool = False) -> Path:
    """A Parquet (or, for ``.arrow``, Arrow IPC) table written atomically; ``private``: 0600
    whatever the umask (it holds identifiers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _set_mode(tmp, private)
        if path.suffix == ".arrow":  # Arrow IPC: what kneebatch writes for itself (part files), quick to read back
            feather.write_feather(table, tmp, compression="uncompressed")
        else:
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


def latest_per_key(table: pa.Table, key: str = "study_key") -> pa.Table:
    """One row per key (the last one in the table), sorted by key."""
    if table.num_rows == 0:
        return table
    order = pa.array(range(table.num_rows), pa.int64())
    last = table.append_column("__order", order).group_by(key).aggregate([("__order", "max")])
    return table.take(last["__order_max"]).sort_by(key)


def label_maps_of(out, store=None) -> dict[str, str]:
    """study_key -> the label map a finished run (or measure) into ``out`` measured: what
    ``--run OUT`` hands the downstream commands, so they use that run's labels, not the newest.
    ``store``: the store they read, refused when the run was made from another one."""
    made_from = store_of(out)
    if store is not None and made_from and Path(made_from).resolve() != Path(store).resolve():
        raise ValueError(f"--run {out} was made from the store {made_from}, not {store}: give that store, or "
                         "the run made from this one")
    path = Path(out) / "measurements.parquet"
    if not path.exists():
        shards = list(Path(out).glob("shards/*")) if Path(out).is_dir() else []
        hint = f"; gather its shards first: kneebatch merge {out}" if shards else ""
        raise FileNotFoundError(f"--run {out}: no measurements.parquet there (not a finished run's output{hint})")
    rows = pq.read_table(path, columns=["study_key", "label_name"]).to_pylist()
    return {r["study_key"]: r["label_name"] for r in rows if r["label_name"]}


def store_of(out) -> Path | None:
    """The store a run or measure into ``out`` read (recorded in its output folder's marker)."""
    try:
        store = json.loads((Path(out) / MARKER).read_text()).get("settings", {}).get("store")
    except (OSError, ValueError):
        return None
    return Path(store) if store else None


def read_table(path, schema: pa.Schema) -> pa.Table:
    """A Parquet table as ``schema`` (empty when the file does not exist)."""
    return pq.read_table(path, schema=schema) if Path(path).exists() else schema.empty_table()


def merge_tables(tables: list[pa.Table], schema: pa.Schema, drop_keys=(), key: str = "study_key") -> pa.Table:
    """One row per ``key`` over ``tables`` in order (a later table's row wins), sorted by key;
    keys in ``drop_keys`` go. The one merge of every table kneebatch updates (parts, the
    store's keymap and failures)."""
    import pyarrow.compute as pc

    merged = latest_per_key(pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]), key) \
        if tables else schema.empty_table()
    if drop_keys:
        merged = merged.filter(pc.invert(pc.is_in(merged[key], value_set=pa.array(sorted(drop_keys), pa.string()))))
    return merged


def write_text_atomic(path, text: str) -> Path:
    """A text file (JSON manifests) written under a temporary name and renamed into place."""
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path, data: bytes) -> Path:
    """A file written under a temporary name of its own (two writers never share one) and
    renamed into place: a reader sees the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _set_mode(tmp, False)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


MARKER = ".kneebatch.json"  # in every output folder kneebatch made: which command, with which settings


def claim_output_dir(out, command: str, settings: dict, force: bool = False,
                     owned: tuple[str, ...] = ()) -> Path:
    """Make ``out`` this command's output folder, or refuse.

    A new or empty folder is claimed (a marker file records the command and settings). A
    folder with the same command and settings is resumed. Anything else is refused, so
    outputs never mix rows of two settings: a folder kneebatch did not make is never written
    into; one made with other settings is started clean only with ``force``, and then only
    the files kneebatch writes (``owned`` globs) are removed."""
    out = Path(out)
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    # a SLURM submission's folder (kneebatch submit writes it before the tasks claim OUT) is kneebatch's
    made_here = {"slurm"} if (out / "slurm" / "submit.json").exists() else set()
    if out.exists() and any(p.name not in made_here for p in out.iterdir()) and not marker.exists():
        raise ValueError(f"{out} is not empty and was not made by kneebatch; choose a new or empty folder")
    wanted = {"command": command, "settings": settings}
    if marker.exists():
        found = json.loads(marker.read_text())
        if found != wanted:
            if found.get("command") != command:
                raise ValueError(f"{out} holds the outputs of 'kneebatch {found.get('command')}'; choose another folder")
            if not force:
                differ = sorted(k for k in {*settings, *found.get("settings", {})}
                                if settings.get(k) != found.get("settings", {}).get(k))
                raise ValueError(f"{out} was made with other {', '.join(differ)}; rerun with the same settings to "
                                 "resume, choose another folder, or add --force to start it clean")
            for pattern in owned:
                for p in out.glob(pattern):
                    if p.is_file():
                        p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps(wanted, indent=1, sort_keys=True))
    return out
