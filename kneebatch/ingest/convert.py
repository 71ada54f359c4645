"""``kneebatch convert``: a DICOM tree and/or NIfTI files -> the cohort store.

Driver: scan headers (parallel) -> group into studies -> key each study -> skip the
ones already in the store -> convert the rest (parallel, one task per study) ->
keymap.parquet and failures.parquet. Every study found ends up either in the store
or in failures.parquet.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kneebatch.geometry import resample
from kneebatch.ingest import dicom, nifti
from kneebatch.errors import REASONS, StudyError
from kneebatch.ingest.store import CohortStore
from kneebatch.keys import load_or_create_key, study_key
from kneebatch.outputs import FAILURE_SCHEMA, KEYMAP_SCHEMA, merge_rows, read_rows, write_rows
from kneebatch.distributed.tasks import map_unordered
from kneebatch.progress import progress_bar

log = logging.getLogger(__name__)
SCAN_CHUNK = 256  # files per header-scan task


@dataclass
class ConvertReport:
    store_path: str = ""
    studies_found: int = 0
    converted: int = 0
    already_done: int = 0
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


def _scan(paths: list[str]) -> list:
    return [dicom.read_header(p) for p in paths]


def discover(src, client=None, show_progress=None) -> tuple[dict, int, list]:
    """Studies under ``src`` keyed by StudyInstanceUID (DICOM) or case name (NIfTI),
    the number of files looked at, and the files that are not usable DICOM images."""
    src = Path(src)
    files = [str(src)] if src.is_file() else dicom.list_files(src)
    nifti_studies = nifti.find_nifti_studies(src) if src.is_dir() else {}
    nifti_files = {p for s in nifti_studies.values() for p in s.files.values()}
    files = [f for f in files if f not in nifti_files and not f.lower().endswith(nifti.VOLUME_SUFFIXES + (".raw",))]
    chunks = [files[i:i + SCAN_CHUNK] for i in range(0, len(files), SCAN_CHUNK)]
    headers = []
    with progress_bar(len(files), "scanning headers", show_progress, unit="files") as advance:
        for part in map_unordered(_scan, chunks, client):
            headers.extend(part)
            advance(len(part))
    found = [h for h in headers if isinstance(h, dicom.SliceHeader)]
    problems = [h for h in headers if isinstance(h, dicom.FileProblem)]
    studies: dict = dict(dicom.group_studies(found))
    for uid, s in nifti_studies.items():
        if uid in studies:
            log.warning("a NIfTI case and a DICOM study share the name %s; the DICOM study wins", uid)
            continue
        studies[uid] = s
    return studies, len(files) + len(nifti_files), problems


def convert_study(source, store_path: str, key: str) -> dict:
    """Convert one study; never raises. Returns a result row for the driver."""
    t0 = time.perf_counter()
    result = {"study_key": key, "status": "failed", "reason": "", "message": "", "bytes": 0}
    try:
        store = CohortStore(store_path)
        if isinstance(source, nifti.NiftiStudy):
            image, grid, attrs = _nifti_volumes(source)
        else:
            image, grid, attrs = _dicom_volumes(source)
        store.write_study(key, image, grid, ["T1", "T2"], attrs)
        result.update(status="converted", bytes=int(image.nbytes))
    except StudyError as e:
        result.update(reason=e.reason, message=e.message)
    except Exception as e:  # one bad study never stops a run
        detail = str(e).replace(getattr(source, "source_path", "") or "\0", "<study>")
        result.update(reason="internal_error", message=f"{type(e).__name__}: {detail}"[:500])
    result["seconds"] = time.perf_counter() - t0
    return result


def _dicom_volumes(study: dicom.StudyFiles):
    t1_series, t2_series = dicom.choose_series(study)
    hasher = hashlib.sha256()
    t1, g1 = dicom.read_series(t1_series, hasher)
    t2, g2 = dicom.read_series(t2_series, hasher)
    t2_on_t1 = _onto(t2, g2, g1)

    def describe(series, grid):
        h = series.first
        return {"repetition_time_ms": h.tr, "echo_time_ms": h.te, "shape_zyx": list(grid.shape),
                "spacing": list(grid.spacing), "n_files": len(series.slices)}

    attrs = {
        "source_kind": "dicom",
        "source_sha256": hasher.hexdigest(),
        "n_series_in_study": len(study.series),
        "t1": describe(t1_series, g1),
        "t2": {**describe(t2_series, g2), "resampled_to_t1_grid": not g2.same_as(g1)},
    }
    return np.stack([t1, t2_on_t1]), g1, attrs


def _nifti_volumes(study: nifti.NiftiStudy):
    for role in ("T1", "T2"):
        if role not in study.files:
            raise StudyError(f"missing_{role.lower()}", "NIfTI case without this file")
    hasher = hashlib.sha256()
    vols = {}
    for role in ("T1", "T2"):
        hasher.update(Path(study.files[role]).read_bytes())
        data, grid = nifti.read_volume(study.files[role])
        data, scaling = nifti.to_uint16(data)
        vols[role] = (data, grid, scaling)
    (t1, g1, s1), (t2, g2, s2) = vols["T1"], vols["T2"]
    attrs = {
        "source_kind": "nifti",
        "source_sha256": hasher.hexdigest(),
        "t1": {"shape_zyx": list(g1.shape), "spacing": list(g1.spacing), "intensity_scaling": s1},
        "t2": {"shape_zyx": list(g2.shape), "spacing": list(g2.spacing), "intensity_scaling": s2,
               "resampled_to_t1_grid": not g2.same_as(g1)},
    }
    return np.stack([t1, _onto(t2, g2, g1)]), g1, attrs


def _onto(volume, src_grid, dst_grid) -> np.ndarray:
    """T2 on the T1 grid (trilinear; outside the T2 field of view is 0)."""
    if src_grid.same_as(dst_grid):
        return volume
    return np.clip(np.rint(resample(volume, src_grid, dst_grid, order=1)), 0, 65535).astype(np.uint16)


def convert(src, store_path, client=None, key_file=None, show_progress=None) -> ConvertReport:
    """Convert every study under ``src`` into the store at ``store_path`` (resumable)."""
    t0 = time.perf_counter()
    store = CohortStore(store_path)
    store.clear_partial()
    key = load_or_create_key(key_file)
    report = ConvertReport(store_path=str(store.path))
    studies, report.files_scanned, problems = discover(src, client, show_progress)
    report.studies_found = len(studies)
    report.files_rejected = len(problems)
    keymap, todo = [], []
    file_failures = []
    for problem in problems:
        k = "f" + study_key(problem.path, key)[1:]  # a keyed hash of the path: no path in the table
        keymap.append({"study_key": k, "study_uid": "", "source_path": problem.path})
        file_failures.append({"study_key": k, "stage": "scan", "reason": problem.reason,
                              "message": REASONS[problem.reason] + (f": {problem.detail}" if problem.detail else "")})
    for uid, source in studies.items():
        k = study_key(uid, key)
        keymap.append({"study_key": k, "study_uid": uid, "source_path": source.source_path})
        if store.has_study(k):
            report.already_done += 1
        else:
            todo.append((source, k))
    write_rows(merge_rows(read_rows(store.keymap_path), keymap), KEYMAP_SCHEMA, store.keymap_path)

    failures = list(file_failures)
    with progress_bar(len(todo), "converting studies", show_progress) as advance:
        for r in map_unordered(_convert_pair, todo, client, store_path=str(store.path)):
            if r["status"] == "converted":
                report.converted += 1
                report.image_bytes += r["bytes"]
            else:
                report.failed += 1
                report.reasons[r["reason"]] = report.reasons.get(r["reason"], 0) + 1
                failures.append({"study_key": r["study_key"], "stage": "convert", "reason": r["reason"],
                                 "message": r["message"]})
            advance()
    done = set(store.study_keys())
    old = [f for f in read_rows(store.failures_path) if f["study_key"] not in done]
    write_rows(merge_rows(old, failures, drop_keys=done), FAILURE_SCHEMA, store.failures_path)
    report.seconds = time.perf_counter() - t0
    return report


def _convert_pair(pair, store_path):
    source, key = pair
    return convert_study(source, store_path, key)
