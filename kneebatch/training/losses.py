"""Losses for full and partial label maps.

With a data set that annotates only some tissues (OAI-ZIB: femur, tibia and their
cartilage), plain cross-entropy would teach the net that every other tissue is
background. The marginal loss (Shi et al., "Marginal loss and exclusion loss for partially
supervised multi-organ segmentation", MedIA 2021; Fang & Yan, "Multi-organ segmentation
over partially labeled datasets", IEEE TMI 2020) sums the net's softmax over the schema
labels each annotated class stands for, and the background over every label the data set
does not annotate, then applies Dice + cross-entropy to those merged probabilities.
With a full label set it is the usual Dice + cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MarginalDiceCE(torch.nn.Module):
    def __init__(self, membership):
        """``membership [n set classes, n schema classes]``: 0/1, class 0 the background."""
        super().__init__()
        self.register_buffer("membership", torch.as_tensor(membership, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits [B, n schema classes, ...]``; ``target [B, 1, ...]`` set class ids."""
        prob = torch.softmax(logits.float(), 1)
        merged = torch.einsum("bc...,sc->bs...", prob, self.membership)
        y = target[:, 0].long()
        ce = F.nll_loss(torch.log(merged.clamp_min(1e-7)), y)
        onehot = F.one_hot(y, merged.shape[1]).movedim(-1, 1).float()
        dims = (0, *range(2, merged.dim()))  # batch Dice: one score per class over the whole batch
        inter = (merged * onehot).sum(dims)
        denom = merged.sum(dims) + onehot.sum(dims)
        dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
        return ce + dice.mean()
