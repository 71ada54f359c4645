"""Array-module-agnostic volume ops: one code path for NumPy, CuPy, torch (CPU or CUDA).

Functions take arrays of any Array-API namespace (NumPy, CuPy, torch, or
``array_api_strict`` in tests) and return arrays of the same namespace on the same
device. Where a library has a faster non-standard primitive (``bincount``, scatter by
index), it is used; the standard fallback gives identical results. Connected
components and distances are not in the standard: SciPy answers on the host,
``cupyx.scipy.ndimage`` on CuPy arrays and CUDA tensors, and a standard-only
fallback on any other device (what the tests run on ``array_api_strict``'s
stand-in device).

Host <-> device copies go through :func:`to_device` and :func:`to_host` only, which
count them in ``TRANSFERS``: a study's image goes in once; its label map and one
vector of measurements come back (tests check the count). Scalars read to size a
crop (``int(...)`` of a box bound) are not counted: they are how any GPU pipeline
learns a data-dependent shape.
"""

from __future__ import annotations

from collections import Counter

import array_api_compat
import numpy as np

TRANSFERS: Counter = Counter()  # "to_device" / "to_host": bulk copies across the host-device boundary


def namespace(*arrays):
    return array_api_compat.array_namespace(*arrays)


def torch_namespace():
    import torch

    return namespace(torch.empty(0))


def device_of(x):
    return array_api_compat.device(x)


def on_host(x) -> bool:
    """True when ``x`` lives in host memory (NumPy, CPU tensors, ``array_api_strict``'s CPU device)."""
    if array_api_compat.is_numpy_array(x):
        return True
    if array_api_compat.is_cupy_array(x):
        return False
    if array_api_compat.is_torch_array(x):
        return x.device.type == "cpu"
    return "CPU_DEVICE" in repr(device_of(x)) or str(device_of(x)) == "cpu"


def to_device(host: np.ndarray, xp, device=None):
    """A host NumPy array as an array of namespace ``xp`` on ``device`` (the one copy in)."""
    if array_api_compat.is_numpy_namespace(xp):
        return host
    if array_api_compat.is_torch_namespace(xp):
        import torch

        out = torch.from_numpy(np.ascontiguousarray(host))
        out = out if device is None else out.to(device)
    else:
        out = xp.asarray(host, device=device) if device is not None else xp.asarray(host)
    if not on_host(out):
        TRANSFERS["to_device"] += 1
    return out


def to_host(x) -> np.ndarray:
    """``x`` as a NumPy array (a counted copy when ``x`` is on a device)."""
    if not on_host(x):
        TRANSFERS["to_host"] += 1
        if array_api_compat.is_cupy_array(x):
            return x.get()
        if not array_api_compat.is_torch_array(x):
            x = x.to_device(type(device_of(x))("CPU_DEVICE"))  # array_api_strict's stand-in devices
    return to_numpy(x)


def to_numpy(x):
    """A host array as NumPy, without a copy where possible; refuses device arrays other than
    CUDA tensors and CuPy (for those, :func:`to_host` counts the copy)."""
    if array_api_compat.is_numpy_array(x):
        return x
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def call_net(net, x):
    """``net`` (torch tensors in and out, on its own device) applied to an array of any namespace,
    through DLPack: no copy where ``x`` already sits on the net's device."""
    xp = namespace(x)
    if array_api_compat.is_torch_namespace(xp):
        out = net(x)
        if out.device != x.device:  # a silent crossing here would be a host copy nobody counted
            raise ValueError(f"the engines run on {out.device} but the study is on {x.device}")
        return out
    import torch

    out = net(torch.from_dlpack(x)).contiguous()
    if array_api_compat.is_numpy_namespace(xp):
        if out.device.type != "cpu":
            raise ValueError(f"the engines run on {out.device} but the study is a NumPy array")
        return np.from_dlpack(out)
    if array_api_compat.is_cupy_namespace(xp):
        return xp.from_dlpack(out)  # already on x's GPU
    return xp.from_dlpack(out, device=device_of(x))



def _flat_ids(labels, xp):
    # NumPy's and torch's bincount take uint8 ids as they are: no 8x larger int64 copy
    if hasattr(xp, "bincount") and labels.dtype == xp.uint8:
        return xp.reshape(labels, (-1,))
    return xp.reshape(xp.astype(labels, xp.int64), (-1,))


def label_counts(labels, n_classes: int):
    """Voxels per label id ``0..n_classes-1`` (int64), the basis of every volume."""
    xp = namespace(labels)
    flat = _flat_ids(labels, xp)
    if hasattr(xp, "bincount"):
        return xp.astype(xp.bincount(flat, minlength=n_classes)[:n_classes], xp.int64)
    return xp.stack([xp.sum(xp.astype(flat == k, xp.int64)) for k in range(n_classes)])


def label_sums(labels, values, n_classes: int):
    """Sum of ``values`` (float64) over the voxels of each label id."""
    xp = namespace(labels, values)
    flat = _flat_ids(labels, xp)
    vals = xp.reshape(xp.astype(values, xp.float64), (-1,))
    if hasattr(xp, "bincount"):
        return xp.bincount(flat, weights=vals, minlength=n_classes)[:n_classes]
    zero = xp.zeros_like(vals)
    return xp.stack([xp.sum(xp.where(flat == k, vals, zero)) for k in range(n_classes)])


def label_means(labels, values, n_classes: int, counts=None):
    """Mean of ``values`` per label; NaN where a label is absent (``counts``: reuse ``label_counts``)."""
    xp = namespace(labels, values)
    counts = xp.astype(label_counts(labels, n_classes) if counts is None else counts, xp.float64)
    sums = label_sums(labels, values, n_classes)
    nan = xp.full_like(sums, float("nan"))
    return xp.where(counts > 0, sums / xp.where(counts > 0, counts, xp.ones_like(counts)), nan)


def take(x, index, axis: int):
    """``xp.take``: torch's ``index_select`` along the last axis ran 4x slower than indexing
    (the same values), so NumPy, CuPy and torch index; other namespaces take."""
    xp = namespace(x)
    if array_api_compat.is_torch_namespace(xp) or array_api_compat.is_numpy_namespace(xp) \
            or array_api_compat.is_cupy_namespace(xp):
        return x[(slice(None),) * (axis % x.ndim) + (index,)]
    return xp.take(x, index, axis=axis)


def channel_argmax(x):
    """``argmax`` over the first axis of ``x [K, ...]`` as uint8 (first maximum on ties), by a
    running maximum over channels: K contiguous passes; an argmax over the outer axis reads K
    strided values per voxel and ran 3x slower on the fine logits (torch, CPU)."""
    xp = namespace(x)
    best = x[0, ...]
    index = xp.zeros(x.shape[1:], dtype=xp.uint8, device=device_of(x))
    for k in range(1, x.shape[0]):
        higher = x[k, ...] > best
        best = xp.where(higher, x[k, ...], best)
        index = xp.where(higher, xp.asarray(k, dtype=xp.uint8, device=device_of(x)), index)
    return index


def quantile(values, q: float):
    """The ``q`` quantile (0-d array) of a 1-D array (linear between order statistics, as NumPy's default)."""
    xp = namespace(values)
    ordered = xp.sort(values)
    pos = q * (values.shape[0] - 1)
    lo = int(pos)
    hi = min(lo + 1, values.shape[0] - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bounding_box(mask, margin=(0, 0, 0)):
    """Index slices of the smallest box holding a 3-D ``mask`` (grown by ``margin`` voxels), or None."""
    xp = namespace(mask)
    # two single-axis reductions give all three projections (a multi-axis ``any``
    # copies the volume per axis in some namespaces)
    zy = xp.any(mask, axis=2)
    yx = xp.any(mask, axis=0)
    slices = []
    for axis, hit in enumerate((xp.any(zy, axis=1), xp.any(zy, axis=0), xp.any(yx, axis=0))):
        idx = xp.nonzero(hit)[0]
        if idx.shape[0] == 0:
            return None
        lo = max(int(idx[0]) - margin[axis], 0)
        hi = min(int(idx[-1]) + 1 + margin[axis], mask.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)


def centroid(mask, axes=(0, 1, 2)):
    """``[voxels, mean index along each of axes]`` (float64, 0-d arrays stacked) of a 3-D mask; the
    mean indices are 0 when the mask is empty (its voxel count says so)."""
    xp = namespace(mask)
    m = xp.astype(mask, xp.float64)
    count = xp.sum(m)
    per_voxel = 1.0 / xp.where(count > 0, count, xp.ones_like(count))
    out = [count]
    for axis in axes:
        others = tuple(a for a in range(3) if a != axis)
        index = xp.arange(mask.shape[axis], dtype=xp.float64, device=device_of(mask))
        out.append(xp.sum(xp.sum(m, axis=others) * index) * per_voxel)
    return xp.stack(out)


def touches_border(mask):
    """0-d bool array: the mask reaches a face of the volume (anatomy cut by the field of view)."""
    xp = namespace(mask)
    faces = []
    for axis in range(mask.ndim):
        for end in (0, mask.shape[axis] - 1):
            index = tuple(slice(None) if a != axis else end for a in range(mask.ndim))
            faces.append(xp.any(mask[index]))
    return xp.any(xp.stack(faces))


def shift(x, axis: int, step: int, fill=None):
    """``x`` moved by ``step`` (+1/-1) along ``axis``; the vacated face is ``fill`` (an array like
    ``x``), or without it the face's own voxels (edges replicated)."""
    xp = namespace(x)
    n = x.shape[axis]
    keep = tuple((slice(0, n - 1) if step > 0 else slice(1, n)) if a == axis else slice(None)
                 for a in range(x.ndim))
    face = 0 if step > 0 or fill is not None else n - 1
    edge = tuple(slice(face, face + 1) if a == axis else slice(None) for a in range(x.ndim))
    source = x if fill is None else fill
    parts = (source[edge], x[keep]) if step > 0 else (x[keep], source[edge])
    return xp.concat(parts, axis=axis)


def surface(mask, exclude):
    """Voxels of ``mask`` with a face neighbour outside both ``mask`` and ``exclude``."""
    xp = namespace(mask, exclude)
    free = xp.logical_not(xp.logical_or(mask, exclude))
    none = xp.zeros_like(mask)
    out = none
    for axis in range(mask.ndim):
        for step in (1, -1):
            out = xp.logical_or(out, shift(free, axis, step, none))
    return xp.logical_and(mask, out)


def _scipy_like(x):
    """The ndimage module for ``x``'s device: CuPy's for CuPy arrays and CUDA tensors, SciPy's on the
    host, None elsewhere (the standard-only fallbacks)."""
    if array_api_compat.is_cupy_array(x) or (array_api_compat.is_torch_array(x) and x.is_cuda):
        from cupyx.scipy import ndimage

        return ndimage
    if on_host(x):
        from scipy import ndimage

        return ndimage
    return None


def _native(x, nd):
    """``x`` as the array type ``nd`` works on (NumPy or CuPy; no copy: the same memory)."""
    if nd.__name__.startswith("cupyx"):
        import cupy

        return cupy.asarray(x)
    return np.asarray(to_numpy(x))


def _back(out, ref):
    """An ndimage result (NumPy/CuPy) as an array like ``ref`` (same namespace and device)."""
    xp = namespace(ref)
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.as_tensor(out, device=ref.device)
    if array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_cupy_namespace(xp):
        return out
    return xp.asarray(out, device=device_of(ref))


def largest_component(mask):
    """The largest face-connected component of a 3-D boolean ``mask`` (all False if empty), in
    the namespace and on the device of ``mask``."""
    nd = _scipy_like(mask)
    if nd is None:
        return _largest_by_propagation(mask)
    host = _native(mask, nd).astype(bool, copy=False)
    comp, n = nd.label(host)
    if n == 0:
        return _back(comp > 0, mask)
    lib = np if nd.__name__.startswith("scipy") else __import__("cupy")
    sizes = lib.bincount(comp.ravel())
    sizes[0] = 0
    return _back(comp == int(sizes.argmax()), mask)


def _largest_by_propagation(mask):
    """Standard-only components: every voxel takes the largest id among its face neighbours in the
    mask until nothing changes (iterations ~ the longest path through a component)."""
    xp = namespace(mask)
    dev = device_of(mask)
    n = 1
    for s in mask.shape:
        n *= s
    ids = xp.reshape(xp.arange(1, n + 1, dtype=xp.int64, device=dev), mask.shape)
    zero = xp.zeros_like(ids)
    ids = xp.where(mask, ids, zero)
    while True:
        grown = ids
        for axis in range(mask.ndim):
            for step in (1, -1):
                grown = xp.maximum(grown, shift(ids, axis, step, zero))
        grown = xp.where(mask, grown, zero)
        if bool(xp.all(grown == ids)):
            break
        ids = grown
    members = ids[mask]
    if members.shape[0] == 0:
        return xp.zeros_like(mask)
    values, counts = xp.unique_counts(members)
    return ids == values[xp.argmax(counts)]


def distances_to(mask, query, sampling):
    """Euclidean distance (mm) from each voxel of ``query`` to the nearest voxel of ``mask``.

    1-D float64 array (``query``'s namespace and device) in ``nonzero(query)`` order;
    distances between voxel centres with anisotropic ``sampling``, as
    ``distance_transform_edt`` defines them; inf when ``mask`` is empty. On the host a
    k-d tree over the boundary voxels of ``mask`` answers only the voxels asked for
    (2-4x faster than a transform of the whole box, same numbers): the nearest mask
    voxel to an outside point always has a face neighbour outside the mask, or the
    neighbour towards the point would be nearer. CuPy runs its distance transform;
    other devices compare every query voxel with every boundary voxel.
    """
    xp = namespace(mask, query)
    nd = _scipy_like(mask)
    if nd is not None and not nd.__name__.startswith("scipy"):
        dist = nd.distance_transform_edt(_native(xp.logical_not(mask), nd), sampling=sampling)
        return _back(dist[_native(query, nd)], query)
    edge = surface(mask, xp.zeros_like(mask))
    if nd is not None:
        return _back(_kdtree_distances(to_numpy(mask), to_numpy(edge), to_numpy(query), sampling), query)
    return _pairwise_distances(mask, edge, query, sampling)


def _kdtree_distances(mask, edge, query, sampling):
    from scipy.spatial import cKDTree

    scale = np.asarray(sampling, dtype=np.float64)
    points = np.argwhere(query) * scale
    if not edge.any():
        return np.full(len(points), np.inf)
    dist, _ = cKDTree(np.argwhere(edge) * scale).query(points, workers=-1)
    return np.where(mask[query], 0.0, dist)


PAIRWISE_CHUNK = 256  # query voxels at a time: a 256 x boundary matrix of float64


def _pairwise_distances(mask, edge, query, sampling):
    xp = namespace(mask)
    dev = device_of(mask)

    def points(m):
        idx = xp.nonzero(m)
        return xp.stack([xp.astype(i, xp.float64) * float(s) for i, s in zip(idx, sampling)], axis=1)

    q, e = points(query), points(edge)
    inside = mask[query]
    if e.shape[0] == 0:
        return xp.full((q.shape[0],), float("inf"), dtype=xp.float64, device=dev)
    e_sq = xp.sum(e * e, axis=1)
    parts = []
    for c in range(0, q.shape[0], PAIRWISE_CHUNK):
        qc = q[c:min(c + PAIRWISE_CHUNK, q.shape[0]), :]
        d2 = xp.sum(qc * qc, axis=1)[:, None] + e_sq[None, :] - 2.0 * (qc @ xp.matrix_transpose(e))
        parts.append(xp.sqrt(xp.clip(xp.min(d2, axis=1), min=0.0)))
    dist = xp.concat(parts) if parts else xp.zeros((0,), dtype=xp.float64, device=dev)
    return xp.where(inside, xp.zeros_like(dist), dist)


def synchronize(x) -> None:
    """Wait for the work queued on this thread's stream (for stage timings; a no-op on the host)."""
    # the current stream only: a whole-device wait from the finishing thread could land inside
    # another thread's CUDA graph capture
    if array_api_compat.is_torch_array(x) and x.is_cuda:
        import torch

        torch.cuda.current_stream(x.device).synchronize()
    elif array_api_compat.is_cupy_array(x):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
