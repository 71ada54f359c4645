"""The plausible range of each tissue's size, from synthetic knees of every anatomy kneebatch draws.

Renders the truth of ``--n`` subjects of the ``train`` preset with ``varied`` anatomy (the widest
normal and OA range the engines are trained on; 0.5-0.85 mm in-plane, 2-D and 3-D slices) and
measures them as ``measure`` does. For each checked tissue it records the median and the MAD of
log(volume / patella volume): the patella is always in the field of view and scales with the
knee, so the ratio is free of knee size and field of view. ``kneebatch.plausibility`` holds the
result; rerun this when the anatomy model changes:

    python benchmarks/plausibility_reference.py --n 40 --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from kneebatch.measure import measure_study  # noqa: E402
from kneebatch.plausibility import CHECKED, NORMALISER, PAIRS  # noqa: E402
from kneebatch.synth.cohort import ranges_for  # noqa: E402
from kneebatch.training.synthesis import cached_volumes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=5150)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kneebatch-plausibility"))
    args = ap.parse_args()
    volumes = cached_volumes(args.cache, args.seed, args.n, ranges_for("train", "clinical", "varied"), args.workers)
    checked = (*CHECKED, "mcl", "lcl")  # the collaterals too, to show why they are not checked
    logs = {name: [] for name in (*checked, *(f"{a}/{b}" for a, b in PAIRS))}
    for vol in volumes:
        row = measure_study(vol.key, vol.truth, None, vol.grid, [], "truth")
        if f"fov_truncates:{NORMALISER}" in row["qc_flags"]:
            continue  # a patella cut by the field of view normalises nothing
        ref = row[f"{NORMALISER}_volume_mm3"]

        def volume(name, row=row):
            return row[f"{name}_volume_mm3"]

        for name in checked:
            if volume(name) > 0:
                logs[name].append(float(np.log(volume(name) / ref)))
        for a, b in PAIRS:
            if volume(a) > 0 and volume(b) > 0:
                logs[f"{a}/{b}"].append(float(np.log(volume(a) / volume(b))))
    table = {name: {"median": round(float(np.median(v)), 4),
                    "mad": round(float(np.median(np.abs(np.asarray(v) - np.median(v)))), 4),
                    "min": round(min(v), 4), "max": round(max(v), 4), "n": len(v)} for name, v in logs.items()}
    print(json.dumps({"n": args.n, "seed": args.seed, "normaliser": NORMALISER, "log_ratio": table}, indent=1))


if __name__ == "__main__":
    main()
