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
    def from_parts(cls, shape, spacing, origin, direction) -> "Grid":
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

    def crop(self, starts, shape) -> "Grid":
        """Grid of the sub-block ``[starts, starts + shape)``: only the origin moves."""
        a = self.affine.copy()
        a[:3, 3] = self.index_to_world(starts)
        return Grid(tuple(shape), a)

    def same_as(self, other: "Grid", atol_mm: float = 1e-3) -> bool:
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
    def from_attrs(cls, attrs: dict) -> "Grid":
        return cls(tuple(attrs["shape_zyx"]), np.asarray(attrs["affine"], float))


def affine_to_nifti(affine_zyx_lps: np.ndarray) -> np.ndarray:
    """Our (z,y,x)->LPS affine as a NIfTI (i,j,k)->RAS affine for ``arr.transpose(2,1,0)``."""
    return LPS_TO_RAS @ np.asarray(affine_zyx_lps, float)[:, _REVERSE_AXES]


def affine_from_nifti(affine_ijk_ras: np.ndarray) -> np.ndarray:
    """A NIfTI (i,j,k)->RAS affine as our (z,y,x)->LPS affine for ``data.transpose(2,1,0)``."""
    return (LPS_TO_RAS @ np.asarray(affine_ijk_ras, float))[:, _REVERSE_AXES]


def resample(array: np.ndarray, src: Grid, dst: Grid, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Sample ``array`` (on ``src``) at the voxel centres of ``dst``.

    ``order=1`` trilinear for images, ``order=0`` nearest for label maps.
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
        mode="constant",
        cval=cval,
        prefilter=False,
    )
    return out
