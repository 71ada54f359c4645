"""Volume files: ``<case>_T1`` + ``<case>_T2`` (or nnU-Net's ``<case>_0000`` /
``<case>_0001``) as NIfTI (``.nii``, ``.nii.gz``) or MetaImage (``.mhd``, ``.mha``).
The case name stands in for the StudyInstanceUID.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from kneebatch.geometry import Grid, affine_from_nifti, affine_to_nifti
from kneebatch.errors import StudyError

_PATTERN = re.compile(r"^(?P<case>.+?)_(?P<role>t1|t2|0000|0001)\.(nii|nii\.gz|mhd|mha)$", re.IGNORECASE)
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha")
_ROLE = {"t1": "T1", "0000": "T1", "t2": "T2", "0001": "T2"}


@dataclass
class NiftiStudy:
    study_uid: str  # the case name
    files: dict  # role -> path

    @property
    def source_path(self) -> str:
        return str(Path(self.files.get("T1") or next(iter(self.files.values()))).parent)


def find_nifti_studies(root) -> dict[str, NiftiStudy]:
    cases: dict[str, dict] = defaultdict(dict)
    for path in sorted(p for p in Path(root).rglob("*") if p.name.lower().endswith(VOLUME_SUFFIXES)):
        m = _PATTERN.match(path.name)
        if m and path.is_file():
            cases[m["case"]][_ROLE[m["role"].lower()]] = str(path)
    return {case: NiftiStudy(case, files) for case, files in sorted(cases.items())}


def read_volume(path) -> tuple[np.ndarray, Grid]:
    """NIfTI or MetaImage, by suffix."""
    if str(path).lower().endswith((".mhd", ".mha")):
        from kneebatch.ingest.metaimage import read_metaimage

        return read_metaimage(path)
    return read_nifti(path)


def read_nifti(path) -> tuple[np.ndarray, Grid]:
    """A 3D NIfTI as ``[Z, Y, X]`` (Z = NIfTI k) with our LPS affine; data untouched."""
    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise StudyError("bad_geometry", f"expected a 3D image, got shape {img.shape}")
    data = np.asarray(img.dataobj).transpose(2, 1, 0)
    affine = affine_from_nifti(img.affine)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise StudyError("bad_geometry", "singular or non-finite affine")
    return data, Grid(data.shape, affine)


def to_uint16(data: np.ndarray) -> tuple[np.ndarray, dict]:
    """Store-ready intensities; float images are scaled to 0..4095, the scale recorded."""
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise StudyError("non_finite_values", f"{int(np.sum(~np.isfinite(data)))} voxels")
    if np.issubdtype(data.dtype, np.integer) and data.min() >= 0 and data.max() <= 65535:
        return data.astype(np.uint16), {"scale": 1.0, "offset": 0.0}
    lo, hi = float(np.min(data)), float(np.percentile(data, 99.9))
    scale = 4095.0 / max(hi - lo, 1e-6)
    out = np.clip(np.rint((data.astype(np.float64) - lo) * scale), 0, 65535).astype(np.uint16)
    return out, {"scale": scale, "offset": -lo}


def write_label_nifti(path, labels: np.ndarray, grid: Grid) -> None:
    img = nib.Nifti1Image(np.asarray(labels, np.uint8).transpose(2, 1, 0), affine_to_nifti(grid.affine))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
