"""Coarse-to-fine segmentation of one study (the paper's method), on any torch device.

read (uint16 [2,Z,Y,X]) -> normalize -> coarse net on the whole field of view at a
fixed small shape -> bounding box of the coarse foreground (+ margin) -> crop at full
resolution -> resize to the fine working spacing -> fine net -> logits resampled to
the native crop (trilinear, in slabs to bound memory) -> argmax -> paste into the
full volume. Everything after the read stays on the engine's device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kneebatch.geometry import Grid
from kneebatch.models.config import ModelConfig
from kneebatch.models.preprocess import box_from_mask, normalize, pad_to_multiple, resize, working_shape

SLAB_VOXELS = 2_000_000  # native voxels per upsampling slab (x n_classes x 4 bytes of logits)


@dataclass
class SegmentInfo:
    box: tuple = ()
    working_shape: tuple = ()
    seconds: dict = field(default_factory=dict)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def upsample_argmax(logits: torch.Tensor, out_shape) -> torch.Tensor:
    """argmax of ``logits [K, z, y, x]`` trilinearly resampled onto ``out_shape`` over the same box.

    Voxel centres sit at (i + 0.5) / n of the box on both grids (``align_corners=False``).
    Trilinear is separable: each slab of output slices is first interpolated along z
    from its two neighbouring input slices, then bilinearly in-plane, so only
    K x slab voxels of float32 are held at a time.
    """
    if tuple(logits.shape[1:]) == tuple(out_shape):
        return logits.argmax(0).to(torch.uint8)
    nz, ny, nx = (int(s) for s in out_shape)
    wz = logits.shape[1]
    dev = logits.device
    src = ((torch.arange(nz, device=dev, dtype=torch.float32) + 0.5) * (wz / nz) - 0.5).clamp(0, wz - 1)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=wz - 1)
    w = (src - i0.float())[None, :, None, None]
    out = torch.empty((nz, ny, nx), dtype=torch.uint8, device=dev)
    step = max(1, SLAB_VOXELS // (ny * nx))
    x = logits.float()
    for z0 in range(0, nz, step):
        z1 = min(z0 + step, nz)
        slab = x[:, i0[z0:z1]] * (1 - w[:, z0:z1]) + x[:, i1[z0:z1]] * w[:, z0:z1]  # [K, s, y, x]
        up = F.interpolate(slab.permute(1, 0, 2, 3), size=(ny, nx), mode="bilinear", align_corners=False)
        out[z0:z1] = up.argmax(1).to(torch.uint8)
    return out


@torch.inference_mode()
def fine_logits(fine, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Fine-net logits ``[K, z, y, x]`` for a working-grid crop ``x [C, z, y, x]``.

    The net runs on windows of its training patch size (MONAI's sliding window, overlap
    ``cfg.sw_overlap``), as nnU-Net does: instance normalisation then sees the same
    amount of context as in training.
    """
    from monai.inferers import sliding_window_inference

    patch = tuple(cfg.fine_patch)
    xp, shape = pad_to_multiple(x, cfg.fine.divisor())
    if any(s < p for s, p in zip(xp.shape[1:], patch)):  # smaller than a window: pad up to one
        xp, _ = pad_to_multiple(xp, patch)
    logits = sliding_window_inference(xp[None], patch, sw_batch_size=2, predictor=fine, overlap=cfg.sw_overlap)
    return logits[0][:, : shape[0], : shape[1], : shape[2]]


@torch.inference_mode()
def segment(image, grid: Grid, coarse, fine, cfg: ModelConfig) -> tuple[torch.Tensor, SegmentInfo]:
    """Label map (uint8, on the fine engine's device) on the study grid."""
    info = SegmentInfo()
    device = fine.device
    t = time.perf_counter()
    x = torch.as_tensor(image).to(device)
    x = normalize(x)
    native = tuple(x.shape[1:])
    _sync(device)
    info.seconds["normalize"] = time.perf_counter() - t

    t = time.perf_counter()
    xc, _ = pad_to_multiple(resize(x, cfg.coarse_shape), cfg.coarse.divisor())
    coarse_labels = coarse(xc[None])[0].argmax(0)
    box = box_from_mask(coarse_labels > 0, native, grid.spacing, cfg.crop_margin_mm)
    _sync(device)
    info.seconds["coarse"] = time.perf_counter() - t

    t = time.perf_counter()
    crop = x[(slice(None), *box)]
    wshape = working_shape(crop.shape[1:], grid.spacing, cfg.fine_spacing_mm)
    logits = fine_logits(fine, resize(crop, wshape), cfg)
    _sync(device)
    info.seconds["fine"] = time.perf_counter() - t

    t = time.perf_counter()
    labels = torch.zeros(native, dtype=torch.uint8, device=device)
    labels[box] = upsample_argmax(logits, crop.shape[1:])
    _sync(device)
    info.seconds["paste"] = time.perf_counter() - t
    info.box, info.working_shape = box, wshape
    return labels, info
