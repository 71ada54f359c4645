"""Accuracy of each engine set along the user's path, and its status (ready or preview).

    python benchmarks/accuracy_sets.py --n 4 --write          # every shipped set, its own protocol
    python benchmarks/accuracy_sets.py --sets dess-pdfs --n 4

For each set, a held-out cohort of the protocol it segments (seed never used in training or
tests; the cohort's own geometry: the OAI's for dess-pdfs, SKM-TEA's for dess, clinical
otherwise) is synthesised as DICOM, converted, and segmented by ``run`` with every shipped
set, so the per-study choice is part of what is measured; the label maps are scored against
the truth (kneebatch.training.evaluate.rate: Dice per tissue, the collateral ligaments split
by slice thickness, the median effusion-volume error, the targets missed). ``--write`` puts
the table and the status into the set's ``engines.json`` (``set`` block), which ``kneebatch
engines list``, the provenance and the docs read. Records go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import machine  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parent
HELD_OUT_SEED = 626262  # no training run or test uses it


def main() -> None:
    from kneebatch.inference.engine_dir import DEFAULT_ENGINES, set_dirs
    from kneebatch.models.engine_sets import CATALOGUE
    from kneebatch.training.evaluate import held_out_accuracy, rate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=Path, default=DEFAULT_ENGINES, help="folder of engine sets")
    ap.add_argument("--sets", nargs="+", default=None, help="sets to rate (default: every set in the folder)")
    ap.add_argument("--n", type=int, default=4, help="held-out studies per set")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--write", action="store_true", help="write each set's table and status into its engines.json")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()

    folders = set_dirs(args.engines)
    records = {}
    for name in args.sets or list(folders):
        protocol = CATALOGUE[name].protocols[0]
        with tempfile.TemporaryDirectory(prefix=f"kneebatch-set-{name}-") as work:
            acc = held_out_accuracy(work, protocol, args.n, args.seed, engines=str(args.engines),
                                    key_file=Path(work) / "k.key", threads=args.threads)
        table = rate(acc.scores)
        wrong = [s for s in acc.engine_sets if s != name]
        record = {**table, "protocol": protocol, "engine_sets": acc.engine_sets, "failed": acc.failed,
                  "evaluated_on": f"{len(acc.scores)} held-out {protocol} studies (seed {args.seed}), DICOM -> "
                                  f"convert -> run"}
        records[name] = record
        print(f"{name}: {table['status']}, mean Dice {table['mean_dice']:.3f}, effusion error median "
              f"{table['median_effusion_error_pct']} %, misses: {'; '.join(table['misses']) or 'none'}"
              + (f"; segmented by other sets: {wrong}" if wrong else ""), flush=True)
        if args.write and not wrong and not acc.failed:
            path = folders[name] / "engines.json"
            manifest = json.loads(path.read_text())
            manifest["set"] = {"name": name, "what": CATALOGUE[name].what, **{k: record[k] for k in (
                "status", "test_dice", "collateral_by_slices", "mean_dice", "median_effusion_error_pct", "misses",
                "evaluated_on")}}
            path.write_text(json.dumps(manifest, indent=1))
    machine.save_record(args.out, "accuracy-sets", {"device": machine.device("cpu"), "engines": str(args.engines),
                                                    "n": args.n, "seed": args.seed, "sets": records})


if __name__ == "__main__":
    main()
