"""Same knees, any protocol: do the engine sets measure the same anatomy alike?

    python benchmarks/cross_protocol.py --n 4

The synthetic protocols draw the same knees per seed (anatomy and pose come from the subject's
own stream), so subject *i* of a seed is one knee scanned as the clinical T1 + T2-FS, the
OAI's DESS + IW-TSE-FS, SKM-TEA's qDESS, a PD-FS and a T2-FS. Each protocol's cohort is
synthesised as DICOM, converted and segmented by ``run`` with the shipped sets (each study
gets its set), and its truth is measured the same way (``measure --labels``). For effusion
volume and the mean cartilage thickness per plate the table gives, per set, the median over
subjects of the difference from the t1-t2 set's measurement of the same knee, and from the
truth on that protocol's own grid. Records go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import machine  # benchmarks/machine.py
import numpy as np

ROOT = Path(__file__).resolve().parent
SEED = 737373  # no training run or test uses it
PROTOCOLS = ("clinical", "oai", "skmtea", "pdfs", "t2fs")
MEASURES = ("effusion_volume_mm3", "femoral_cartilage_thickness_mean_mm", "medial_tibial_cartilage_thickness_mean_mm",
            "lateral_tibial_cartilage_thickness_mean_mm", "patellar_cartilage_thickness_mean_mm")


def by_knee(store, cohort, table) -> dict:
    """Rows by the knee's index in the seed: each protocol's scan of a knee is a study of its own
    (UIDs of its own), so the synth manifest says which knee a study is."""
    from kneebatch.ingest.store import CohortStore
    from kneebatch.outputs import read_rows

    index = {s["study_uid"]: s["index"] for s in json.loads((cohort / "manifest.json").read_text())["studies"]}
    uid = {r["study_key"]: r["study_uid"] for r in read_rows(CohortStore(store).keymap_path)}
    return {index[uid[r["study_key"]]]: r for r in read_rows(table)}


def pct(a, b) -> float:
    """|a - b| in % of b; NaN where either is missing (a tissue not found)."""
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)) or b == 0:
        return float("nan")
    return float(abs(a - b) / abs(b) * 100)


def main() -> None:
    from kneebatch.jobs.convert import convert
    from kneebatch.jobs.measure import measure_store
    from kneebatch.jobs.run import run
    from kneebatch.synth.cohort import generate_cohort

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="subjects (each scanned in every protocol)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--engines", default=None, help="folder of engine sets (default: the shipped)")
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS,
                    help="protocols to scan the knees in (clinical, the reference, always)")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    protocols = ["clinical", *(p for p in args.protocols if p != "clinical")]

    seg, truth, sets = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="kneebatch-cross-") as work:
        work = Path(work)
        for protocol in protocols:
            root = work / protocol
            generate_cohort(root / "cohort", args.n, seed=args.seed, protocol=protocol, workers=2)
            store = root / "store.zarr"
            convert(root / "cohort" / "dicom", store, key_file=work / "k.key", show_progress=False)
            run(store, root / "run", engines_path=args.engines, show_progress=False)
            measure_store(store, root / "truth", labels_dir=root / "cohort" / "truth", show_progress=False)
            seg[protocol] = by_knee(store, root / "cohort", root / "run" / "measurements.parquet")
            truth[protocol] = by_knee(store, root / "cohort", root / "truth" / "measurements.parquet")
            sets[protocol] = sorted({r["engine_set"] for r in seg[protocol].values()})
            print(f"{protocol}: {len(seg[protocol])} of {args.n} segmented by {sets[protocol]}", flush=True)
    table = {}
    for protocol in protocols:
        rows = {}
        for m in MEASURES:
            vs_ref = [pct(r[m], seg["clinical"][u][m]) for u, r in seg[protocol].items() if u in seg["clinical"]]
            vs_truth = [pct(r[m], truth[protocol][u][m]) for u, r in seg[protocol].items() if u in truth[protocol]]
            rows[m] = {"median_pct_vs_t1_t2": round(float(np.nanmedian(vs_ref)), 2) if vs_ref else None,
                       "median_pct_vs_truth": round(float(np.nanmedian(vs_truth)), 2) if vs_truth else None,
                       "values": [None if r[m] is None else round(float(r[m]), 3) for r in seg[protocol].values()]}
        table[protocol] = {"engine_sets": sets[protocol], "measures": rows}
    machine.save_record(args.out, "cross-protocol", {"device": machine.device("cpu"), "n": args.n, "seed": args.seed,
                                                     "engines": args.engines or "shipped", "protocols": table})
    print("| measurement | " + " | ".join(f"{p} ({'/'.join(table[p]['engine_sets'])})" for p in protocols) + " |")
    print("| --- |" + " --- |" * len(protocols))
    for m in MEASURES:
        cells = [f"{table[p]['measures'][m]['median_pct_vs_t1_t2']} % / {table[p]['measures'][m]['median_pct_vs_truth']} %"
                 for p in protocols]
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
