"""Volume files: ``<case>_<ROLE>`` (``_T1``, ``_T2FS``, ``_DESS``, ...; or nnU-Net's
``<case>_0000``, ``_0001`` with a suffix -> role mapping) as NIfTI (``.nii``, ``.nii.gz``)
or MetaImage (``.mhd``, ``.mha``), in any voxel order. The case name stands in for the
StudyInstanceUID.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from kneebatch.errors import StudyError
from kneebatch.geometry import Grid, affine_from_nifti, affine_to_nifti
from kneebatch.ingest.roles import ROLES

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha")
_PATTERN = re.compile(r"^(?P<case>.+)_(?P<role>[A-Za-z0-9]+)\.(nii|nii\.gz|mhd|mha)$", re.IGNORECASE)
NNUNET_CHANNELS = {"0000": "T1", "0001": "T2"}  # nnU-Net channel suffixes, unless --channels says otherwise
MAX_VOXELS = 400_000_000  # per volume, checked from the header before any voxel is read


@dataclass
class NiftiStudy:
    study_uid: str  # the case name (with its folder when two folders hold one case name)
    files: dict  # role -> path
    left_out: list = field(default_factory=list)  # series named for the case but not readable files

    @property
    def source_path(self) -> str:
        return str(Path(next(iter(self.files.values()))).parent)


def volume_stem(path) -> str:
    """A volume file's name without its suffix (``1.2.3_labels.nii.gz`` -> ``1.2.3_labels``)."""
    name = Path(path).name
    return next((name[: -len(sfx)] for sfx in VOLUME_SUFFIXES if name.lower().endswith(sfx)), name)


def is_label_file(path) -> bool:
    """``<name>_labels.nii.gz`` (as ``kneebatch export`` writes): a label map, not an image."""
    return bool(re.match(r"^.+_labels\.(nii|nii\.gz|mhd|mha)$", Path(path).name, re.IGNORECASE))


def parse_channels(text: str) -> dict[str, str]:
    """``"0000:DESS,0001:PDFS"`` -> {"0000": "DESS", "0001": "PDFS"} (nnU-Net channel suffix -> role)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        suffix, _, role = item.partition(":")
        role = _role(role.strip())
        if not re.fullmatch(r"\d{4}", suffix.strip()) or role is None:
            raise ValueError(f"--channels: {item!r} is not SUFFIX:ROLE with a 4-digit suffix and a role of "
                             f"{', '.join(ROLES)}")
        out[suffix.strip()] = role
    return out


def _role(word: str) -> str | None:
    return next((r for r in ROLES if r.lower() == word.lower()), None)


def find_nifti_studies(root, channels: dict[str, str] | None = None, files=None) -> dict[str, NiftiStudy]:
    """``<case>_<ROLE>.nii.gz`` (ROLE one of ``ROLES``, any case) or nnU-Net ``<case>_0000``
    files below ``root``, grouped by case. A case name found in two folders is two studies,
    named by their folder relative to ``root``. ``files``: the files to consider (default: all
    below ``root``)."""
    channels = NNUNET_CHANNELS if channels is None else channels
    cases: dict[tuple, dict] = defaultdict(dict)
    unreadable: dict[tuple, list] = defaultdict(list)
    root = Path(root)
    paths = root.rglob("*") if files is None else map(Path, files)
    for path in sorted(p for p in paths if p.name.lower().endswith(VOLUME_SUFFIXES)):
        m = _PATTERN.match(path.name)
        if not m or path.is_dir():
            continue
        role = _role(m["role"]) or channels.get(m["role"])
        if role is None:
            continue
        case = (m["case"], str(path.parent.relative_to(root)))
        if path.is_file():
            cases[case][role] = str(path)
        else:  # a device, FIFO or socket (never read: /dev/zero never ends), or a dangling link
            reason = "special_file" if os.path.exists(path) else "unreadable_file"
            unreadable[case].append({"role": role, "used": False, "reason": reason})
    names = defaultdict(list)
    for case, folder in cases:
        names[case].append(folder)
    out = {}
    for (case, folder), files in sorted(cases.items()):
        name = case if len(names[case]) == 1 else f"{folder}/{case}"
        out[name] = NiftiStudy(name, files, unreadable.get((case, folder), []))
    return out


def read_volume(path) -> tuple[np.ndarray, Grid]:
    """NIfTI or MetaImage, by suffix."""
    if str(path).lower().endswith((".mhd", ".mha")):
        from kneebatch.ingest.metaimage import read_metaimage

        return read_metaimage(path)
    return read_nifti(path)


def read_nifti(path) -> tuple[np.ndarray, Grid]:
    """A 3D NIfTI as ``[Z, Y, X]`` (Z = NIfTI k) with our LPS affine, in the file's voxel order."""
    try:
        logging.getLogger("nibabel").setLevel(logging.ERROR)  # it prints the headers it repairs; kneebatch refuses them
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types on damaged files; its texts name the path
        raise StudyError("unreadable_pixels", f"{type(e).__name__} reading the NIfTI header") from None
    shape = tuple(int(v) for v in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise StudyError("bad_geometry", f"expected a 3D image, got shape {tuple(img.shape)}")
    if np.prod(shape, dtype=np.float64) > MAX_VOXELS:
        raise StudyError("too_large", " x ".join(map(str, shape)))
    dtype = img.get_data_dtype()
    if dtype.kind not in "uif" or dtype.fields is not None:
        raise StudyError("bad_dtype", str(dtype))
    slope, inter, pixdim = _raw_fields(path, img.header)
    if not (np.isfinite(slope) and np.isfinite(inter)):  # 0 is "no scaling" in the standard
        raise StudyError("bad_scaling", f"scl_slope {slope}, scl_inter {inter}")
    if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)) and not (
            int(img.header.get("sform_code", 0)) or int(img.header.get("qform_code", 0))):
        raise StudyError("bad_geometry", f"voxel size {pixdim.tolist()} mm")
    try:
        data = np.asarray(img.dataobj).reshape(shape).transpose(2, 1, 0)
    except Exception as e:  # short or damaged data
        raise StudyError("unreadable_pixels", f"{type(e).__name__} reading the voxels") from None
    affine = affine_from_nifti(img.affine)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise StudyError("bad_geometry", "singular or non-finite affine")
    return data, Grid(data.shape, affine)


def _raw_fields(path, header) -> tuple[float, float, np.ndarray]:
    """scl_slope, scl_inter and pixdim[1:4] as the file holds them: nibabel quietly drops an
    unusable scaling and turns a 0 mm voxel size into 1 mm."""
    if not isinstance(header, nib.Nifti1Header):
        return 1.0, 0.0, np.ones(3)
    nifti2 = isinstance(header, nib.Nifti2Header)
    dtype = header.endianness + ("f8" if nifti2 else "f4")
    pixdim_at, slope_at = (104, 176) if nifti2 else (76, 112)
    with nib.openers.ImageOpener(str(path)) as f:
        block = f.read(slope_at + 2 * np.dtype(dtype).itemsize)
    pixdim = np.frombuffer(block[pixdim_at:], dtype=dtype, count=4)[1:]
    slope, inter = np.frombuffer(block[slope_at:], dtype=dtype, count=2)
    return float(slope), float(inter), pixdim.astype(np.float64)


def to_uint16(data: np.ndarray) -> tuple[np.ndarray, dict]:
    """Store-ready intensities: integers as they are (refused outside 0..65535, never clipped);
    float images scaled to 0..4095, the scale recorded."""
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise StudyError("non_finite_values", f"{int(np.sum(~np.isfinite(data)))} voxels")
    if np.issubdtype(data.dtype, np.integer):
        if data.size and (data.min() < 0 or data.max() > 65535):
            raise StudyError("out_of_range_values", f"values {data.min()} to {data.max()}")
        return data.astype(np.uint16), {"scale": 1.0, "offset": 0.0}
    lo, hi = float(np.min(data)), float(np.percentile(data, 99.9))
    scale = 4095.0 / max(hi - lo, 1e-6)
    out = np.clip(np.rint((data.astype(np.float64) - lo) * scale), 0, 65535).astype(np.uint16)
    return out, {"scale": scale, "offset": -lo}


def write_label_nifti(path, labels: np.ndarray, grid: Grid) -> None:
    write_image_nifti(path, np.asarray(labels, np.uint8), grid)


def write_image_nifti(path, data: np.ndarray, grid: Grid) -> None:
    """``data`` ``[Z, Y, X]`` on ``grid`` as NIfTI (qform = sform, scanner frame), written atomically."""
    img = nib.Nifti1Image(np.asarray(data).transpose(2, 1, 0), affine_to_nifti(grid.affine))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")
    nib.save(img, str(tmp))
    tmp.replace(path)
