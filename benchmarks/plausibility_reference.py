"""The plausible range of each tissue's size, from synthetic knees of every anatomy kneebatch draws.

Renders the truth of ``--n`` subjects of the ``train`` preset with ``varied`` anatomy (the widest
normal and OA range the engines are trained on; 0.5-0.85 mm in-plane, 2-D and 3-D slices) and
measures them as ``measure`` does. For each checked tissue it records the median and the MAD of
log(volume / patella volume): the patella is always in the field of view and scales with the
knee, so the ratio is free of knee size and field of view. It also records, per tissue, the
share of its voxels in its largest piece (what ``fragmented:<tissue>`` checks; kneebatch.measure.
FRAGMENT_LIMITS). ``--write`` puts the table into ``kneebatch/assets/plausibility_reference.json``,
which ``kneebatch.plausibility`` reads; rerun this when the anatomy model changes:

    python benchmarks/plausibility_reference.py --n 80 --workers 2 --write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from kneebatch import labels as L  # noqa: E402
from kneebatch.measure import _fragment_sizes, measure_study  # noqa: E402
from kneebatch.plausibility import CHECKED, NORMALISER, PAIRS, REFERENCE_FILE  # noqa: E402
from kneebatch.synth.cohort import ranges_for  # noqa: E402
from kneebatch.training.synthesis import cached_volumes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=5150)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kneebatch-plausibility"))
    ap.add_argument("--write", action="store_true", help=f"write the table to {REFERENCE_FILE}")
    args = ap.parse_args()
    volumes = cached_volumes(args.cache, args.seed, args.n, ranges_for("train", "clinical", "varied"), args.workers)
    checked = (*CHECKED, "mcl", "lcl")  # the collaterals too, to show why they are not checked
    logs = {name: [] for name in (*checked, *(f"{a}/{b}" for a, b in PAIRS))}
    shares = {label.name: [] for label in L.LABELS if label.id != L.BACKGROUND}
    thickness = {plate.name: [] for plate in L.in_group("cartilage")}
    for vol in volumes:
        for name in shares:
            largest, total = (int(v) for v in _fragment_sizes(vol.truth == L.by_name(name).id))
            if total:
                shares[name].append(largest / total)
        row = measure_study(vol.key, vol.truth, None, vol.grid, [], "truth")
        for plate in thickness:
            if row[f"{plate}_thickness_mean_mm"] == row[f"{plate}_thickness_mean_mm"]:  # not NaN
                thickness[plate].append(row[f"{plate}_thickness_mean_mm"])
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
    pieces = {name: {"min": round(min(v), 3), "p5": round(float(np.percentile(v, 5)), 3), "median": round(float(np.median(v)), 3)}
              for name, v in shares.items() if v}
    record = {"made_by": f"benchmarks/plausibility_reference.py --n {args.n} --seed {args.seed}",
              "what": "truth of synthetic knees (train preset, varied anatomy) whose patella the field of view does not "
                      "cut: median, MAD, min, max of log(volume / patella volume) and of log(medial / lateral); and "
                      "each tissue's share of voxels in its largest piece and each plate's mean thickness (all knees)",
              "n": args.n, "seed": args.seed, "normaliser": NORMALISER, "log_ratio": table, "largest_piece_share": pieces,
              "thickness_mean_mm": {name: {"median": round(float(np.median(v)), 4),
                                           "mad": round(float(np.median(np.abs(np.subtract(v, np.median(v))))), 4),
                                           "min": round(min(v), 3), "max": round(max(v), 3), "n": len(v)}
                                    for name, v in thickness.items() if v}}
    print(json.dumps(record, indent=1))
    if args.write:
        REFERENCE_FILE.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {REFERENCE_FILE}")


if __name__ == "__main__":
    main()
