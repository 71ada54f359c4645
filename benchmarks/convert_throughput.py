"""Convert throughput: DICOM tree -> cohort store, in one run on the same studies.

    python benchmarks/convert_throughput.py --n 12 --workers 1 2

Measures, per worker count: studies/s, DICOM MB/s read, image MB/s written
(uncompressed), and the store's whole-study read speed (what inference will see).
Writes ``benchmarks/results/convert-<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import machine  # benchmarks/machine.py

from kneebatch.distributed.cluster import dask_client
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.convert import convert
from kneebatch.synth.cohort import generate_cohort


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--preset", default="clinical")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kneebatch-bench-cohort")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    cohort = args.cache / f"{args.preset}-{args.seed}-{args.n}"
    if not (cohort / "manifest.json").exists():
        generate_cohort(cohort, args.n, seed=args.seed, preset=args.preset, workers=max(args.workers))
    dicom_mb = tree_bytes(cohort / "dicom") / 1e6
    manifest = json.loads((cohort / "manifest.json").read_text())
    shapes = [s["series"][s["t1_series_uid"]]["shape_zyx"] for s in manifest["studies"]]
    work = Path(tempfile.mkdtemp(prefix="kneebatch-bench-"))
    runs = []
    try:
        for workers in args.workers:
            store = work / f"store-{workers}"
            key = work / "bench.key"
            if workers > 1:
                with dask_client("local", n_workers=workers) as client:
                    t0 = time.perf_counter()
                    r = convert(cohort / "dicom", store, client=client, key_file=key, show_progress=False)
                    wall = time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                r = convert(cohort / "dicom", store, key_file=key, show_progress=False)
                wall = time.perf_counter() - t0
            assert r.converted == args.n, r
            s = CohortStore(store)
            t0 = time.perf_counter()
            read_bytes = sum(s.read_image(k)[0].nbytes for k in s.study_keys())
            read_s = time.perf_counter() - t0
            runs.append({
                "workers": workers,
                "seconds": round(wall, 3),
                "studies_per_s": round(args.n / wall, 3),
                "dicom_mb_per_s": round(dicom_mb / wall, 1),
                "image_mb_per_s": round(r.image_bytes / 1e6 / wall, 1),
                "store_bytes_on_disk_mb": round(tree_bytes(store) / 1e6, 1),
                "image_bytes_mb": round(r.image_bytes / 1e6, 1),
                "store_read_studies_per_s": round(args.n / read_s, 2),
                "store_read_mb_per_s": round(read_bytes / 1e6 / read_s, 1),
            })
            print(json.dumps(runs[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "benchmark": "convert",
        "device": machine.device(),
        "date": date.today().isoformat(),
        "n_studies": args.n,
        "preset": args.preset,
        "t1_shapes_zyx": shapes,
        "dicom_mb": round(dicom_mb, 1),
        "runs": runs,
    }
    machine.save_record(args.out, "convert", record)


if __name__ == "__main__":
    main()
