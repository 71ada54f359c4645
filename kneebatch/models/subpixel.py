"""Transposed 3-D convolutions rewritten as one convolution plus a pixel shuffle.

A transposed convolution of stride ``s`` is ``s`` interleaved ordinary convolutions,
one per output phase (the sub-pixel view). ONNX Runtime's CPU ``ConvTranspose`` for
3-D is slow: it was half of the fine U-Net's time there, against under two fifths for
all the ordinary convolutions, which do more arithmetic. :func:`without_transposed_convs`
swaps each ``nn.ConvTranspose3d`` of a network for :class:`SubPixelConvTranspose3d`,
which computes the same output (to float rounding) with one ``Conv`` and a
reshape/transpose, before export. Weights are not changed, only how they are applied.
(Measured on a 2-core Xeon with AVX-512: the fine net 7 % faster; on a 2-core EPYC an
earlier version was not faster, its 8-D transpose costing what it saved.)
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


def _phase_taps(kernel: int, stride: int, padding: int):
    """For one axis: input offsets ``d`` (lo, hi) and, per output phase ``r`` and offset,
    the kernel index that links ``x[m + d]`` to ``y[s*m + r]`` (None where none does)."""
    # y[s*m + r] = sum_d x[m + d] * w[r + padding - s*d], for 0 <= r + padding - s*d < kernel
    offsets = {r: [d for d in range(-kernel, kernel + 1) if 0 <= r + padding - stride * d < kernel]
               for r in range(stride)}
    lo = min(min(v) for v in offsets.values())
    hi = max(max(v) for v in offsets.values())
    table = [[(r + padding - stride * d) if d in offsets[r] else None for d in range(lo, hi + 1)]
             for r in range(stride)]
    return lo, hi, table


def rewritable(deconv: nn.ConvTranspose3d) -> bool:
    """Whether ``deconv``'s output is exactly ``stride`` times its input along every axis
    (what U-Nets use: odd kernel, padding (k-1)/2, output_padding stride-1), ungrouped."""
    return deconv.groups == 1 and all(d == 1 for d in deconv.dilation) and all(
        -2 * p + k + op - s == 0 for k, s, p, op in
        zip(deconv.kernel_size, deconv.stride, deconv.padding, deconv.output_padding))


class SubPixelConvTranspose3d(nn.Module):
    """Same output as the given ``nn.ConvTranspose3d`` (see :func:`rewritable`)."""

    def __init__(self, deconv: nn.ConvTranspose3d):
        super().__init__()
        if not rewritable(deconv):
            raise ValueError(f"cannot rewrite {deconv}")
        w = deconv.weight.detach()  # [C_in, C_out, kz, ky, kx]
        c_in, c_out = w.shape[:2]
        axes = [_phase_taps(k, s, p) for k, s, p in zip(deconv.kernel_size, deconv.stride, deconv.padding)]
        self.strides = tuple(deconv.stride)
        self.c_out = c_out
        phases = math.prod(self.strides)
        sizes = [hi - lo + 1 for lo, hi, _ in axes]
        weight = torch.zeros(c_out, phases, c_in, *sizes, dtype=w.dtype)
        for q, phase in enumerate(itertools.product(*(range(s) for s in self.strides))):
            for taps in itertools.product(*(range(n) for n in sizes)):
                k = [axes[a][2][phase[a]][taps[a]] for a in range(3)]
                if None not in k:
                    weight[(slice(None), q, slice(None), *taps)] = w[:, :, k[0], k[1], k[2]].T
        self.weight = nn.Parameter(weight.reshape(c_out * phases, c_in, *sizes), requires_grad=False)
        bias = deconv.bias.detach() if deconv.bias is not None else torch.zeros(c_out, dtype=w.dtype)
        self.bias = nn.Parameter(bias.repeat_interleave(phases), requires_grad=False)
        # F.pad order: last axis first; offsets below 0 need zeros before, above 0 after
        self.pad = tuple(v for lo, hi, _ in reversed(axes) for v in (-lo, hi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv3d(F.pad(x, self.pad), self.weight, self.bias)
        b, _, z, h, w = y.shape
        # [b*c, phases of the strided axes..., z, h, w] -> each phase after its axis; axes of
        # stride 1 get no phase dimension (a lower-rank transpose is a faster one)
        strided = [a for a, s in enumerate(self.strides) if s > 1]
        y = y.reshape(b * self.c_out, *(self.strides[a] for a in strided), z, h, w)
        order = [0]
        for a in range(3):
            order.append(1 + len(strided) + a)
            if a in strided:
                order.append(1 + strided.index(a))
        sz, sy, sx = self.strides
        return y.permute(*order).reshape(b, self.c_out, z * sz, h * sy, w * sx)


def without_transposed_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose rewritable ``ConvTranspose3d`` layers are sub-pixel convolutions.

    Layers in a block with an instance norm (MONAI's ``Convolution``: conv, then norm)
    are kept: the legacy ONNX exporter needs the channel count at an instance norm, and
    loses it in the shuffle's reshape of dynamic sizes.
    """
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        if any(isinstance(d, nn.InstanceNorm3d) for c in module.children() for d in c.modules()):
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ConvTranspose3d) and rewritable(child):
                setattr(module, child_name, SubPixelConvTranspose3d(child))
    return model
