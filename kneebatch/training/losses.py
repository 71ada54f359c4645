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


class KeepUnannotated(torch.nn.Module):
    """Learning without forgetting for what a partial label set does not draw.

    The marginal loss leaves the split of a file's background among the unannotated tissues
    free, so it drifts as shared features change. Where the file says background, this term
    keeps the net's distribution over those tissues (renormalised) close to the initial net's
    (KL divergence, Li & Hoiem, "Learning without forgetting", TPAMI 2018)."""

    def __init__(self, membership, weight: float = 1.0):
        super().__init__()
        m = torch.as_tensor(membership, dtype=torch.float32)
        self.register_buffer("unannotated", m[0] > 0)
        self.weight = weight

    def forward(self, logits: torch.Tensor, initial_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        background = target[:, 0] == 0
        if not bool(background.any()):
            return logits.new_zeros(())
        keep = self.unannotated.view(1, -1, *([1] * (logits.dim() - 2)))
        student = torch.log_softmax(logits.float().masked_fill(~keep, -1e4), 1)
        teacher = torch.log_softmax(initial_logits.float().masked_fill(~keep, -1e4), 1)
        kl = (teacher.exp() * (teacher - student)).masked_fill(~keep, 0.0).sum(1)
        return self.weight * kl[background].mean()
