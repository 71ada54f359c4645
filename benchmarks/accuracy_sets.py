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

import json
from pathlib import Path

import machine  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parent
HELD_OUT_SEED = 626262  # no training run or test uses it


def main() -> None:
    from kneebatch.models.engine_sets import CATALOGUE
    from kneebatch.training.evaluate import rate

    args = machine.engine_set_arguments(
        __doc__, 4, HELD_OUT_SEED, "write each set's table and status into its engines.json", ROOT / "results")
    records = {}
    for name, folder, protocol, acc, _ in machine.held_out_per_set(args):
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
            path = folder / "engines.json"
            manifest = json.loads(path.read_text())
            manifest["set"] = {"name": name, "what": CATALOGUE[name].what, **{k: record[k] for k in (
                "status", "test_dice", "collateral_by_slices", "mean_dice", "median_effusion_error_pct", "misses",
                "evaluated_on")}}
            path.write_text(json.dumps(manifest, indent=1))
    machine.save_record(args.out, "accuracy-sets", {"device": machine.device("cpu"), "engines": str(args.engines),
                                                    "n": args.n, "seed": args.seed, "sets": records})


if __name__ == "__main__":
    main()
