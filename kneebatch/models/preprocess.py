"""Preprocessing shared by training and inference, written once for any array namespace
(NumPy, torch on CPU or CUDA, CuPy; :mod:`kneebatch.ops`).

Grids: the coarse input is the whole volume resized to a fixed shape; the fine input
is a crop whose axes finer than ``fine_spacing_mm`` are resized to about it. Both
resizes keep the crop's physical box (``align_corners=False``: voxel centres at
(i + 0.5) * extent / n), so resizing back with the same call maps every voxel to where
it came from. Linear resizing is separable: one gather and blend per axis.
"""

from __future__ import annotations

import math

from kneebatch import ops


def normalize(image):
    """Per-channel z-score (float32) over the body (voxels above 5 % of the channel's 99th percentile).

    The statistics come from a fixed stride of ~200 k voxels (float64, so no thread count
    changes an ulp): as exact as the full volume to a fraction of a percent, at a tenth
    of the cost on a 10 M-voxel study.
    """
    xp = ops.namespace(image)
    image = xp.astype(image, xp.float32, copy=False)
    n = math.prod(image.shape[1:])
    means, stds = [], []
    for c in range(image.shape[0]):
        sample = xp.astype(xp.reshape(image[c, ...], (-1,))[:: max(1, n // 200_000)], xp.float64)
        body = sample[sample > 0.05 * ops.quantile(sample, 0.99)]
        vals = body if body.shape[0] > 1 else sample
        means.append(float(xp.mean(vals)))
        stds.append(max(float(xp.std(vals, correction=1)), 1e-6))
    dev = ops.device_of(image)
    per_channel = (image.shape[0], 1, 1, 1)
    out = image - xp.reshape(xp.asarray(means, dtype=xp.float32, device=dev), per_channel)
    out /= xp.reshape(xp.asarray(stds, dtype=xp.float32, device=dev), per_channel)  # in place: one volume, not two
    return out


def linear_taps(n_out: int, n_in: int, xp, device):
    """Source indices and weights of linear resampling ``n_in -> n_out`` (align_corners=False)."""
    src = (xp.arange(n_out, dtype=xp.float64, device=device) + 0.5) * (n_in / n_out) - 0.5
    src = xp.clip(src, min=0.0, max=float(n_in - 1))
    i0 = xp.astype(xp.floor(src), xp.int64)
    i1 = xp.clip(i0 + 1, max=n_in - 1)
    return i0, i1, xp.astype(src - xp.astype(i0, xp.float64), xp.float32)


def _along(axis: int, ndim: int, v, xp):
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return xp.reshape(v, tuple(shape))


def resize(t, shape, labels: bool = False):
    """``[C, Z, Y, X]`` (or ``[Z, Y, X]`` labels, nearest neighbour) resized to ``shape`` over the same box."""
    xp = ops.namespace(t)
    dev = ops.device_of(t)
    shape = tuple(int(s) for s in shape)
    lead = t.ndim - 3
    if tuple(t.shape[lead:]) == shape:
        return t
    out = t if labels else xp.astype(t, xp.float32, copy=False)
    # the most shrinking axis first: later passes then work on fewer voxels
    for a in sorted(range(3), key=lambda a: shape[a] / t.shape[lead + a]):
        axis, n_in, n_out = lead + a, out.shape[lead + a], shape[a]
        if n_in == n_out:
            continue
        if labels:  # nearest-exact: the source voxel whose box holds the output centre
            src = xp.floor((xp.arange(n_out, dtype=xp.float64, device=dev) + 0.5) * (n_in / n_out))
            out = ops.take(out, xp.clip(xp.astype(src, xp.int64), max=n_in - 1), axis)
            continue
        i0, i1, w = linear_taps(n_out, n_in, xp, dev)
        lo = ops.take(out, i0, axis)
        out = lo + (ops.take(out, i1, axis) - lo) * _along(axis, out.ndim, w, xp)
    return out


def working_shape(native_shape, spacing, target_spacing, divisor=(1, 1, 1)) -> tuple[int, int, int]:
    """Shape of the working grid: axes finer than the target are resampled to it, coarser
    axes keep their native spacing (interpolating across thick slices invents nothing and
    costs thin structures: resampling 3.6 mm slices to 3.0 mm and back keeps an MCL at
    Dice 0.71 even for a perfect prediction, keeping them keeps it at 0.96).

    A resampled axis gets the nearest multiple of the net's ``divisor`` (its spacing moves
    by at most half a divisor step, ~5 %), so no compute goes into stride padding; kept
    axes are padded instead."""
    out = []
    for n, s, t, d in zip(native_shape, spacing, target_spacing, divisor):
        if s >= t:
            out.append(int(n))
        else:
            out.append(max(d, int(round(n * s / t / d)) * d))
    return tuple(out)


def pad_to_multiple(t, divisor, mode: str = "constant"):
    """Pad the last three axes at the end up to multiples of ``divisor`` (zeros, or
    ``mode="replicate"``: copies of the last slice/row/column). Returns ``(padded, shape before)``."""
    xp = ops.namespace(t)
    shape = tuple(t.shape[-3:])
    target = [int(math.ceil(s / d) * d) for s, d in zip(shape, divisor)]
    if list(shape) == target:
        return t, shape
    lead = t.ndim - 3
    for a, (n, tgt) in enumerate(zip(shape, target)):
        if n == tgt:
            continue
        axis = lead + a
        if mode == "replicate":
            index = xp.clip(xp.arange(tgt, device=ops.device_of(t)), max=n - 1)
            t = ops.take(t, index, axis)
        else:
            fill = list(t.shape)
            fill[axis] = tgt - n
            t = xp.concat([t, xp.zeros(tuple(fill), dtype=t.dtype, device=ops.device_of(t))], axis=axis)
    return t, shape


def box_from_mask(mask, native_shape, spacing, margin_mm: float):
    """Bounding box of a (coarse-grid) foreground mask, scaled to the native grid, plus a margin.

    Returns index slices on the native grid, or the whole volume if the mask is empty.
    """
    box = ops.bounding_box(mask)
    if box is None:
        return tuple(slice(0, n) for n in native_shape)
    out = []
    for axis, hit in enumerate(box):
        scale = native_shape[axis] / mask.shape[axis]
        margin = int(math.ceil(margin_mm / spacing[axis]))
        lo = max(int(math.floor(hit.start * scale)) - margin, 0)
        hi = min(int(math.ceil(hit.stop * scale)) + margin, native_shape[axis])
        out.append(slice(lo, hi))
    return tuple(out)


def fine_crop(x, box, spacing, cfg, labels=None):
    """The fine net's input: ``x [C, Z, Y, X]`` cropped to ``box`` and resized to the working grid
    (training and inference both cut their crops here). Returns ``(crop, labels or None)``;
    ``labels`` (the same grid as ``x``) are cut and resized with it by nearest neighbour."""
    crop = x[(slice(None), *box)]
    wshape = working_shape(crop.shape[1:], spacing, cfg.fine_spacing_mm, cfg.fine.divisor())
    y = resize(labels[box], wshape, labels=True) if labels is not None else None
    return resize(crop, wshape), y
