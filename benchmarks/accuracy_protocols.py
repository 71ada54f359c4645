"""Accuracy per synthetic protocol, along the user's path (DICOM -> convert -> run).

    python benchmarks/accuracy_protocols.py --engines engines --n 4
    python benchmarks/accuracy_protocols.py --engines data/candidate --protocols clinical pdfs --anatomy extreme

For each protocol a held-out cohort (seed never used in training) is synthesised,
converted and segmented with the engines; Dice per tissue, the median effusion-volume
error and the series used are written to ``benchmarks/results/accuracy-<date>-<host>.json``
and printed as a table. ``stir`` is the contrast held out of training.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import machine  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parent


def main() -> None:
    from kneebatch import labels as L
    from kneebatch.inference.engine_dir import DEFAULT_ENGINES
    from kneebatch.training.evaluate import held_out_accuracy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=Path, default=DEFAULT_ENGINES)
    ap.add_argument("--protocols", nargs="+", default=["clinical", "oai", "skmtea", "pdfs", "t2fs", "stir"])
    ap.add_argument("--n", type=int, default=4, help="studies per protocol")
    ap.add_argument("--seed", type=int, default=515151, help="held-out seed (training used 1000)")
    ap.add_argument("--preset", default="clinical")
    ap.add_argument("--anatomy", default=None, help="typical (default), varied or extreme")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()

    from kneebatch.synth.cohort import ranges_for

    records = {}
    for protocol in args.protocols:
        with tempfile.TemporaryDirectory(prefix=f"kneebatch-acc-{protocol}-") as work:
            acc = held_out_accuracy(work, protocol, args.n, args.seed, engines=str(args.engines),
                                    key_file=Path(work) / "k.key", threads=args.threads,
                                    ranges=ranges_for(args.preset, protocol, args.anatomy))
        records[protocol] = {"dice": {k: round(v, 4) for k, v in acc.dice.items()},
                             "mean_dice": round(acc.mean_dice, 4),
                             "median_effusion_error_pct": round(acc.median_effusion_error_pct, 2),
                             "channels_used": acc.channels_used, "failed": acc.failed}
        print(f"{protocol}: mean Dice {acc.mean_dice:.3f}, effusion error {acc.median_effusion_error_pct:.1f} %, "
              f"series {sorted(set(acc.channels_used))}", flush=True)
    names = [lab.name for lab in L.LABELS]
    print("| tissue | " + " | ".join(records) + " |\n| --- |" + " --- |" * len(records))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{records[p]['dice'].get(name, float('nan')):.3f}" for p in records) + " |")
    machine.save_record(args.out, "accuracy", {"device": machine.device("cpu"), "engines": str(args.engines),
                                               "n": args.n, "seed": args.seed, "anatomy": args.anatomy or "typical",
                                               "protocols": records})


if __name__ == "__main__":
    main()
