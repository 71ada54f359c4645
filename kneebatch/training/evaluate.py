"""Accuracy on held-out synthetic cohorts, measured along the user's path.

A cohort of a protocol is synthesised as DICOM (seed never used in training), converted,
segmented by ``run`` with the given engines, and compared with its truth: Dice per
tissue and the effusion-volume error per study. Tests, the demo and the benchmarks all
score against the truth with :func:`dice_against_truth`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Accuracy:
    protocol: str
    dice: dict  # label name -> mean Dice over the studies that have it
    effusion_error_pct: list = field(default_factory=list)  # per study, |pred - truth| / truth
    channels_used: list = field(default_factory=list)
    failed: int = 0

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values())))

    @property
    def median_effusion_error_pct(self) -> float:
        return float(np.median(self.effusion_error_pct)) if self.effusion_error_pct else float("nan")


def held_out_accuracy(root, protocol: str, n: int, seed: int, engines=None, preset: str = "clinical",
                      key_file=None, ranges=None, **run_options) -> Accuracy:
    """Synthesise ``n`` studies of ``protocol`` under ``root``, convert, run, score against truth."""
    from kneebatch.ingest.convert import convert
    from kneebatch.jobs.run import run
    from kneebatch.outputs import read_rows
    from kneebatch.synth.cohort import generate_cohort

    root = Path(root)
    generate_cohort(root / "cohort", n, seed=seed, preset=preset, protocol=protocol, ranges=ranges, workers=1)
    convert(root / "cohort" / "dicom", root / "store.zarr", key_file=key_file, show_progress=False)
    report = run(root / "store.zarr", root / "out", engines_path=engines, show_progress=False, **run_options)
    per_label, effusion = dice_against_truth(root / "store.zarr", root / "cohort" / "truth")
    used = [r.get("channels_used") for r in read_rows(root / "out" / "measurements.parquet")]
    return Accuracy(protocol, {k: float(np.mean(v)) for k, v in per_label.items()}, effusion, used, report.failed)


def dice_against_truth(store_path, truth_dir) -> tuple[dict[str, list[float]], list[float]]:
    """Dice per tissue of each study's newest label map against its truth file (named by study key,
    StudyInstanceUID or case), and each study's effusion-volume error in % (studies with effusion)."""
    from kneebatch import labels as L
    from kneebatch.ingest.label_import import label_file, read_label_file, study_names
    from kneebatch.ingest.store import CohortStore
    from kneebatch.measure import dice_per_label

    store = CohortStore(store_path, create=False)
    per_label, effusion = {}, []
    eff = L.by_name("effusion").id
    for key, names in study_names(store).items():
        pred = store.read_labels(key)
        path = label_file(truth_dir, names)
        if pred is None or path is None:
            continue
        truth, _ = read_label_file(path, store.grid(key))
        for name, dice in dice_per_label(pred, truth).items():
            per_label.setdefault(name, []).append(dice)
        if np.any(truth == eff):
            effusion.append(float(abs(np.sum(pred == eff) - np.sum(truth == eff)) / np.sum(truth == eff) * 100))
    return per_label, effusion
