"""Domain-randomised coarse-to-fine training: images made from label volumes as training runs.

The loop, checkpoints, EMA and validation are :class:`~kneebatch.training.train.Trainer`'s;
what differs is where images come from. Every ``refresh_every`` steps one training
subject is re-rendered with a new :class:`~kneebatch.training.synthesis.Appearance`
(half random intensities per label, half a physical contrast) and, half the time, a
random smooth deformation of its labels, so the nets never see one appearance or one
shape for long. Validation subjects are rendered once, with fixed contrasts,
so the validation curve compares like with like; the test subjects also get the
contrasts held out of training.

The fine crop is the truth's foreground box plus the inference margin and a random
jitter (the coarse net's box at inference varies about as much), cut by the same
:func:`~kneebatch.models.preprocess.fine_crop` as inference.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from kneebatch.models.config import ModelConfig
from kneebatch.models.preprocess import box_from_mask, fine_crop, normalize, resize
from kneebatch.synth import physics
from kneebatch.training.synthesis import (
    HELD_OUT_FAMILIES,
    LabelVolume,
    deform,
    draw_appearance,
    physics_appearance,
    random_appearance,
    synthesize,
)
from kneebatch.training.train import Case, Trainer, _log

VALIDATION_CONTRASTS = ("T1_TSE", "T2_TSE_FS", "PD_TSE_FS", "DESS_WE", "random")


class DomainTrainer(Trainer):
    def __init__(self, volumes: list[LabelVolume], out, cfg: ModelConfig | None = None, seed: int = 0,
                 jitter_mm: float = 10.0, batch_size: int = 2, lr: float = 1e-3, init_from=None,
                 refresh_every: int = 2, p_random: float = 0.5, p_deform: float = 0.5, device: str = "cpu"):
        # every label of the schema is in the synthetic truth: no label set
        super().__init__(out, cfg, "synthetic", seed, jitter_mm, batch_size, lr, init_from, None, device)
        self.refresh_every, self.p_random, self.p_deform = refresh_every, p_random, p_deform
        self.volumes = {v.key: v for v in volumes}
        self._use_keys(sorted(self.volumes))
        self._steps = 0

    # ------------------------------------------------------------------ data
    def _case(self, vol: LabelVolume, look, rng, jitter: float, keep_native: bool = False,
              coarse_only: bool = False, warp: bool = False) -> Case:
        if coarse_only:  # the coarse net sees 32 x 64 x 64: a quarter of the rows and columns is plenty
            vol = vol.subsampled(2)
        if warp:
            vol = deform(vol, rng)
        image = synthesize(vol, look, rng)
        x = normalize(torch.from_numpy(image)[None])
        y = torch.from_numpy(vol.truth)
        case = Case(vol.key, resize(x, self.cfg.coarse_shape).half(), resize(y, self.cfg.coarse_shape, labels=True))
        case.contrast = look.name
        if coarse_only:
            return case
        margin = self.cfg.crop_margin_mm + float(rng.uniform(-jitter, jitter))
        box = box_from_mask(y > 0, tuple(y.shape), vol.grid.spacing, max(margin, 2.0))
        fx, case.fine_y = fine_crop(x, box, vol.grid.spacing, self.cfg, y)
        case.fine_x = fx.half()
        case.native = (image[None], vol.truth, vol.grid) if keep_native else None
        return case

    def load(self) -> None:
        t = time.perf_counter()
        fixed = np.random.default_rng([self.seed, 1])
        self.cases = {"train": [self._case(self.volumes[k], draw_appearance(self.rng, self.p_random), self.rng,
                                           self.jitter_mm) for k in self.split["train"]]}
        self.cases["val"] = [self._case(self.volumes[k], _fixed_look(name, fixed), fixed, 0.0)
                             for i, k in enumerate(self.split["val"])
                             for name in VALIDATION_CONTRASTS[i % 2::2]]
        self.cases["test"] = [self._case(self.volumes[k], _fixed_look(name, fixed), fixed, 0.0, keep_native=True)
                              for k in self.split["test"] for name in (*VALIDATION_CONTRASTS, *HELD_OUT_FAMILIES)]
        _log(f"rendered {sum(map(len, self.cases.values()))} images of {len(self.volumes)} label volumes "
             f"({', '.join(f'{p} {len(c)}' for p, c in self.cases.items())}) in {time.perf_counter() - t:.0f} s")

    def _refresh(self, coarse_only: bool = False) -> None:
        self._steps += 1
        if self._steps % self.refresh_every:
            return
        i = int(self.rng.integers(0, len(self.cases["train"])))
        old = self.cases["train"][i]
        new = self._case(self.volumes[old.key], draw_appearance(self.rng, self.p_random), self.rng, self.jitter_mm,
                         coarse_only=coarse_only, warp=bool(self.rng.random() < self.p_deform))
        if coarse_only:  # keep the fine crops for the fine stage
            old.coarse_x, old.coarse_y, old.contrast = new.coarse_x, new.coarse_y, new.contrast
        else:
            self.cases["train"][i] = new

    def coarse_batch(self):
        self._refresh(coarse_only=True)
        return super().coarse_batch()

    def fine_batch(self):
        self._refresh()
        return super().fine_batch()

    def evaluate_test(self, coarse, fine) -> dict:
        """Full-pipeline Dice per test contrast (held-out contrasts included), and overall."""
        from kneebatch.training.train import _mean_scores

        scores = self.test_scores(coarse, fine)
        per_contrast: dict[str, list] = {}
        for case, score in zip(self.cases["test"], scores):
            per_contrast.setdefault(case.contrast, []).append(score)
        self.test_by_contrast = {c: _mean_scores(s) for c, s in per_contrast.items()}
        return _mean_scores(scores)

    def extra_metrics(self) -> dict:
        return {"test_dice_by_contrast": self.test_by_contrast, "held_out_contrasts": list(HELD_OUT_FAMILIES)}


def _fixed_look(name: str, rng: np.random.Generator):
    if name == "random":
        look = random_appearance(rng)
    else:
        look = physics_appearance(physics.draw(name, rng, field_t=3.0), rng, jitter=0.0, name=name)
    look.snr, look.bias = 20.0, 0.15
    return look


def train_domain(volumes, out, minutes_coarse: float, minutes_fine: float, threads: int | None = None,
                 seed: int = 0, init_from=None, lr: float = 1e-3, cfg: ModelConfig | None = None,
                 eval_every_fine: int = 150, p_random: float = 0.5, device: str = "cpu", batch_size: int = 2) -> dict:
    from kneebatch.training.train import check_training_device, finish

    if threads:
        torch.set_num_threads(threads)
    check_training_device(device)
    tr = DomainTrainer(volumes, out, cfg=cfg or ModelConfig(in_channels=1, input_roles=[], per_series=True),
                       seed=seed, init_from=init_from, lr=lr, p_random=p_random, device=device, batch_size=batch_size)
    tr.load()
    coarse = tr.run_stage("coarse", minutes_coarse, eval_every=100)
    fine = tr.run_stage("fine", minutes_fine, eval_every=eval_every_fine)
    return finish(tr, coarse, fine, seed, minutes_coarse, minutes_fine)
