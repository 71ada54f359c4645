"""Each engine set's confidence per tissue on held-out studies of its own protocol: the reference
the ``uncertain:<tissue>`` QC flag compares a study with.

    python benchmarks/confidence_reference.py --n 12 --write          # every shipped set
    python benchmarks/confidence_reference.py --sets t1-t2 --n 12

For each set, ``--n`` held-out studies of the protocol it segments (a seed no training run,
rating or test uses) are synthesised as DICOM, converted and segmented by ``run``, as
``accuracy_sets.py`` does. Each row holds the engines' confidence per tissue (the mean
probability of the winning label over the voxels it wins); the median and the MAD over the
studies are the set's reference. ``--write`` puts them into the set's ``engines.json``
(``set.confidence``), which ``run`` reads (:func:`kneebatch.plausibility.uncertain`). Records go
to benchmarks/results/.
"""

from __future__ import annotations

import json
from pathlib import Path

import machine  # benchmarks/machine.py
import numpy as np

ROOT = Path(__file__).resolve().parent
REFERENCE_SEED = 909090  # no training run, rating or test uses it


def main() -> None:
    from kneebatch import labels as L
    args = machine.engine_set_arguments(
        __doc__, 12, REFERENCE_SEED, "write each set's reference into its engines.json", ROOT / "results")
    records = {}
    for name, folder, protocol, acc, rows in machine.held_out_per_set(args):
        wrong = [s for s in acc.engine_sets if s != name]
        reference = {}
        for label in L.LABELS:
            values = [r[f"{label.name}_confidence"] for r in rows if label.id != L.BACKGROUND
                      and r.get(f"{label.name}_confidence") is not None]
            if values:
                median = float(np.median(values))
                reference[label.name] = [round(median, 4), round(float(np.median(np.abs(np.subtract(values, median)))), 4)]
        dice = {k: round(v, 3) for k, v in acc.dice.items()}
        records[name] = {"protocol": protocol, "studies": len(rows), "failed": acc.failed, "engine_sets": acc.engine_sets,
                         "confidence": reference, "dice": dice,
                         "min_confidence": {label.name: round(min(r[f"{label.name}_confidence"] for r in rows
                                                                  if r.get(f"{label.name}_confidence") is not None), 4)
                                            for label in L.LABELS if label.name in reference}}
        print(f"{name}: {len(rows)} studies; confidence median (MAD): "
              + ", ".join(f"{k} {m:.3f} ({d:.3f})" for k, (m, d) in reference.items())
              + (f"; segmented by other sets: {wrong}" if wrong else ""), flush=True)
        if args.write and not wrong and not acc.failed:
            path = folder / "engines.json"
            manifest = json.loads(path.read_text())
            manifest.setdefault("set", {"name": name})["confidence"] = reference
            manifest["set"]["confidence_evaluated_on"] = (f"{len(rows)} held-out {protocol} studies (seed {args.seed}), "
                                                          "DICOM -> convert -> run; median and MAD per tissue")
            path.write_text(json.dumps(manifest, indent=1))
    machine.save_record(args.out, "confidence-reference", {"device": machine.device("cpu"), "engines": str(args.engines),
                                                           "n": args.n, "seed": args.seed, "sets": records})


if __name__ == "__main__":
    main()
