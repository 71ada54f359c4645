"""Preprocessing shared by training and inference (torch tensors, CPU or CUDA).

Grids: the coarse input is the whole volume resized to a fixed shape; the fine input
is a crop whose axes finer than ``fine_spacing_mm`` are resized to about it. Both
resizes keep the crop's physical box (``align_corners=False``: voxel centres at
(i + 0.5) * extent / n), so resizing back with the same call maps every voxel to where
it came from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Per-channel z-score over the body (voxels above 5 % of the channel's 99th percentile).

    The statistics come from a fixed stride of ~200 k voxels (float64, so no thread count
    changes an ulp): as exact as the full volume to a fraction of a percent, at a tenth
    of the cost on a 10 M-voxel study.
    """
    out = torch.empty_like(image, dtype=torch.float32)
    for c in range(image.shape[0]):
        x = image[c].float()
        sample = x.reshape(-1)[:: max(1, x.numel() // 200_000)].double()
        body = sample[sample > 0.05 * torch.quantile(sample, 0.99)]
        vals = body if body.numel() > 1 else sample
        mean, std = float(vals.mean()), max(float(vals.std()), 1e-6)
        torch.sub(x, mean, out=out[c]).div_(std)
    return out


def resize(t: torch.Tensor, shape, labels: bool = False) -> torch.Tensor:
    """``[C, Z, Y, X]`` (or ``[Z, Y, X]`` labels) resized to ``shape`` over the same box."""
    shape = tuple(int(s) for s in shape)
    if tuple(t.shape[-3:]) == shape:
        return t
    if labels:
        x = t[None, None].float()
        return F.interpolate(x, size=shape, mode="nearest-exact")[0, 0].to(t.dtype)
    return F.interpolate(t[None].float(), size=shape, mode="trilinear", align_corners=False)[0]


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


def pad_to_multiple(t: torch.Tensor, divisor, mode: str = "constant") -> tuple[torch.Tensor, tuple]:
    """Pad the last three axes at the end up to multiples of ``divisor`` (zeros, or
    ``mode="replicate"``: copies of the last slice/row/column)."""
    shape = t.shape[-3:]
    target = [int(math.ceil(s / d) * d) for s, d in zip(shape, divisor)]
    pad = []
    for s, tgt in reversed(list(zip(shape, target))):
        pad += [0, tgt - s]
    if not any(pad):
        return t, tuple(shape)
    if mode == "constant":
        return F.pad(t, pad), tuple(shape)
    batched = t if t.dim() == 5 else t[None]  # torch pads 3-D replicate only on [N, C, Z, Y, X]
    out = F.pad(batched, pad, mode=mode)
    return (out if t.dim() == 5 else out[0]), tuple(shape)


def box_from_mask(mask: torch.Tensor, native_shape, spacing, margin_mm: float):
    """Bounding box of a (coarse-grid) foreground mask, scaled to the native grid, plus a margin.

    Returns index slices on the native grid, or the whole volume if the mask is empty.
    """
    if not bool(mask.any()):
        return tuple(slice(0, n) for n in native_shape)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = torch.nonzero(mask.any(dim=other)).flatten()
        scale = native_shape[axis] / mask.shape[axis]
        margin = int(math.ceil(margin_mm / spacing[axis]))
        lo = max(int(math.floor(int(hit[0]) * scale)) - margin, 0)
        hi = min(int(math.ceil((int(hit[-1]) + 1) * scale)) + margin, native_shape[axis])
        box.append(slice(lo, hi))
    return tuple(box)


def fine_crop(x: torch.Tensor, box, spacing, cfg, labels: torch.Tensor | None = None):
    """The fine net's input: ``x [C, Z, Y, X]`` cropped to ``box`` and resized to the working grid
    (training and inference both cut their crops here). Returns ``(crop, labels or None)``;
    ``labels`` (the same grid as ``x``) are cut and resized with it by nearest neighbour."""
    crop = x[(slice(None), *box)]
    wshape = working_shape(crop.shape[1:], spacing, cfg.fine_spacing_mm, cfg.fine.divisor())
    y = resize(labels[box], wshape, labels=True) if labels is not None else None
    return resize(crop, wshape), y
