"""``kneebatch convert``: a DICOM tree and/or NIfTI files -> the cohort store.

Driver: scan headers (parallel) -> group into studies -> key each study -> skip the
ones already in the store -> convert the rest (parallel, one task per study) ->
keymap.parquet and failures.parquet. Every study found ends up either in the store
or in failures.parquet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kneebatch.distributed.tasks import died_message, map_unordered, retry_alone
from kneebatch.errors import StudyError, failure_row
from kneebatch.geometry import Grid, obliquity_deg, resample, to_canonical
from kneebatch.ingest import dicom, nifti
from kneebatch.ingest.roles import ROLES
from kneebatch.ingest.store import CohortStore
from kneebatch.ingest.visits import write_visits
from kneebatch.jobs.shards import Shard
from kneebatch.keys import default_key_file, key_fingerprint, load_or_create_key, study_key, subject_key
from kneebatch.outputs import FAILURE_SCHEMA, KEYMAP_SCHEMA, merge_rows, read_rows, write_rows, write_text_atomic
from kneebatch.progress import progress_bar

log = logging.getLogger(__name__)
SCAN_CHUNK = 256  # files per header-scan task


@dataclass
class ConvertReport:
    store_path: str = ""
    studies_found: int = 0
    studies_in_shard: int = 0  # of those, this shard's (all, without --shard)
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


def convert_study(source, store_path: str, key: str) -> dict:
    """Convert one study; never raises. Returns a result row for the driver."""
    t0 = time.perf_counter()
    result = {"study_key": key, "status": "failed", "reason": "", "message": "", "bytes": 0}
    try:
        store = CohortStore(store_path)
        if isinstance(source, nifti.NiftiStudy):
            series, left_out = _nifti_series(source), list(source.left_out)
        else:
            series, left_out = _dicom_series(source)
        image, grid, channels, attrs = assemble(series)
        attrs["series"] += left_out  # series not used, each with its reason: why a T1 is missing
        attrs["source_kind"] = "nifti" if isinstance(source, nifti.NiftiStudy) else "dicom"
        attrs["n_series_in_study"] = len(getattr(source, "series", None) or source.files)
        if isinstance(source, dicom.StudyFiles):
            attrs["knee_side"] = dicom.knee_side(s.first for s in source.series.values())
        store.write_study(key, image, grid, channels, attrs)
        result.update(status="converted", bytes=int(image.nbytes))
    except Exception as e:  # one bad study never stops a run
        row = failure_row(key, "convert", e)
        result.update(reason=row["reason"], message=row["message"])
    result["seconds"] = time.perf_counter() - t0
    return result


@dataclass
class SeriesVolume:
    """One usable sagittal series in its source voxel order, with what is recorded of it."""

    role: str
    data: np.ndarray  # [Z, Y, X] uint16
    grid: Grid
    info: dict  # sequence parameters, file count, intensity scaling (no identifiers)


def _dicom_series(study: dicom.StudyFiles) -> tuple[list[SeriesVolume], list[dict]]:
    out = []
    chosen, left_out = dicom.sort_series(study)
    for role, series in chosen.items():
        hasher = hashlib.sha256()
        data, grid = dicom.read_series(series, hasher)
        check_volume(data, grid)
        h = series.first
        out.append(SeriesVolume(role, data, grid, {
            "repetition_time_ms": h.tr, "echo_time_ms": h.te, "inversion_time_ms": h.ti,
            "flip_angle_deg": h.flip_angle, "acquisition_type": h.acquisition_type or None,
            "n_files": series.n_files, "source_sha256": hasher.hexdigest()}))
    return out, left_out


def _nifti_series(study: nifti.NiftiStudy) -> list[SeriesVolume]:
    out = []
    for role, path in study.files.items():
        data, grid = nifti.read_volume(path)
        check_volume(data, grid)
        _check_sagittal(grid)
        data, scaling = nifti.to_uint16(data)
        out.append(SeriesVolume(role, data, grid, {"intensity_scaling": scaling,
                                                   "source_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}))
    return out


def _check_sagittal(grid: Grid) -> None:
    """A volume file's thick axis, if it has one, must run left-right: the same rule as DICOM's
    slice normal (an axial or coronal 2-D stack is refused, an isotropic 3-D volume is not)."""
    spacing = np.asarray(grid.spacing)
    thick = int(np.argmax(spacing))
    if spacing[thick] > 1.5 * spacing.min() and abs(grid.direction[0, thick]) < np.cos(
            np.radians(dicom.SAGITTAL_MAX_ANGLE_DEG)):
        raise StudyError("not_sagittal", f"its {spacing[thick]:.2f} mm slices do not run left-right")


THIN_SLICE_MM = 1.5  # no 2-D knee series has slices this thin (clinical 2-D: 2.5-4 mm)


def reference_series(series: list[SeriesVolume]) -> SeriesVolume:
    """The series whose grid the study is stored on: a 3-D acquisition before 2-D ones, then
    the earlier role in ``ROLES`` (T1 first: the paper's anatomical reference), then the
    finest voxels.

    3-D series (DESS, 3-D GRE) are fine in every direction: resampling a 2-D series onto
    them loses nothing through-plane, the reverse would."""
    def rank(s: SeriesVolume):
        # a volume file says nothing of its acquisition: near-isotropic voxels, or slices as thin as
        # a 3-D acquisition's (the OAI's DESS: 0.7 mm slices, 0.37 mm in-plane), are 3-D
        three_d = s.info.get("acquisition_type") == "3D" or max(s.grid.spacing) < 1.5 * min(s.grid.spacing) \
            or max(s.grid.spacing) <= THIN_SLICE_MM
        return (not three_d, ROLES.index(s.role), s.grid.voxel_volume_mm3)
    return min(series, key=rank)


MIN_OVERLAP = 0.5  # of the reference field of view a channel must cover to be kept


def assemble(series: list[SeriesVolume]) -> tuple[np.ndarray, Grid, list[str], dict]:
    """The study's image ``[C, Z, Y, X]`` in the canonical voxel order, on the reference
    series' grid (reoriented exactly, never resampled), other series resampled onto it."""
    ref = reference_series(series)
    reorientation = to_canonical(ref.grid)
    ref_data, grid = reorientation.apply(ref.data, ref.grid)
    channels, volumes, records = [], [], []
    for s in sorted(series, key=lambda s: (s is not ref, ROLES.index(s.role))):
        record = {"role": s.role, "reference": s is ref, "shape_zyx": list(s.grid.shape),
                  "spacing": list(s.grid.spacing), "obliquity_deg": obliquity_deg(s.grid), **s.info}
        if s is ref:
            data = ref_data
        else:
            data, record["resampled_to_reference"], record["overlap_fraction"] = _onto(s.data, s.grid, grid)
            if record["overlap_fraction"] < MIN_OVERLAP:
                record["used"] = False  # kept out: it would be a channel of zeros
                records.append(record)
                continue
        record["used"] = True
        channels.append(s.role)
        volumes.append(data)
        records.append(record)
    attrs = {
        "channels": channels,
        "reference_role": ref.role,
        "series": records,
        # the reference series' own voxel order: exports and imported label maps map back to it
        "source_grid": {"shape_zyx": list(ref.grid.shape), "affine": ref.grid.affine.tolist()},
        "to_canonical": reorientation.to_attrs(),
        "obliquity_deg": obliquity_deg(grid),
    }
    return np.stack(volumes), grid, channels, attrs


def check_volume(data: np.ndarray, grid: Grid) -> None:
    """Refuse values that would be stored and measured as if they were real."""
    spacing = np.asarray(grid.spacing)
    if not np.all(np.isfinite(grid.affine)) or not np.all(spacing > 1e-3) or grid.voxel_volume_mm3 < 1e-9:
        raise StudyError("bad_geometry", "voxel spacing zero, negative or not finite, or axes degenerate")
    if data.size and np.min(data) == np.max(data):
        raise StudyError("constant_image", f"every voxel is {np.min(data):g}")


def _onto(volume, src_grid: Grid, dst_grid: Grid) -> tuple[np.ndarray, bool, float]:
    """A channel on the (canonical) reference grid: reordered exactly when only the voxel order
    differs, else trilinear (0 outside its field of view); with the share of the grid it covers."""
    reorientation = to_canonical(src_grid)
    if reorientation.grid(src_grid).same_as(dst_grid):
        return reorientation.apply(volume, src_grid)[0], False, 1.0
    inside = resample(np.ones(src_grid.shape, np.float32), src_grid, dst_grid, order=0)
    out = np.clip(np.rint(resample(volume, src_grid, dst_grid, order=1)), 0, 65535).astype(np.uint16)
    return out, True, float(np.mean(inside > 0))


def convert(src, store_path, client=None, key_file=None, show_progress=None, channels=None,
            study_fn=None, shard: Shard | None = None) -> ConvertReport:
    """Convert every study under ``src`` into the store at ``store_path`` (resumable).
    ``channels``: nnU-Net channel suffix -> role for ``<case>_0000`` files; ``study_fn`` (a
    ``(source, key), store_path`` function) is for fault injection in tests. ``shard``: only the
    studies of shard i of N (every shard scans the whole source); the keymap and failure rows
    then go to ``STORE/shards/`` and ``kneebatch merge STORE`` folds them in."""
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
    keymap, todo = [], []
    file_failures = []
    for problem in problems:
        k = "f" + study_key(problem.path, key)[1:]  # a keyed hash of the path: no path in the table
        if not shard.owns(k):
            continue
        keymap.append({"study_key": k, "study_uid": "", "source_path": _text(problem.path)})
        file_failures.append(failure_row(k, "scan", StudyError(problem.reason, problem.detail or "")))
    collided = dicom.collisions(studies)
    for uid, source in studies.items():
        k = study_key(uid, key)
        if not shard.owns(k):
            continue
        report.studies_in_shard += 1
        if uid in collided:  # nothing of it is merged: no patient, no subject, not converted
            keymap.append({"study_key": k, "study_uid": uid, "source_path": _text(source.source_path)})
            file_failures.append(failure_row(k, "scan", StudyError("uid_collision", collided[uid])))
            report.failed += 1
            report.reasons["uid_collision"] = report.reasons.get("uid_collision", 0) + 1
            continue
        patient = getattr(source, "patient_id", "")  # NIfTI cases have none
        keymap.append({"study_key": k, "study_uid": uid, "source_path": _text(source.source_path),
                       "patient_id": patient or None, "study_date": getattr(source, "study_date", "") or None,
                       "subject_key": subject_key(patient, key) if patient else None})
        if store.has_study(k):
            report.already_done += 1
        else:
            todo.append((source, k))
    if shard.whole:
        _add_to_keymap(store, keymap)
    else:
        write_rows(merge_rows([], keymap), KEYMAP_SCHEMA, store.path / SHARDS / f"keymap-{shard.name}.parquet")

    failures = list(file_failures)
    with progress_bar(len(todo), "converting studies", show_progress) as advance:
        for r in map_unordered(study_fn or convert_pair, todo, client, on_error=_worker_died,
                               store_path=str(store.path)):
            if r["status"] == "converted":
                report.converted += 1
                report.image_bytes += r["bytes"]
            else:
                report.failed += 1
                report.reasons[r["reason"]] = report.reasons.get(r["reason"], 0) + 1
                failures.append({"study_key": r["study_key"], "stage": "convert", "reason": r["reason"],
                                 "message": r["message"]})
            advance()
    report.seconds = time.perf_counter() - t0
    if shard.whole:
        _add_failures(store, failures)
    else:
        write_rows(merge_rows([], failures), FAILURE_SCHEMA, store.path / SHARDS / f"failures-{shard.name}.parquet")
        record = {"report": {"shard": str(shard), "studies": report.studies_in_shard, "saved": report.converted,
                             "already_done": report.already_done, "failed": report.failed,
                             "seconds": report.seconds, "studies_per_s": report.studies_per_s}}
        write_text_atomic(store.path / SHARDS / f"{shard.name}.json", json.dumps(record, indent=1))
    return report


SHARDS = "shards"  # a sharded convert's keymap and failure rows, which merge_store folds in


def merge_store(store_path) -> dict:
    """``kneebatch merge STORE``: fold the shards' keymap and failure rows into the store's tables,
    once every shard has finished (again and again gives the same tables)."""
    from kneebatch.jobs.job import all_shards

    store = CohortStore(store_path, create=False)
    folder = store.path / SHARDS
    _, n = all_shards(store.path)
    keymap = [r for p in sorted(folder.glob("keymap-*.parquet")) for r in read_rows(p)]
    failures = [r for p in sorted(folder.glob("failures-*.parquet")) for r in read_rows(p)]
    _add_to_keymap(store, keymap)
    merged = _add_failures(store, failures)
    return {"shards": n, "studies": len(store.study_keys()), "failed": len(merged)}


def _add_to_keymap(store: CohortStore, rows: list[dict]) -> None:
    keymap = merge_rows(read_rows(store.keymap_path), rows)
    write_rows(keymap, KEYMAP_SCHEMA, store.keymap_path)
    write_visits(store.path, keymap)


def _add_failures(store: CohortStore, failures: list[dict]) -> list[dict]:
    """The store's failure rows with ``failures`` added (a study's newest row wins); a study now in
    the store has none."""
    merged = merge_rows(read_rows(store.failures_path), failures, drop_keys=set(store.study_keys()))
    write_rows(merged, FAILURE_SCHEMA, store.failures_path)
    return merged


def prepare_store(src, store_path, key_file=None) -> tuple[CohortStore, bytes]:
    """The store to convert ``src`` into (made if new; refused where it would hold or lie in the
    source, or inside another store), with the study-key secret it was (or is now) made with."""
    src, store_path = Path(src), Path(store_path)
    if not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    if src.resolve().is_relative_to(store_path.resolve()):
        raise ValueError(f"the source {src} lies inside the store {store_path}; choose another store folder")
    inside = next((p for p in store_path.resolve().parents if dicom._is_store(str(p))), None)
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


def convert_pair(pair, store_path):
    source, key = pair
    return convert_study(source, store_path, key)


def _worker_died(pair, exc):
    """A study whose convert killed its worker: once more alone, then recorded as poison."""
    def poison(pair, exc):
        row = failure_row(pair[1], "convert", StudyError("worker_died", died_message(exc)))
        return {"study_key": pair[1], "status": "failed", "reason": row["reason"], "message": row["message"],
                "seconds": 0.0, "bytes": 0}

    return retry_alone(pair, exc, poison)


def _text(path: str) -> str:
    """A path as table text: names that are not UTF-8 (Latin-1 folders, say) keep their bytes
    as ``\\xNN`` escapes instead of stopping the run."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
