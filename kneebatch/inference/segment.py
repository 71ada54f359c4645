"""Coarse-to-fine segmentation of one study (the paper's method), on any array namespace.

read (uint16 [2,Z,Y,X]) -> normalize -> coarse net on the whole field of view at a
fixed small shape -> bounding box of the coarse foreground (+ margin) -> crop at full
resolution -> resize axes finer than the fine working spacing -> fine net (whole crop
in one call) -> medial/lateral labels kept on their side (:mod:`.laterality`) ->
argmax of the logits trilinearly resampled to the native crop (interpolated only at
tissue boundaries) -> paste into the full volume.

Written once against the array API (:mod:`kneebatch.ops`): NumPy, torch on the CPU or
a GPU, CuPy. Everything stays on the image's device; the nets take and give arrays
through DLPack (:func:`kneebatch.ops.call_net`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from kneebatch import ops
from kneebatch.geometry import Grid
from kneebatch.inference.laterality import keep_sides, left_right_axis
from kneebatch.models.config import ModelConfig
from kneebatch.models.preprocess import box_from_mask, fine_crop, linear_taps, normalize, pad_to_multiple, resize

BOUNDARY_CHUNK = 250_000  # boundary voxels interpolated at a time (x n_classes x 4 bytes per corner)
WHOLE_CROP_VOXELS = 6_000_000  # working voxels run in one call; larger crops go in windows of this size


@dataclass
class SegmentInfo:
    box: tuple = ()
    working_shape: tuple = ()
    sides_found: bool | None = None  # medial/lateral rule applied (None: switched off)
    seconds: dict = field(default_factory=dict)


channel_argmax = ops.channel_argmax


def _forward(x, axis: int):
    """``x`` with each voxel replaced by its next neighbour along ``axis`` (the last one kept)."""
    xp = ops.namespace(x)
    n = x.shape[axis]
    rest = tuple(slice(1, n) if a == axis else slice(None) for a in range(x.ndim))
    last = tuple(slice(n - 1, n) if a == axis else slice(None) for a in range(x.ndim))
    return xp.concat([x[rest], x[last]], axis=axis)


def upsample_argmax(logits, out_shape, valid=None):
    """argmax of ``logits [K, z, y, x]`` trilinearly resampled onto ``out_shape`` over the same box.

    ``valid``: the logits' own extent when ``logits`` is the net's padded output (the valid
    part at the start of each axis), which is then indexed in place instead of copied.
    Exact without resampling all K channels everywhere: a trilinear value is a convex
    combination of its 8 source voxels, so where those share one argmax, so does the
    interpolated vector. Only output voxels whose sources disagree (tissue boundaries,
    ~10 % of a knee) have their K logits interpolated.
    """
    xp = ops.namespace(logits)
    dev = ops.device_of(logits)
    out_shape = tuple(int(s) for s in out_shape)
    valid = tuple(int(s) for s in (valid or logits.shape[1:]))
    work = ops.channel_argmax(logits[:, :valid[0], :valid[1], :valid[2]])
    if valid == out_shape:
        return work
    taps = [linear_taps(n, w, xp, dev) for n, w in zip(out_shape, valid)]
    # a working voxel is "uniform" when its forward neighbourhood (2 along each resampled
    # axis; kept axes, e.g. native slices, have weight 0 on the next voxel) has one label
    moved = [a for a in range(3) if out_shape[a] != valid[a]]
    top, bottom = work, work
    for a in moved:
        top, bottom = xp.maximum(top, _forward(top, a)), xp.minimum(bottom, _forward(bottom, a))

    def at_corner0(v):  # v[i0z][:, i0y][:, :, i0x]: one gather per axis
        for axis in range(3):
            v = xp.take(v, taps[axis][0], axis=axis)
        return v

    out = xp.reshape(at_corner0(work), (-1,))
    todo_mask = xp.reshape(at_corner0(top != bottom), (-1,))
    todo = xp.nonzero(todo_mask)[0]
    if todo.shape[0] == 0:
        return xp.reshape(out, out_shape)
    padded = logits.shape[1:]
    flat = xp.reshape(logits, (logits.shape[0], -1))  # the padded buffer's own rows: no copy
    strides = (padded[1] * padded[2], padded[2], 1)
    ny, nx = out_shape[1:]
    found = []
    for c0 in range(0, todo.shape[0], BOUNDARY_CHUNK):
        idx = todo[c0:min(c0 + BOUNDARY_CHUNK, todo.shape[0])]
        coords = (idx // (ny * nx), (idx // nx) % ny, idx % nx)
        lo = [xp.take(taps[a][0], coords[a]) for a in range(3)]
        base = lo[0] * strides[0] + lo[1] * strides[1] + lo[2]
        step = [(xp.take(taps[a][1], coords[a]) - lo[a]) * strides[a] for a in moved]
        frac = [xp.take(taps[a][2], coords[a]) for a in moved]
        acc = None
        for corner in range(2 ** len(moved)):
            src, weight = base, None
            for j in range(len(moved)):
                upper = (corner >> j) & 1
                src = src + step[j] if upper else src
                w = frac[j] if upper else 1 - frac[j]
                weight = w if weight is None else weight * w
            term = xp.take(flat, src, axis=1) * weight
            acc = term if acc is None else acc + term
        found.append(ops.channel_argmax(acc))
    out[todo_mask] = xp.concat(found) if len(found) > 1 else found[0]
    return xp.reshape(out, out_shape)


@torch.inference_mode()
def padded_fine_logits(fine, x, cfg: ModelConfig):
    """``(logits, shape)``: fine-net logits ``[K, ...]`` for a working-grid crop ``x [C, z, y, x]``,
    over ``x`` padded to the net's stride (``shape``: ``x``'s own extent, at the start of each
    axis; the padding is left in place so the logits are not copied). With ``cfg.mirror_tta``,
    averaged with those of the crop mirrored along z (the slice axis, left-right in a sagittal
    study: the mirroring the net was trained with), as nnU-Net does."""
    logits, shape = _fine_logits_once(fine, x, cfg)
    if not cfg.mirror_tta:
        return logits, shape
    xp = ops.namespace(x)
    mirrored, _ = _fine_logits_once(fine, xp.flip(x, axis=1), cfg)
    crop = (slice(None), slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    return (logits[crop] + xp.flip(mirrored[crop], axis=1)) * 0.5, shape


def fine_logits(fine, x, cfg: ModelConfig):
    """Fine-net logits ``[K, z, y, x]`` for a working-grid crop ``x [C, z, y, x]`` (a view of
    :func:`padded_fine_logits`)."""
    logits, shape = padded_fine_logits(fine, x, cfg)
    return logits[:, :shape[0], :shape[1], :shape[2]]


def _fine_logits_once(fine, x, cfg: ModelConfig):
    """``(padded logits, shape)`` for a working-grid crop ``x [C, z, y, x]``.

    A batch-norm net runs on the whole crop in one call (padded to its stride); only
    crops above ``WHOLE_CROP_VOXELS`` are split, into large windows with little overlap.
    An instance-norm net runs on windows of its training patch size, as nnU-Net does, so
    that its normalisation sees the context it was trained with.
    """
    # replicated edges, not zeros: a band of z-score 0 (mean tissue) at the crop's far
    # ends is nothing the net saw in training, and its context reaches far into the knee
    xpad, shape = pad_to_multiple(x, cfg.fine.divisor(), mode="replicate")
    if hasattr(fine, "input_shape"):  # compiled engines with static shapes: up to a bucket
        xpad, _ = pad_to_multiple(xpad, fine.input_shape(xpad.shape[1:], cfg.fine.divisor()), mode="replicate")
    n_voxels = math.prod(xpad.shape[1:])
    if cfg.fine_whole_crop:
        if n_voxels <= WHOLE_CROP_VOXELS:
            return ops.call_net(fine, xpad[None, ...])[0, ...], shape
        patch, overlap = _large_window(xpad.shape[1:], cfg.fine.divisor()), 0.1
    else:
        patch, overlap = tuple(cfg.fine_patch), cfg.sw_overlap
    from monai.inferers import sliding_window_inference  # imported only here: it costs seconds

    if any(s < p for s, p in zip(xpad.shape[1:], patch)):  # smaller than a window: pad up to one
        xpad, _ = pad_to_multiple(xpad, patch, mode="replicate")

    def windows(t):  # MONAI works on torch tensors: the crop goes by DLPack, on its device
        return sliding_window_inference(t, patch, sw_batch_size=1 if cfg.fine_whole_crop else 2,
                                        predictor=fine, overlap=overlap)

    return ops.call_net(windows, xpad[None, ...])[0, ...], shape


def _large_window(shape, divisor) -> tuple[int, int, int]:
    """A window of at most ``WHOLE_CROP_VOXELS``: the crop halved along its longest axes until it fits."""
    win = list(shape)
    while win[0] * win[1] * win[2] > WHOLE_CROP_VOXELS:
        a = max(range(3), key=lambda i: win[i] / divisor[i])
        win[a] = max(divisor[a], int(math.ceil(win[a] / 2 / divisor[a]) * divisor[a]))
    return tuple(win)


def series_mean(net, x, cfg: ModelConfig, covered=None):
    """``net(x)``; for one-channel nets trained on every contrast (``cfg.per_series``), the mean of
    ``net`` on each series of ``x [C, ...]`` alone: one model, any number of series.

    ``covered [C, ...]`` (0-1, on ``x``'s grid): where each series has data. A series resampled
    onto the study grid is zero outside its own field of view; there it does not vote."""
    if not cfg.per_series or x.shape[0] == 1:
        return net(x)
    total, weight = None, None
    for c in range(x.shape[0]):
        out = net(x[c:c + 1, ...])
        if covered is None:
            total = out if total is None else total + out
            continue
        xp = ops.namespace(out)
        # a small floor: where no series has data (outside every field of view) the plain mean
        w = xp.astype(covered[c, ...], out.dtype) * (1 - 1e-3) + 1e-3
        total = out * w if total is None else total + out * w
        weight = w if weight is None else weight + w
    return total / (x.shape[0] if covered is None else weight)


def _net_on_one(net):
    """``net`` (batched ``[N, C, ...]``) as a function of one ``[C, ...]`` array."""
    return lambda v: ops.call_net(net, v[None, ...])[0, ...]


@torch.inference_mode()
def segment(image, grid: Grid, coarse, fine, cfg: ModelConfig):
    """Label map (uint8, in ``image``'s namespace and on its device) on the study grid."""
    info = SegmentInfo()
    return paste(fine_stage(image, grid, coarse, fine, cfg, info), info), info


@dataclass
class FineResult:
    """The fine net's logits on the working grid, and where they go on the study grid."""

    logits: object  # [K, ...] over the padded working crop
    valid: tuple  # the working crop's extent within ``logits``
    box: tuple
    crop_shape: tuple
    native_shape: tuple
    left_right: tuple | None = None  # (axis, working spacing mm) when side labels are kept on their side


@torch.inference_mode()
def fine_stage(image, grid: Grid, coarse, fine, cfg: ModelConfig, info: SegmentInfo) -> FineResult:
    """normalize -> coarse -> box -> crop -> fine logits (the engines' part of ``segment``).

    ``image [C, Z, Y, X]`` float32, of any namespace; everything stays on its device."""
    xp = ops.namespace(image)
    t = time.perf_counter()
    # one-channel engines over several series: where each series has data (zero outside its field of view)
    covered = xp.astype(image > 0, xp.float32) if cfg.per_series and image.shape[0] > 1 else None
    x = normalize(image)
    native = tuple(x.shape[1:])
    ops.synchronize(x)
    info.seconds["normalize"] = time.perf_counter() - t

    t = time.perf_counter()
    xc, _ = pad_to_multiple(resize(x, cfg.coarse_shape), cfg.coarse.divisor())
    cc = None if covered is None else pad_to_multiple(resize(covered, cfg.coarse_shape), cfg.coarse.divisor())[0]
    coarse_labels = ops.channel_argmax(series_mean(_net_on_one(coarse), xc, cfg, cc))
    box = box_from_mask(coarse_labels > 0, native, grid.spacing, cfg.crop_margin_mm)
    ops.synchronize(x)
    info.seconds["coarse"] = time.perf_counter() - t

    t = time.perf_counter()
    crop, _ = fine_crop(x, box, grid.spacing, cfg)
    if cfg.per_series and crop.shape[0] > 1:
        crop_covered = None if covered is None else fine_crop(covered, box, grid.spacing, cfg)[0]
        logits = series_mean(lambda v: fine_logits(fine, v, cfg), crop, cfg, crop_covered)
        valid = tuple(crop.shape[1:])
    else:
        logits, valid = padded_fine_logits(fine, crop, cfg)
    crop_shape, wshape = tuple(b.stop - b.start for b in box), tuple(crop.shape[1:])
    ops.synchronize(x)
    info.seconds["fine"] = time.perf_counter() - t
    info.box, info.working_shape = box, wshape
    left_right = None
    if cfg.keep_sides:
        axis = left_right_axis(grid.direction)
        left_right = axis, crop_shape[axis] * grid.spacing[axis] / wshape[axis]
    return FineResult(logits, valid, box, crop_shape, native, left_right)


@torch.inference_mode()
def paste(result: FineResult, info: SegmentInfo):
    """The label map on the study grid: logits resampled to the crop, argmax, pasted."""
    xp = ops.namespace(result.logits)
    t = time.perf_counter()
    if result.left_right is not None:
        info.sides_found = keep_sides(result.logits, result.valid, *result.left_right)
    labels = xp.zeros(result.native_shape, dtype=xp.uint8, device=ops.device_of(result.logits))
    labels[result.box] = upsample_argmax(result.logits, result.crop_shape, result.valid)
    ops.synchronize(labels)
    info.seconds["paste"] = time.perf_counter() - t
    return labels
