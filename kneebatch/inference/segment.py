"""Coarse-to-fine segmentation of one study (the paper's method), on any torch device.

read (uint16 [2,Z,Y,X]) -> normalize -> coarse net on the whole field of view at a
fixed small shape -> bounding box of the coarse foreground (+ margin) -> crop at full
resolution -> resize axes finer than the fine working spacing -> fine net (whole crop
in one call) -> medial/lateral labels kept on their side (:mod:`.laterality`) ->
argmax of the logits trilinearly resampled to the native crop (interpolated only at
tissue boundaries) -> paste into the full volume. Everything
after the read stays on the engine's device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kneebatch.geometry import Grid
from kneebatch.inference.laterality import keep_sides, left_right_axis
from kneebatch.models.config import ModelConfig
from kneebatch.models.preprocess import box_from_mask, fine_crop, normalize, pad_to_multiple, resize

BOUNDARY_CHUNK = 250_000  # boundary voxels interpolated at a time (x n_classes x 4 bytes per corner)
WHOLE_CROP_VOXELS = 6_000_000  # working voxels run in one call; larger crops go in windows of this size


@dataclass
class SegmentInfo:
    box: tuple = ()
    working_shape: tuple = ()
    sides_found: bool | None = None  # medial/lateral rule applied (None: switched off)
    seconds: dict = field(default_factory=dict)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _linear_taps(n_out: int, n_in: int, device):
    """Source indices and weights of linear resampling ``n_in -> n_out`` (align_corners=False)."""
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp(0, n_in - 1)
    i0 = src.floor().long()
    return i0, (i0 + 1).clamp(max=n_in - 1), src - i0.float()


def channel_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(0)`` as uint8 (first maximum on ties), by a running maximum over channels.

    torch's argmax over the outer axis of ``[K, ...]`` reads K strided values per voxel
    and ran 3x slower on the fine logits than these K contiguous passes.
    """
    best = x[0].clone()
    index = torch.zeros(x.shape[1:], dtype=torch.uint8, device=x.device)
    for k in range(1, x.shape[0]):
        higher = x[k] > best
        torch.maximum(best, x[k], out=best)
        index.masked_fill_(higher, k)
    return index


def _channel_rows(logits: torch.Tensor):
    """Contiguous ``[K, n]`` rows over each channel's memory and the spatial strides to index them.

    The fine logits are usually a crop of the padded network output: indexing that
    memory with its own strides spares a copy of all K channels. (The rows must be
    contiguous: ``index_select`` on a strided matrix took 4x as long.)
    """
    st = logits.stride()
    extent = sum((n - 1) * s for n, s in zip(logits.shape[1:], st[1:])) + 1
    storage = logits.untyped_storage().nbytes() // logits.element_size()
    if st[3] != 1 or st[0] < extent or min(st[1:]) < 0 or logits.storage_offset() + logits.shape[0] * st[0] > storage:
        logits = logits.contiguous()
        st = logits.stride()
    return logits.as_strided((logits.shape[0], st[0]), (st[0], 1)), st[1:]


def upsample_argmax(logits: torch.Tensor, out_shape) -> torch.Tensor:
    """argmax of ``logits [K, z, y, x]`` trilinearly resampled onto ``out_shape`` over the same box.

    Exact without resampling all K channels everywhere: a trilinear value is a convex
    combination of its 8 source voxels, so where those share one argmax, so does the
    interpolated vector. Only output voxels whose sources disagree (tissue boundaries,
    ~10 % of a knee) have their K logits interpolated.
    """
    out_shape = tuple(int(s) for s in out_shape)
    work = channel_argmax(logits)
    if tuple(logits.shape[1:]) == out_shape:
        return work
    dev = logits.device
    taps = [_linear_taps(n, w, dev) for n, w in zip(out_shape, logits.shape[1:])]
    # a working voxel is "uniform" when its forward neighbourhood (2 along each resampled
    # axis; kept axes, e.g. native slices, have weight 0 on the next voxel) has one label
    moved = [a for a in range(3) if out_shape[a] != logits.shape[1 + a]]
    kernel = tuple(2 if a in moved else 1 for a in range(3))
    pad = [p for a in (2, 1, 0) for p in (0, kernel[a] - 1)]
    lab = F.pad(work[None, None].float(), pad, mode="replicate")
    mixed = (F.max_pool3d(lab, kernel, stride=1) != -F.max_pool3d(-lab, kernel, stride=1))[0, 0]

    def at_corner0(v):  # v[i0z][:, i0y][:, :, i0x]: one contiguous gather per axis
        for axis in range(3):
            v = v.index_select(axis, taps[axis][0])
        return v

    out = at_corner0(work)
    todo = torch.nonzero(at_corner0(mixed).view(-1)).flatten()
    flat, strides = _channel_rows(logits.float())
    flat_out = out.view(-1)
    ny, nx = out_shape[1:]
    for c0 in range(0, todo.numel(), BOUNDARY_CHUNK):
        idx = todo[c0: c0 + BOUNDARY_CHUNK]
        coords = (idx // (ny * nx), (idx // nx) % ny, idx % nx)
        base = sum(taps[a][0][coords[a]] * strides[a] for a in range(3))
        step = [(taps[a][1][coords[a]] - taps[a][0][coords[a]]) * strides[a] for a in moved]
        frac = [taps[a][2][coords[a]] for a in moved]
        acc = torch.zeros(flat.shape[0], idx.numel(), device=dev)
        for corner in range(2 ** len(moved)):
            src, weight = base, None
            for j in range(len(moved)):
                upper = (corner >> j) & 1
                src = src + step[j] if upper else src
                w = frac[j] if upper else 1 - frac[j]
                weight = w if weight is None else weight * w
            acc.addcmul_(flat.index_select(1, src), weight)
        flat_out[idx] = channel_argmax(acc)
    return out


@torch.inference_mode()
def fine_logits(fine, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Fine-net logits ``[K, z, y, x]`` for a working-grid crop ``x [C, z, y, x]``; with
    ``cfg.mirror_tta``, averaged with those of the crop mirrored along z (the slice axis,
    left-right in a sagittal study: the mirroring the net was trained with), as nnU-Net does."""
    logits = _fine_logits_once(fine, x, cfg)
    if cfg.mirror_tta:
        logits = (logits + _fine_logits_once(fine, x.flip(1), cfg).flip(1)) * 0.5
    return logits


def _fine_logits_once(fine, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Fine-net logits ``[K, z, y, x]`` for a working-grid crop ``x [C, z, y, x]``.

    A batch-norm net runs on the whole crop in one call (padded to its stride); only
    crops above ``WHOLE_CROP_VOXELS`` are split, into large windows with little overlap.
    An instance-norm net runs on windows of its training patch size, as nnU-Net does, so
    that its normalisation sees the context it was trained with.
    """
    # replicated edges, not zeros: a band of z-score 0 (mean tissue) at the crop's far
    # ends is nothing the net saw in training, and its context reaches far into the knee
    xp, shape = pad_to_multiple(x, cfg.fine.divisor(), mode="replicate")
    if cfg.fine_whole_crop:
        if xp[0].numel() <= WHOLE_CROP_VOXELS:
            return fine(xp[None])[0][:, : shape[0], : shape[1], : shape[2]]
        patch, overlap = _large_window(xp.shape[1:], cfg.fine.divisor()), 0.1
    else:
        patch, overlap = tuple(cfg.fine_patch), cfg.sw_overlap
    from monai.inferers import sliding_window_inference  # imported only here: it costs seconds

    if any(s < p for s, p in zip(xp.shape[1:], patch)):  # smaller than a window: pad up to one
        xp, _ = pad_to_multiple(xp, patch, mode="replicate")
    logits = sliding_window_inference(xp[None], patch, sw_batch_size=1 if cfg.fine_whole_crop else 2,
                                      predictor=fine, overlap=overlap)
    return logits[0][:, : shape[0], : shape[1], : shape[2]]


def _large_window(shape, divisor) -> tuple[int, int, int]:
    """A window of at most ``WHOLE_CROP_VOXELS``: the crop halved along its longest axes until it fits."""
    win = list(shape)
    while win[0] * win[1] * win[2] > WHOLE_CROP_VOXELS:
        a = max(range(3), key=lambda i: win[i] / divisor[i])
        win[a] = max(divisor[a], int(math.ceil(win[a] / 2 / divisor[a]) * divisor[a]))
    return tuple(win)


def series_mean(net, x: torch.Tensor, cfg: ModelConfig, covered: torch.Tensor | None = None) -> torch.Tensor:
    """``net(x)``; for one-channel nets trained on every contrast (``cfg.per_series``), the mean of
    ``net`` on each series of ``x [C, ...]`` alone: one model, any number of series.

    ``covered [C, ...]`` (0-1, on ``x``'s grid): where each series has data. A series resampled
    onto the study grid is zero outside its own field of view; there it does not vote."""
    if not cfg.per_series or x.shape[0] == 1:
        return net(x)
    total, weight = None, None
    for c in range(x.shape[0]):
        out = net(x[c:c + 1])
        if covered is None:
            total = out if total is None else total.add_(out)
            continue
        # a small floor: where no series has data (outside every field of view) the plain mean
        w = covered[c].to(out.dtype).mul(1 - 1e-3).add_(1e-3)
        total = out * w if total is None else total.addcmul_(out, w)
        weight = w if weight is None else weight.add_(w)
    return total.div_(x.shape[0] if covered is None else weight)


@torch.inference_mode()
def segment(image, grid: Grid, coarse, fine, cfg: ModelConfig) -> tuple[torch.Tensor, SegmentInfo]:
    """Label map (uint8, on the fine engine's device) on the study grid."""
    info = SegmentInfo()
    return paste(fine_stage(image, grid, coarse, fine, cfg, info), info), info


@dataclass
class FineResult:
    """The fine net's logits on the working grid, and where they go on the study grid."""

    logits: torch.Tensor
    box: tuple
    crop_shape: tuple
    native_shape: tuple
    left_right: tuple | None = None  # (axis, working spacing mm) when side labels are kept on their side


@torch.inference_mode()
def fine_stage(image, grid: Grid, coarse, fine, cfg: ModelConfig, info: SegmentInfo) -> FineResult:
    """normalize -> coarse -> box -> crop -> fine logits (the engines' part of ``segment``)."""
    device = fine.device
    t = time.perf_counter()
    x = torch.as_tensor(image).to(device)
    # one-channel engines over several series: where each series has data (zero outside its field of view)
    covered = (x > 0).float() if cfg.per_series and x.shape[0] > 1 else None
    x = normalize(x)
    native = tuple(x.shape[1:])
    _sync(device)
    info.seconds["normalize"] = time.perf_counter() - t

    t = time.perf_counter()
    xc, _ = pad_to_multiple(resize(x, cfg.coarse_shape), cfg.coarse.divisor())
    cc = None if covered is None else pad_to_multiple(resize(covered, cfg.coarse_shape), cfg.coarse.divisor())[0]
    coarse_labels = channel_argmax(series_mean(lambda v: coarse(v[None])[0], xc, cfg, cc))
    box = box_from_mask(coarse_labels > 0, native, grid.spacing, cfg.crop_margin_mm)
    _sync(device)
    info.seconds["coarse"] = time.perf_counter() - t

    t = time.perf_counter()
    crop, _ = fine_crop(x, box, grid.spacing, cfg)
    crop_covered = None if covered is None else fine_crop(covered, box, grid.spacing, cfg)[0]
    logits = series_mean(lambda v: fine_logits(fine, v, cfg), crop, cfg, crop_covered)
    crop_shape, wshape = tuple(b.stop - b.start for b in box), tuple(crop.shape[1:])
    _sync(device)
    info.seconds["fine"] = time.perf_counter() - t
    info.box, info.working_shape = box, wshape
    left_right = None
    if cfg.keep_sides:
        axis = left_right_axis(grid.direction)
        left_right = axis, crop_shape[axis] * grid.spacing[axis] / wshape[axis]
    return FineResult(logits, box, crop_shape, native, left_right)


@torch.inference_mode()
def paste(result: FineResult, info: SegmentInfo) -> torch.Tensor:
    """The label map on the study grid: logits resampled to the crop, argmax, pasted."""
    device = result.logits.device
    t = time.perf_counter()
    if result.left_right is not None:
        info.sides_found = keep_sides(result.logits, channel_argmax(result.logits), *result.left_right)
    labels = torch.zeros(result.native_shape, dtype=torch.uint8, device=device)
    labels[result.box] = upsample_argmax(result.logits, result.crop_shape)
    _sync(device)
    info.seconds["paste"] = time.perf_counter() - t
    return labels
