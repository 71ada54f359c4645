"""``kneebatch convert``: a DICOM tree and/or NIfTI files -> the cohort store.

Driver: scan headers (parallel) -> group into studies -> key each study -> skip the
ones already in the store -> convert the rest (parallel, one task per study, through the
jobs' one mapping rule, :func:`kneebatch.jobs.job.map_batches`) -> keymap.parquet and
failures.parquet. Every study found ends up either in the store or in failures.parquet.
One study's conversion is :func:`kneebatch.ingest.assemble.convert_study`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from kneebatch.distributed.tasks import map_unordered
from kneebatch.errors import StudyError, failure_row
from kneebatch.ingest import dicom, nifti
from kneebatch.ingest.assemble import convert_study
from kneebatch.ingest.store import CohortStore, is_store
from kneebatch.ingest.visits import write_visits
from kneebatch.jobs.job import SHARDS, all_shards, map_batches, write_shard_record
from kneebatch.jobs.shards import Shard
from kneebatch.keys import default_key_file, key_fingerprint, load_or_create_key, study_key, subject_key
from kneebatch.outputs import FAILURE_SCHEMA, KEYMAP_SCHEMA, merge_tables, read_table, write_table_atomic
from kneebatch.progress import progress_bar

SCAN_CHUNK = 256  # files per header-scan task


@dataclass
class ConvertReport:
    store_path: str = ""
    studies_found: int = 0
    studies_in_shard: int = 0  # of those, this shard's (all, without --shard)
    converted: int = 0
    already_done: int = 0
    already_from_elsewhere: int = 0  # of those, stored from another folder (same StudyInstanceUID)
    failed: int = 0
    files_scanned: int = 0
    files_rejected: int = 0  # not usable DICOM images: a failure row each (stage "scan")
    seconds: float = 0.0
    image_bytes: int = 0  # uncompressed bytes written this run
    reasons: dict = field(default_factory=dict)

    @property
    def studies_per_s(self) -> float:
        return self.converted / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.image_bytes / 1e6 / self.seconds if self.seconds else 0.0

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def _scan(paths: list[str]) -> list:
    """Headers of ``paths`` (a multi-frame file gives one per frame) and FileProblems."""
    out = []
    for p in paths:
        h = dicom.read_header(p)
        out.extend(h) if isinstance(h, list) else out.append(h)
    return out


def discover(src, client=None, show_progress=None, channels=None, skip=None) -> tuple[dict, int, list]:
    """Studies under ``src`` keyed by StudyInstanceUID (DICOM) or case name (NIfTI),
    the number of files looked at, and the files that are not usable images.
    ``channels``: nnU-Net channel suffix -> role (default ``0000`` T1, ``0001`` T2); ``skip``: a
    folder not to look into (the store itself, when it lies inside the source)."""
    src = Path(src)
    specials: list[str] = []
    files = [str(src)] if src.is_file() else dicom.list_files(src, skip, specials)
    file_set = set(files)
    # a special file named as a case's series is recorded in that case, never read
    nifti_studies = nifti.find_nifti_studies(src, channels, file_set | set(specials)) if src.is_dir() else {}
    nifti_files = {p for s in nifti_studies.values() for p in s.files.values()}
    unnamed = [dicom.FileProblem(f, "unnamed_volume") for f in files
               if f not in nifti_files and f.lower().endswith(nifti.VOLUME_SUFFIXES) and not nifti.is_label_file(f)]
    files = [f for f in files if not f.lower().endswith(nifti.VOLUME_SUFFIXES + (".raw",))]
    chunks = [files[i:i + SCAN_CHUNK] for i in range(0, len(files), SCAN_CHUNK)]
    headers = []
    with progress_bar(len(files), "scanning headers", show_progress, unit="files") as advance:
        for part in map_unordered(_scan, chunks, client):
            headers.extend(part)
            advance(len({h.path for h in part}))  # files: a multi-frame file gives a header per frame
    found = [h for h in headers if isinstance(h, dicom.SliceHeader)]
    problems = unnamed + [dicom.FileProblem(f, "special_file") for f in specials] + [
        h for h in headers if isinstance(h, dicom.FileProblem)]
    studies: dict = dict(dicom.group_studies(found))
    for uid, s in nifti_studies.items():
        # a case named like a DICOM study is another study: both are accounted for
        studies[uid if uid not in studies else f"{uid} (volume files)"] = s
    return studies, len(files) + len(nifti_files) + len(unnamed) + len(specials), problems


def convert_batch(pairs: list, store_path: str) -> dict:
    """Convert ``(study key, source)`` pairs; never raises. A job result (rows: what was written)."""
    rows, failures = [], []
    t0 = time.perf_counter()
    for key, source in pairs:
        try:
            rows.append({"study_key": key, "bytes": convert_study(source, store_path, key)})
        except Exception as e:  # one bad study never stops a run
            failures.append(failure_row(key, "convert", e))
    return {"keys": [k for k, _ in pairs], "rows": rows, "failures": failures,
            "seconds": {"convert": time.perf_counter() - t0}}


def convert(src, store_path, client=None, key_file=None, show_progress=None, channels=None,
            batch_fn=None, shard: Shard | None = None) -> ConvertReport:
    """Convert every study under ``src`` into the store at ``store_path`` (resumable).
    ``channels``: nnU-Net channel suffix -> role for ``<case>_0000`` files; ``batch_fn`` (like
    :func:`convert_batch`) is for fault injection in tests. ``shard``: only the studies of shard i
    of N (every shard scans the whole source); the keymap and failure rows then go to
    ``STORE/shards/`` and ``kneebatch merge STORE`` folds them in."""
    shard = shard or Shard()
    t0 = time.perf_counter()
    # absolute: the keymap's source paths must lead back to the files from anywhere (SEG export)
    src, store_path = Path(src).absolute(), Path(store_path)
    store, key = prepare_store(src, store_path, key_file)
    store.clear_partial(shard.owns)
    report = ConvertReport(store_path=str(store.path))
    studies, report.files_scanned, problems = discover(src, client, show_progress, channels, skip=store.path)
    report.studies_found = len(studies)
    report.files_rejected = len(problems)
    keymap, todo, failures = [], [], []
    for problem in problems:
        k = "f" + study_key(problem.path, key)[1:]  # a keyed hash of the path: no path in the table
        if shard.owns(k):
            keymap.append({"study_key": k, "study_uid": "", "source_path": _text(problem.path)})
            failures.append(failure_row(k, "scan", StudyError(problem.reason, problem.detail or "")))
    collided = dicom.collisions(studies)
    stored_from = {r["study_key"]: r["source_path"] for r in read_table(store.keymap_path, KEYMAP_SCHEMA).to_pylist()}
    for uid, source in studies.items():
        k = study_key(uid, key)
        if not shard.owns(k):
            continue
        report.studies_in_shard += 1
        if uid in collided:  # nothing of it is merged: no patient, no subject, not converted
            keymap.append({"study_key": k, "study_uid": uid, "source_path": _text(source.source_path)})
            failures.append(failure_row(k, "scan", StudyError("uid_collision", collided[uid])))
            report.fail("uid_collision")
            continue
        done = store.has_study(k)
        if done:
            report.already_done += 1
        if done and k in stored_from:
            # a study is its UID: another folder's copy (or a regenerated cohort) is not read again,
            # and its keymap row keeps the files it was converted from
            report.already_from_elsewhere += not _under(stored_from[k], src)
            continue
        patient = getattr(source, "patient_id", "")  # NIfTI cases have none
        keymap.append({"study_key": k, "study_uid": uid, "source_path": _text(source.source_path),
                       "patient_id": patient or None, "study_date": getattr(source, "study_date", "") or None,
                       "subject_key": subject_key(patient, key) if patient else None})
        if not done:
            todo.append((k, source))
    keymap = pa.Table.from_pylist(keymap, KEYMAP_SCHEMA)
    if shard.whole:
        _add_to_keymap(store, [keymap])
    else:
        write_table_atomic(merge_tables([keymap], KEYMAP_SCHEMA), store.path / SHARDS / f"keymap-{shard.name}.parquet",
                           private=True)

    def save(result):
        report.converted += len(result["rows"])
        report.image_bytes += sum(r["bytes"] for r in result["rows"])
        for f in result["failures"]:
            report.fail(f["reason"])
        failures.extend(result["failures"])

    map_batches(batch_fn or convert_batch, [[pair] for pair in todo], client, "convert", "converting studies",
                save, show_progress, store_path=str(store.path))
    report.seconds = time.perf_counter() - t0
    failures = pa.Table.from_pylist(failures, FAILURE_SCHEMA)
    if shard.whole:
        _add_failures(store, [failures])
    else:
        write_table_atomic(merge_tables([failures], FAILURE_SCHEMA),
                           store.path / SHARDS / f"failures-{shard.name}.parquet")
        write_shard_record(store.path, shard, {
            "studies": report.studies_in_shard, "saved": report.converted, "already_done": report.already_done,
            "failed": report.failed, "seconds": report.seconds, "studies_per_s": report.studies_per_s})
    return report


def merge_store(store_path) -> dict:
    """``kneebatch merge STORE``: fold the shards' keymap and failure rows into the store's tables,
    once every shard has finished (again and again gives the same tables)."""
    store = CohortStore(store_path, create=False)
    folder = store.path / SHARDS
    _, n = all_shards(store.path)
    _add_to_keymap(store, [read_table(p, KEYMAP_SCHEMA) for p in sorted(folder.glob("keymap-*.parquet"))])
    merged = _add_failures(store, [read_table(p, FAILURE_SCHEMA) for p in sorted(folder.glob("failures-*.parquet"))])
    return {"shards": n, "studies": len(store.study_keys()), "failed": merged.num_rows}


def _add_to_keymap(store: CohortStore, tables: list[pa.Table]) -> None:
    keymap = merge_tables([read_table(store.keymap_path, KEYMAP_SCHEMA), *tables], KEYMAP_SCHEMA)
    write_table_atomic(keymap, store.keymap_path, private=True)  # the identifiers: owner only
    write_visits(store.path, keymap.to_pylist())


def _add_failures(store: CohortStore, tables: list[pa.Table]) -> pa.Table:
    """The store's failure rows with ``tables`` added (a study's newest row wins); a study now in
    the store has none."""
    merged = merge_tables([read_table(store.failures_path, FAILURE_SCHEMA), *tables], FAILURE_SCHEMA,
                          drop_keys=set(store.study_keys()))
    write_table_atomic(merged, store.failures_path)
    return merged


def prepare_store(src, store_path, key_file=None) -> tuple[CohortStore, bytes]:
    """The store to convert ``src`` into (made if new; refused where it would hold or lie in the
    source, or inside another store), with the study-key secret it was (or is now) made with."""
    src, store_path = Path(src), Path(store_path)
    if not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    if src.resolve().is_relative_to(store_path.resolve()):
        raise ValueError(f"the source {src} lies inside the store {store_path}; choose another store folder")
    inside = next((p for p in store_path.resolve().parents if is_store(p)), None)
    if inside is not None:
        raise ValueError(f"{store_path} lies inside the cohort store {inside}; choose a folder outside it")
    store = CohortStore(store_path)
    key_path = Path(key_file) if key_file else default_key_file()
    recorded = store.key_fingerprint()
    if not key_path.exists() and recorded is not None:  # a new secret could never fit: none is made
        raise ValueError(f"{store_path} was converted with another study-key secret (fingerprint {recorded}) and the "
                         f"key file {key_path} does not exist; give that store's key file (--key-file)")
    key = load_or_create_key(key_path)
    store.check_key(key_fingerprint(key))
    return store, key


def _under(path: str, folder: Path) -> bool:
    return path == _text(str(folder)) or path.startswith(_text(str(folder)) + os.sep)


def _text(path: str) -> str:
    """A path as table text: names that are not UTF-8 (Latin-1 folders, say) keep their bytes
    as ``\\xNN`` escapes instead of stopping the run."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
