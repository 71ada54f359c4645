"""DICOM trees -> studies -> the sagittal T1 and T2 volumes, with their geometry.

Nothing here trusts file names, file order, InstanceNumber or SliceThickness:
slices are ordered by ImagePositionPatient projected on the slice normal, the slice
step comes from those positions, and series roles come from geometry and TR/TE.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from kneebatch.errors import StudyError
from kneebatch.geometry import Grid
from kneebatch.ingest import enhanced
from kneebatch.ingest.roles import contrast_role
from kneebatch.ingest.store import is_store
from kneebatch.ingest.values import first_float, floats, rescale_value, words

_silenced = False


def silence_pydicom() -> None:
    """pydicom's warnings and log lines quote header values (names, descriptions, UIDs): they
    never reach the console, in the driver or in a worker; kneebatch refuses what they warn
    about with a reason of its own. Done when kneebatch first reads DICOM, not on import (and
    never undone: a reader in another thread must not see it lifted)."""
    global _silenced
    if not _silenced:
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
        _silenced = True

HEADER_TAGS = [
    "SpecificCharacterSet", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "ImageType", "SeriesDescription", "SeriesNumber", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "Rows", "Columns", "RepetitionTime", "EchoTime", "NumberOfFrames", "MRAcquisitionType",
    # contrast role (kneebatch.ingest.roles) and knee side
    "ScanningSequence", "SequenceVariant", "SequenceName", "ScanOptions", "InversionTime", "FlipAngle",
    "ProtocolName", "Manufacturer", "Laterality", "ImageLaterality", "BodyPartExamined",
    # the subject and the visit: only the driver sees them, and only the keymap keeps them
    "PatientID", "StudyDate",
    # enhanced (multi-frame) MR: functional groups and the MR Pulse Sequence module
    *enhanced.HEADER_TAGS,
]
MIN_SLICES = 8
SAGITTAL_MAX_ANGLE_DEG = 30.0  # slice normal within this of left-right
MAX_MATRIX = 4096  # rows or columns
MAX_SLICES = 2048
MAX_VOXELS = 400_000_000  # per series, checked from headers before any pixel is read


@dataclass
class FileProblem:
    """A file that is not a usable DICOM image, with a reason code from :mod:`kneebatch.errors`."""

    path: str
    reason: str
    detail: str = ""


@dataclass
class SliceHeader:
    path: str
    study_uid: str
    series_uid: str
    modality: str
    image_type: tuple
    description: str
    position: tuple | None
    orientation: tuple | None
    pixel_spacing: tuple | None
    rows: int
    columns: int
    tr: float | None
    te: float | None
    frames: int
    # contrast role and knee side (see kneebatch.ingest.roles); multi-valued DICOM fields upper-cased
    scanning_sequence: tuple = ()
    sequence_variant: tuple = ()
    scan_options: tuple = ()
    sequence_name: str = ""
    protocol_name: str = ""
    acquisition_type: str = ""  # MRAcquisitionType: 2D or 3D
    ti: float | None = None
    flip_angle: float | None = None
    manufacturer: str = ""
    laterality: str = ""  # L, R or "" (Laterality, ImageLaterality)
    body_part: str = ""
    frame: int = -1  # frame index in an enhanced (multi-frame) object; -1 for a single-frame file
    patient_id: str = ""  # identifiers: the keymap's, never a store's or an output's
    study_date: str = ""  # YYYYMMDD as DICOM writes it


@dataclass
class Series:
    uid: str
    slices: list = field(default_factory=list)

    @property
    def first(self) -> SliceHeader:
        return self.slices[0]

    @property
    def n_files(self) -> int:
        return len({s.path for s in self.slices})  # a multi-frame file holds many slices


@dataclass
class StudyFiles:
    """All files of one study found in the source tree, by series."""

    study_uid: str
    series: dict  # series uid -> Series

    @property
    def source_path(self) -> str:
        paths = [s.path for series in self.series.values() for s in series.slices]
        return os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])

    @property
    def patient_id(self) -> str:
        return next((s.patient_id for series in self.series.values() for s in series.slices if s.patient_id), "")

    @property
    def study_date(self) -> str:
        return next((s.study_date for series in self.series.values() for s in series.slices if s.study_date), "")


# a dataset written without preamble and file meta starts with its first element's tag: an
# even (standard) group of the header modules, little or big endian
_RAW_FIRST_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}


def looks_like_dicom(head: bytes) -> bool:
    """From a file's first 132 bytes: the DICOM preamble and magic, or a raw dataset's first tag.
    Anything else is never handed to the parser, which would read a large junk file whole."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and (int.from_bytes(head[:2], "little") in _RAW_FIRST_GROUPS
                               or int.from_bytes(head[:2], "big") in _RAW_FIRST_GROUPS)


def read_header(path: str) -> SliceHeader | list[SliceHeader] | FileProblem:
    """Header of one file, or why it is not a usable DICOM image.

    A multi-frame object gives a list: one header per frame (``frame`` 0..N-1), with the
    frame's geometry and MR parameters from its functional groups (:mod:`kneebatch.ingest.enhanced`).
    """
    silence_pydicom()
    try:
        if os.path.getsize(path) == 0:
            return FileProblem(path, "not_dicom", "empty file")
        with open(path, "rb") as f:
            if not looks_like_dicom(f.read(132)):
                return FileProblem(path, "not_dicom", "no DICOM preamble or dataset at its start")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except InvalidDicomError:
            # datasets written without preamble and file meta: read them as raw datasets
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS, force=True)
            if "SOPClassUID" not in ds and "StudyInstanceUID" not in ds:
                return FileProblem(path, "not_dicom", "no DICOM preamble, meta header or dataset")
    except OSError as e:
        return FileProblem(path, "unreadable_file", e.strerror or type(e).__name__)
    except Exception as e:  # pydicom raises many types on damaged files
        return FileProblem(path, "not_dicom", f"{type(e).__name__} while parsing")
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not study_uid or not series_uid:
        return FileProblem(path, "missing_uid")
    if not ds.get("Rows") or not ds.get("Columns"):
        return FileProblem(path, "not_an_image")  # its Modality is a header value: never quoted
    image_type = tuple(str(x).upper() for x in (ds.get("ImageType") or ()))
    header = SliceHeader(
        path=str(path),
        study_uid=study_uid,
        series_uid=series_uid,
        modality=str(ds.get("Modality", "") or ""),
        image_type=image_type,
        description=str(ds.get("SeriesDescription", "") or ""),
        position=floats(ds.get("ImagePositionPatient"), 3),
        orientation=floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=floats(ds.get("PixelSpacing"), 2),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        tr=first_float(ds.get("RepetitionTime")),
        te=first_float(ds.get("EchoTime")),
        frames=int(first_float(ds.get("NumberOfFrames")) or 1),
        scanning_sequence=words(ds.get("ScanningSequence")),
        sequence_variant=words(ds.get("SequenceVariant")),
        scan_options=words(ds.get("ScanOptions")),
        sequence_name=str(ds.get("SequenceName", "") or ""),
        protocol_name=str(ds.get("ProtocolName", "") or ""),
        acquisition_type=str(ds.get("MRAcquisitionType", "") or "").upper(),
        ti=first_float(ds.get("InversionTime")),
        flip_angle=first_float(ds.get("FlipAngle")),
        manufacturer=str(ds.get("Manufacturer", "") or ""),
        laterality=str(ds.get("Laterality", "") or ds.get("ImageLaterality", "") or "").upper()[:1],
        body_part=str(ds.get("BodyPartExamined", "") or "").upper(),
        patient_id=str(ds.get("PatientID", "") or "").strip(),
        study_date=str(ds.get("StudyDate", "") or "").strip(),
    )
    if header.frames <= 1:
        return header
    if header.frames > enhanced.MAX_FRAMES:
        return FileProblem(path, "too_large", f"{header.frames} frames")
    try:
        frames = enhanced.frame_fields(ds, series_uid)
    except Exception as e:  # malformed functional groups
        return FileProblem(path, "not_dicom", f"{type(e).__name__} in the functional groups")
    return [replace(header, frames=len(frames), **f) for f in frames]


def is_special(path: str) -> bool:
    """A device, FIFO or socket, or a link to one: reading it could block or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a dangling link: read, and refused as unreadable
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def list_files(root: str | os.PathLike, skip: str | os.PathLike | None = None,
               specials: list | None = None) -> list[str]:
    """Every file below ``root``, dangling links included (they become 'unreadable_file' rows),
    except in kneebatch cohort stores and below ``skip``. Devices, FIFOs and sockets (or links
    to them) are left out, into ``specials`` when given.

    Symbolic links to directories are not followed, so link loops cannot trap the walk.
    """
    out = []
    skip = os.path.realpath(skip) if skip else None
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not is_store(os.path.join(dirpath, d))
                   and (skip is None or os.path.realpath(os.path.join(dirpath, d)) != skip)]
        for name in files:
            p = os.path.join(dirpath, name)
            if is_special(p):
                if specials is not None:
                    specials.append(p)
            elif os.path.isfile(p) or os.path.islink(p):
                out.append(p)
    out.sort()
    return out


def group_studies(headers) -> dict[str, StudyFiles]:
    studies: dict[str, dict[str, Series]] = defaultdict(dict)
    for h in headers:
        series = studies[h.study_uid].setdefault(h.series_uid, Series(h.series_uid))
        series.slices.append(h)
    return {uid: StudyFiles(uid, s) for uid, s in sorted(studies.items())}


def collisions(studies: dict) -> dict[str, str]:
    """Study UID -> why it cannot be trusted as one study (``uid_collision``): two PatientIDs or
    two StudyDates under one StudyInstanceUID, a SeriesInstanceUID in two studies, or one series
    UID over two geometries (matrix or orientation). Merged, one patient would vanish into
    another's study; every study involved is refused instead. Counts only, never the values."""
    out: dict[str, str] = {}
    studies_of_series = defaultdict(set)
    for uid, study in studies.items():
        if not isinstance(study, StudyFiles):
            continue
        slices = [h for series in study.series.values() for h in series.slices]
        patients = {h.patient_id for h in slices if h.patient_id}
        dates = {h.study_date for h in slices if h.study_date}
        if len(patients) > 1:
            out[uid] = f"{len(patients)} patient IDs under one StudyInstanceUID"
        elif len(dates) > 1:
            out[uid] = f"{len(dates)} study dates under one StudyInstanceUID"
        for series_uid, series in study.series.items():
            studies_of_series[series_uid].add(uid)
            geometries = Counter((h.rows, h.columns, tuple(np.round(h.orientation, 3)) if h.orientation else None)
                                 for h in series.slices)
            if sum(n >= MIN_SLICES for n in geometries.values()) > 1:
                out.setdefault(uid, "one SeriesInstanceUID holds two stacks of different geometry")
    for uids in studies_of_series.values():
        if len(uids) > 1:
            for uid in uids:
                out.setdefault(uid, f"a SeriesInstanceUID found in {len(uids)} studies")
    return out


# ------------------------------------------------------------------ series roles
def slice_normal(orientation) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    return n / np.linalg.norm(n)


def is_sagittal(orientation) -> bool:
    if orientation is None:
        return False
    n = slice_normal(orientation)
    return abs(n[0]) >= np.cos(np.radians(SAGITTAL_MAX_ANGLE_DEG))


def impossible_geometry(h: SliceHeader) -> bool:
    """An orientation that is missing, zero, not finite or not two orthonormal vectors, or a pixel
    spacing that is not positive and finite: a series with one is refused, never measured (a
    negative spacing would mirror the image; a zero orientation has no slice normal)."""
    if h.orientation is None or h.pixel_spacing is None:
        return True
    o, sp = np.asarray(h.orientation, float), np.asarray(h.pixel_spacing, float)
    if not (np.all(np.isfinite(o)) and np.all(np.isfinite(sp)) and np.all(sp > 0)):
        return True
    return not orthonormal(o)


def orthonormal(orientation) -> bool:
    """ImageOrientationPatient as two unit vectors at a right angle (to 1e-3)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return abs(np.linalg.norm(row) - 1) <= 1e-3 and abs(np.linalg.norm(col) - 1) <= 1e-3 and abs(row @ col) <= 1e-3


def classify(series: Series) -> tuple[str | None, str]:
    """(role, why): the contrast role of a usable sagittal MR series, else None and the reason code."""
    h = series.first
    if h.modality != "MR":
        return None, "not_mr"
    if "LOCALIZER" in h.image_type:
        return None, "localizer"
    if any(s.frame >= 0 and s.position is None for s in series.slices):
        # frames of a multi-frame object without PlanePositionSequence: they cannot be placed
        return None, "multiframe_no_positions"
    if any(impossible_geometry(s) for s in series.slices):
        return None, "bad_geometry"
    if not is_sagittal(h.orientation):
        return None, "not_sagittal"
    if len(series.slices) < MIN_SLICES:
        return None, "too_few_slices"
    return contrast_role(h), ""


# when no sagittal MR series is usable at all, the most telling cause names the failure
_STUDY_CAUSES = ("bad_geometry", "too_few_slices", "not_sagittal", "not_mr")


def _voxels(series: Series) -> int:
    return len(series.slices) * series.first.rows * series.first.columns


def choose_series(study: StudyFiles) -> dict[str, Series]:
    """Every usable sagittal MR series by contrast role; of several with one role, the most voxels.

    Raises the most telling cause when no series is usable."""
    return sort_series(study)[0]


def sort_series(study: StudyFiles) -> tuple[dict[str, Series], list[dict]]:
    """:func:`choose_series`'s choice, and a record of every series left out with its reason
    code (no header values), so a study stored without its T1 says why."""
    best: dict[str, Series] = {}
    rejected, left_out = [], []
    for series in study.series.values():
        role, why = classify(series)
        if role is None:
            rejected.append(why)
            left_out.append({"role": None, "used": False, "reason": why, "n_files": series.n_files})
        elif role not in best or _voxels(series) > _voxels(best[role]):
            if role in best:
                left_out.append(_smaller(best[role], role))
            best[role] = series
        else:
            left_out.append(_smaller(series, role))
    if not best:
        detail = f"{len(study.series)} series; rejected: " + (", ".join(sorted(rejected)) or "none")
        cause = next((c for c in _STUDY_CAUSES if c in rejected), "no_usable_series")
        raise StudyError(cause, detail)
    return best, left_out


def _smaller(series: Series, role: str) -> dict:
    return {"role": role, "used": False, "reason": "another_series_of_the_role_has_more_voxels",
            "n_files": series.n_files}


def knee_side(headers) -> str | None:
    """'left' or 'right' from Laterality / ImageLaterality, else the words of BodyPartExamined or
    SeriesDescription (the OAI names the side there: SAG_3D_DESS_RIGHT), if any header says."""
    headers = list(headers)
    for h in headers:
        if h.laterality in ("L", "R"):
            return {"L": "left", "R": "right"}[h.laterality]
    for h in headers:
        words = set(re.split(r"[^A-Z]+", f"{h.body_part} {h.description.upper()}"))
        if words & {"LEFT", "LT"}:
            return "left"
        if words & {"RIGHT", "RT"}:
            return "right"
    return None


# ------------------------------------------------------------------ stacking
def stack_geometry(headers: list[SliceHeader]) -> tuple[list[int], Grid]:
    """Slice order along the normal and the grid, after checking the stack is regular."""
    if len(headers) < MIN_SLICES:
        raise StudyError("too_few_slices", f"{len(headers)} slices")
    first = headers[0]
    voxels = len(headers) * first.rows * first.columns
    if first.rows > MAX_MATRIX or first.columns > MAX_MATRIX or len(headers) > MAX_SLICES or voxels > MAX_VOXELS:
        raise StudyError("too_large", f"{len(headers)} x {first.rows} x {first.columns}")
    for h in headers:
        if h.orientation is None or h.position is None or h.pixel_spacing is None:
            raise StudyError("bad_geometry", "ImagePositionPatient, ImageOrientationPatient or PixelSpacing missing")
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise StudyError("inconsistent_size", f"{h.rows}x{h.columns} vs {first.rows}x{first.columns}")
        if not np.allclose(h.orientation, first.orientation, atol=1e-4):
            raise StudyError("inconsistent_orientation")
        if not np.allclose(h.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise StudyError("inconsistent_spacing", f"{h.pixel_spacing} vs {first.pixel_spacing}")
    row_dir = np.asarray(first.orientation[:3])
    col_dir = np.asarray(first.orientation[3:])
    if not orthonormal(first.orientation):
        raise StudyError("bad_geometry", "ImageOrientationPatient is not two orthonormal vectors")
    normal = slice_normal(first.orientation)
    positions = np.array([h.position for h in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    step = float(np.median(steps))
    if np.any(steps < 1e-3 * max(abs(step), 1e-3)) or step <= 0:
        raise StudyError("duplicate_slice", f"{int(np.sum(steps < 1e-3 * max(step, 1e-3)))} duplicate position(s)")
    tol = max(0.02 * step, 0.01)
    bad = np.abs(steps - step) > tol
    if np.any(bad):
        ratios = steps[bad] / step
        if np.all(np.abs(ratios - np.round(ratios)) * step < tol) and np.all(np.round(ratios) >= 2):
            missing = int(np.sum(np.round(ratios) - 1))
            raise StudyError("missing_slice", f"{missing} slice(s) missing, step {step:.3f} mm")
        raise StudyError("irregular_spacing", f"steps from {steps.min():.3f} to {steps.max():.3f} mm")
    # positions may drift off the normal (sheared stacks); the step vector keeps them exact
    sorted_pos = positions[order]
    step_vec = (sorted_pos[-1] - sorted_pos[0]) / (len(headers) - 1)
    dy, dx = first.pixel_spacing  # DICOM: (row spacing, column spacing)
    affine = np.eye(4)
    affine[:3, 0] = step_vec
    affine[:3, 1] = col_dir * dy
    affine[:3, 2] = row_dir * dx
    affine[:3, 3] = sorted_pos[0]
    return [int(i) for i in order], Grid((len(headers), first.rows, first.columns), affine)


def read_series(series: Series, hasher: hashlib._Hash | None = None) -> tuple[np.ndarray, Grid]:
    """The series as a ``[Z, Y, X]`` uint16 volume (slices along the normal) and its grid.

    A multi-frame file is read and decoded once, however many of its frames the series holds."""
    order, grid = stack_geometry(series.slices)
    volume = np.empty(grid.shape, np.uint16)
    uses = Counter(h.path for h in series.slices)
    decoded: dict[str, tuple] = {}  # multi-frame files still needed: path -> (dataset, all frames)
    for z, i in enumerate(order):
        h = series.slices[i]
        if h.path in decoded:
            ds, pixels = decoded[h.path]
        else:
            ds, pixels = _read_pixels(h, z, hasher)
            if h.frame >= 0:
                if pixels.shape != (h.frames, *grid.shape[1:]):
                    raise StudyError("unreadable_pixels",
                                     f"pixel array {pixels.shape} does not match {h.frames} frames of {grid.shape[1:]}")
                decoded[h.path] = ds, pixels
        uses[h.path] -= 1
        if uses[h.path] == 0:
            decoded.pop(h.path, None)
        if h.frame >= 0:
            pixels = pixels[h.frame]
            slope, intercept = enhanced.frame_rescale(ds, h.frame)
        else:
            slope, intercept = rescale_value(ds.get("RescaleSlope"), 1.0), rescale_value(ds.get("RescaleIntercept"), 0.0)
        if pixels.shape != grid.shape[1:]:
            raise StudyError("unreadable_pixels", f"pixel array {pixels.shape} does not match {grid.shape[1:]}")
        volume[z] = to_stored(pixels, slope, intercept, z)
    return volume, grid


def to_stored(pixels: np.ndarray, slope: float, intercept: float, z: int) -> np.ndarray:
    """One slice's stored values (``pixels * slope + intercept`` as uint16), or a refusal:
    a zero or non-finite scaling, or values a uint16 store cannot hold, are never clipped."""
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
        raise StudyError("bad_scaling", f"RescaleSlope {slope}, RescaleIntercept {intercept} in slice {z}")
    if pixels.dtype.kind == "f" and not np.all(np.isfinite(pixels)):  # float pixel data: NaN would store as 0
        raise StudyError("non_finite_values", f"slice {z}")
    values = np.rint(pixels.astype(np.float64) * slope + intercept) if (slope, intercept) != (1.0, 0.0) else pixels
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise StudyError("out_of_range_values", f"values {values.min():g} to {values.max():g} in slice {z}")
    return values.astype(np.uint16)


def _decoder_available(syntax) -> bool:
    """Whether pydicom has a working decoder for ``syntax`` (then a failure is the data's, not a
    missing package's)."""
    try:
        from pydicom.pixels.decoders.base import get_decoder

        return get_decoder(syntax).is_available
    except Exception:  # noqa: BLE001 - a syntax pydicom has no decoder class for
        return False


def check_pixel_length(ds, z: int) -> None:
    """Uncompressed pixel data must be Rows x Columns x frames x samples x bytes long (one pad
    byte allowed): longer data is read as if it were the image and would be measured."""
    syntax = pydicom.uid.UID(str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or ""))
    if "PixelData" not in ds or (syntax and syntax.is_compressed):
        return
    try:
        frames = int(first_float(ds.get("NumberOfFrames")) or 1)
        expected = int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1) or 1) \
            * int(ds.BitsAllocated) // 8
        length = len(ds.PixelData)
    except Exception as e:  # an attribute missing or not a number: the decoder would fail too
        raise StudyError("unreadable_pixels", f"{type(e).__name__} reading the pixel description of slice {z}") from e
    if length not in (expected, expected + 1):
        raise StudyError("pixel_data_length", f"slice {z}: {length} bytes of pixel data where the header "
                                              f"describes {expected}")


def _read_pixels(h: SliceHeader, z: int, hasher) -> tuple:
    """(dataset, pixel array) of the file holding slice ``z``; its bytes go into ``hasher``."""
    silence_pydicom()
    data = Path(h.path).read_bytes()
    if hasher is not None:
        hasher.update(data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # pydicom raises many types on damaged files
        raise StudyError("unreadable_pixels", f"{type(e).__name__} parsing slice {z}") from e
    check_pixel_length(ds, z)
    try:
        return ds, ds.pixel_array
    except Exception as e:  # decoders raise many types
        syntax = pydicom.uid.UID(str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or ""))
        hint = (f"; {syntax.name} needs a decoder: pip install 'kneebatch[dicom-codecs]'"
                if syntax and syntax.is_compressed and not _decoder_available(syntax) else "")
        raise StudyError("unreadable_pixels", f"{type(e).__name__} in slice {z}{hint}") from e
