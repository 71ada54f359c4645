"""Array-module-agnostic volume ops: one code path for NumPy, CuPy and torch.

Functions take arrays of any Array-API namespace (NumPy, CuPy, torch, or
``array_api_strict`` in tests) and return arrays of the same namespace. Where a
library has a faster non-standard primitive (``bincount``), it is used; the
standard fallback gives identical results.
"""

from __future__ import annotations

import array_api_compat


def namespace(*arrays):
    return array_api_compat.array_namespace(*arrays)


def label_counts(labels, n_classes: int):
    """Voxels per label id ``0..n_classes-1`` (int64), the basis of every volume."""
    xp = namespace(labels)
    flat = xp.reshape(xp.astype(labels, xp.int64), (-1,))
    if hasattr(xp, "bincount"):
        return xp.bincount(flat, minlength=n_classes)[:n_classes]
    return xp.stack([xp.sum(xp.astype(flat == k, xp.int64)) for k in range(n_classes)])


def label_sums(labels, values, n_classes: int):
    """Sum of ``values`` (float64) over the voxels of each label id."""
    xp = namespace(labels, values)
    flat = xp.reshape(xp.astype(labels, xp.int64), (-1,))
    vals = xp.reshape(xp.astype(values, xp.float64), (-1,))
    if hasattr(xp, "bincount"):
        return xp.bincount(flat, weights=vals, minlength=n_classes)[:n_classes]
    zero = xp.zeros_like(vals)
    return xp.stack([xp.sum(xp.where(flat == k, vals, zero)) for k in range(n_classes)])


def label_means(labels, values, n_classes: int):
    """Mean of ``values`` per label; NaN where a label is absent."""
    xp = namespace(labels, values)
    counts = xp.astype(label_counts(labels, n_classes), xp.float64)
    sums = label_sums(labels, values, n_classes)
    nan = xp.full_like(sums, float("nan"))
    return xp.where(counts > 0, sums / xp.where(counts > 0, counts, xp.ones_like(counts)), nan)


def bounding_box(mask, margin=(0, 0, 0)):
    """Index slices of the smallest box holding ``mask`` (grown by ``margin`` voxels), or None."""
    xp = namespace(mask)
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = xp.any(mask, axis=other)
        idx = xp.nonzero(hit)[0]
        if idx.shape[0] == 0:
            return None
        lo = max(int(idx[0]) - margin[axis], 0)
        hi = min(int(idx[-1]) + 1 + margin[axis], mask.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)


def touches_border(mask) -> bool:
    """True when the mask reaches any face of the volume (anatomy cut by the field of view)."""
    xp = namespace(mask)
    faces = []
    for axis in range(mask.ndim):
        for end in (0, mask.shape[axis] - 1):
            index = tuple(slice(None) if a != axis else end for a in range(mask.ndim))
            faces.append(bool(xp.any(mask[index])))
    return any(faces)


def surface(mask, exclude):
    """Voxels of ``mask`` with a face neighbour outside both ``mask`` and ``exclude``."""
    xp = namespace(mask, exclude)
    free = xp.logical_not(xp.logical_or(mask, exclude))
    out = xp.zeros_like(mask)
    for axis in range(mask.ndim):
        n = mask.shape[axis]
        lo = tuple(slice(0, n - 1) if a == axis else slice(None) for a in range(mask.ndim))
        hi = tuple(slice(1, n) if a == axis else slice(None) for a in range(mask.ndim))
        shifted_fwd = xp.zeros_like(mask)
        shifted_bwd = xp.zeros_like(mask)
        shifted_fwd[lo] = free[hi]
        shifted_bwd[hi] = free[lo]
        out = xp.logical_or(out, xp.logical_or(shifted_fwd, shifted_bwd))
    return xp.logical_and(mask, out)


def distance_to(mask, sampling):
    """Euclidean distance (mm) from every voxel to the nearest voxel of ``mask``.

    SciPy on the CPU, cuCIM/CuPy's ``distance_transform_edt`` on the GPU (same
    definition: distances between voxel centres with anisotropic ``sampling``).
    """
    xp = namespace(mask)
    if array_api_compat.is_cupy_namespace(xp):
        from cupyx.scipy import ndimage as cnd

        return cnd.distance_transform_edt(xp.logical_not(mask), sampling=sampling)
    import numpy as np
    from scipy import ndimage

    host = np.asarray(to_numpy(mask), dtype=bool)
    dist = ndimage.distance_transform_edt(~host, sampling=sampling)
    return from_numpy(dist, like=mask)


def to_numpy(x):
    import numpy as np

    if array_api_compat.is_numpy_array(x):
        return x
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def from_numpy(arr, like):
    xp = namespace(like)
    if array_api_compat.is_numpy_namespace(xp):
        return arr
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.from_numpy(arr).to(like.device)
    return xp.asarray(arr)
