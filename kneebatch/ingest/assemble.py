"""One study's series -> one stored study: the reference grid, the channels resampled onto it,
what is recorded of every series (used or left out, and why).

The batch over a source tree (scan, key, skip, shard, record failures) is
:mod:`kneebatch.jobs.convert`; this module knows one study and the store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kneebatch.errors import StudyError
from kneebatch.geometry import Grid, obliquity_deg, resample, to_canonical
from kneebatch.ingest import dicom, nifti
from kneebatch.ingest.roles import ROLES
from kneebatch.ingest.store import CohortStore


def convert_study(source, store_path: str, key: str) -> int:
    """Convert one study (DICOM files or NIfTI volumes) into the store; the image bytes written.
    Raises :class:`~kneebatch.errors.StudyError` (or any error of a reader) for the study's row."""
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
    return int(image.nbytes)


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

