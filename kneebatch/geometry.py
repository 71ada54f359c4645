"""Voxel grids in patient space.

Conventions (used everywhere in kneebatch):

* arrays are indexed ``[..., z, y, x]``; ``z`` is the slice axis (the through-plane
  direction of the acquisition), ``y`` the image row, ``x`` the image column;
* ``affine`` is 4x4 and maps a voxel index ``(z, y, x, 1)`` to patient coordinates in
  **LPS millimetres** (DICOM's frame);
* ``spacing`` is ``(dz, dy, dx)`` in mm, the column norms of the affine.

NIfTI stores ``(i, j, k) -> RAS``; :func:`affine_to_nifti` / :func:`affine_from_nifti`
translate without touching voxel data beyond a transpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_REVERSE_AXES = [2, 1, 0, 3]  # (z, y, x) <-> (i, j, k) = (x, y, z) columns


@dataclass(frozen=True)
class Grid:
    """A voxel grid: its shape ``(Z, Y, X)`` and its index->LPS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)

    def __post_init__(self):
        a = np.asarray(self.affine, dtype=np.float64)
        if a.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {a.shape}")
        object.__setattr__(self, "affine", a)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @classmethod
    def from_parts(cls, shape, spacing, origin, direction) -> Grid:
        """``direction`` columns are the unit vectors of the z, y, x index axes (LPS)."""
        a = np.eye(4)
        a[:3, :3] = np.asarray(direction, float) * np.asarray(spacing, float)[None, :]
        a[:3, 3] = origin
        return cls(tuple(shape), a)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def index_to_world(self, idx) -> np.ndarray:
        idx = np.asarray(idx, float)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, pts) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        pts = np.asarray(pts, float)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def crop(self, starts, shape) -> Grid:
        """Grid of the sub-block ``[starts, starts + shape)``: only the origin moves."""
        a = self.affine.copy()
        a[:3, 3] = self.index_to_world(starts)
        return Grid(tuple(shape), a)

    def same_as(self, other: Grid, atol_mm: float = 1e-3) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol_mm)

    def to_attrs(self) -> dict:
        return {
            "shape_zyx": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.tolist(),
            "affine": self.affine.tolist(),
            "frame": "LPS",
            "index_order": "zyx",
            "units": "mm",
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> Grid:
        return cls(tuple(attrs["shape_zyx"]), np.asarray(attrs["affine"], float))


def affine_to_nifti(affine_zyx_lps: np.ndarray) -> np.ndarray:
    """Our (z,y,x)->LPS affine as a NIfTI (i,j,k)->RAS affine for ``arr.transpose(2,1,0)``."""
    return LPS_TO_RAS @ np.asarray(affine_zyx_lps, float)[:, _REVERSE_AXES]


def affine_from_nifti(affine_ijk_ras: np.ndarray) -> np.ndarray:
    """A NIfTI (i,j,k)->RAS affine as our (z,y,x)->LPS affine for ``data.transpose(2,1,0)``."""
    return (LPS_TO_RAS @ np.asarray(affine_ijk_ras, float))[:, _REVERSE_AXES]


def resample(array: np.ndarray, src: Grid, dst: Grid, order: int = 1, cval: float = 0.0,
             mode: str = "constant") -> np.ndarray:
    """Sample ``array`` (on ``src``) at the voxel centres of ``dst``.

    ``order=1`` trilinear for images, ``order=0`` nearest for label maps; outside ``src``
    ``cval`` (``mode="constant"``) or the nearest edge value (``mode="nearest"``).
    """
    from scipy import ndimage

    if src.same_as(dst):
        return np.asarray(array).copy()
    # dst index -> world -> src index, as one affine
    m = np.linalg.inv(src.affine) @ dst.affine
    out = ndimage.affine_transform(
        np.asarray(array, dtype=np.float32 if order else array.dtype),
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=dst.shape,
        order=order,
        mode=mode,
        cval=cval,
        prefilter=False,
    )
    return out


# ------------------------------------------------------------------ canonical voxel order
# The store's one voxel order, whatever the source: z runs to the patient's right, y to inferior,
# x to posterior (LPS unit vectors), i.e. sagittal slices shown as a radiologist reads them. The
# shipped nets were trained on this order.
CANONICAL_LPS = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]).T  # columns: z, y, x


@dataclass(frozen=True)
class Reorientation:
    """An exact change of voxel order: canonical axis ``i`` is source axis ``permutation[i]``,
    reversed where ``flip[i]``. No resampling; :meth:`apply` and :meth:`invert` are inverses."""

    permutation: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flip)

    def apply(self, array, source: Grid):
        """``array`` (``[..., z, y, x]`` on ``source``) and its grid in the canonical order."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + p for p in self.permutation)))
        flips = tuple(lead + i for i in range(3) if self.flip[i])
        out = np.flip(out, flips) if flips else out
        return np.ascontiguousarray(out), self.grid(source)

    def grid(self, source: Grid) -> Grid:
        a = np.eye(4)
        start = np.zeros(3)
        for i, (p, f) in enumerate(zip(self.permutation, self.flip)):
            a[:3, i] = source.affine[:3, p] * (-1.0 if f else 1.0)
            start[p] = source.shape[p] - 1 if f else 0
        a[:3, 3] = source.index_to_world(start)
        return Grid(tuple(source.shape[p] for p in self.permutation), a)

    def invert(self, array, source: Grid) -> np.ndarray:
        """A canonical-order ``array`` back in the voxel order of ``source``."""
        lead = array.ndim - 3
        flips = tuple(lead + i for i in range(3) if self.flip[i])
        out = np.flip(array, flips) if flips else array
        inverse = np.argsort(self.permutation)
        return np.ascontiguousarray(np.transpose(out, (*range(lead), *(lead + int(p) for p in inverse))))

    def to_attrs(self) -> dict:
        return {"permutation": list(self.permutation), "flip": list(self.flip)}

    @classmethod
    def from_attrs(cls, attrs: dict) -> Reorientation:
        return cls(tuple(int(p) for p in attrs["permutation"]), tuple(bool(f) for f in attrs["flip"]))


_LPS_OF = {"R": (-1.0, 0, 0), "L": (1.0, 0, 0), "A": (0, -1.0, 0), "P": (0, 1.0, 0), "S": (0, 0, 1.0),
           "I": (0, 0, -1.0)}


def orientation_direction(code: str) -> np.ndarray:
    """LPS unit vectors (columns: array axes z, y, x) of the arrays that SimpleITK, and so
    nnU-Net, reads from a NIfTI whose axes i, j, k point to the letters of ``code`` (``RAS``: what
    nibabel's ``as_closest_canonical`` and TotalSegmentator give): the array is ``[k, j, i]``."""
    code = code.upper()
    if len(code) != 3 or set(code) - set(_LPS_OF) or len({"RLAPSI".index(c) // 2 for c in code}) != 3:
        raise ValueError(f"axis order {code!r} is not three of R/L, A/P, S/I, one of each (e.g. RAS, LPS, PIR)")
    return np.array([_LPS_OF[code[2]], _LPS_OF[code[1]], _LPS_OF[code[0]]], float).T


def to_canonical(grid: Grid, target: np.ndarray = CANONICAL_LPS) -> Reorientation:
    """The axis permutation and flips that bring ``grid`` nearest to the canonical order (or to
    the order whose axes' LPS directions are the columns of ``target``).

    Each canonical axis takes the source axis best aligned with it (the assignment with the
    largest total alignment among the six permutations), so oblique grids stay oblique.
    """
    from itertools import permutations

    cos = np.asarray(target).T @ grid.direction  # [canonical axis, source axis]
    best = max(permutations(range(3)), key=lambda p: sum(abs(cos[i, p[i]]) for i in range(3)))
    return Reorientation(tuple(int(p) for p in best), tuple(bool(cos[i, best[i]] < 0) for i in range(3)))


def obliquity_deg(grid: Grid) -> float:
    """Largest angle between an index axis and its nearest patient axis (0 for a true sagittal grid)."""
    cos = np.clip(np.max(np.abs(grid.direction), axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos.min())))
