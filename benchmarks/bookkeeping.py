"""What a job costs per study besides decode, nets and measurement: listing the store, finding
what is left (resume), saving part files, gathering and merging shards. It must grow linearly.

A stand-in store holds N study keys in its index (no images: nothing here reads one); the
batches' rows are full measurement rows of random numbers, saved 4 studies per part as
``run`` saves them. For N in (100, 1,000, 10,000):

    python benchmarks/bookkeeping.py [--n 100 1000 10000] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import device, host  # noqa: E402

from kneebatch.ingest.store import CohortStore  # noqa: E402
from kneebatch.jobs.job import Job  # noqa: E402
from kneebatch.jobs.merge import merge  # noqa: E402
from kneebatch.jobs.shards import Shard  # noqa: E402
from kneebatch.measure import measurement_schema  # noqa: E402

BATCH = 4
SHARDS = 4


def stand_in_store(folder: Path, n: int) -> CohortStore:
    store = CohortStore(folder)
    keys = sorted("s" + secrets.token_hex(8) for _ in range(n))
    store.index_path.write_text("".join(f"{k}\n" for k in keys))
    return store


def rows_for(keys, schema, rng) -> list[dict]:
    names = [f.name for f in schema if f.name != "study_key"]
    floats = [f.name for f in schema if str(f.type) == "double"]
    rows = []
    for k in keys:
        row = dict.fromkeys(names)
        row.update(zip(floats, rng.random(len(floats)).tolist()))
        row["study_key"] = k
        rows.append(row)
    return rows


def one_job(store, out: Path, shard: Shard, rng) -> dict:
    schema = measurement_schema()
    t = {}
    t0 = time.perf_counter()
    job = Job("run", store, out, {"bench": True}, schema, shard)
    t["start (claim, list, resume)"] = time.perf_counter() - t0
    batches = [job.todo[i:i + BATCH] for i in range(0, len(job.todo), BATCH)]
    payload = [rows_for(b, schema, rng) for b in batches]  # made beforehand: the nets' work, not bookkeeping
    t0 = time.perf_counter()
    for b, rows in zip(batches, payload):
        job.save(b, rows, [])
    t["save parts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    job.finish({"command": "run"})
    t["gather" if shard.whole else "shard record"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    Job("run", store, out, {"bench": True}, schema, shard)
    t["resume when all done"] = time.perf_counter() - t0
    return t


def measure(n: int, rng) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        store = stand_in_store(tmp / "store.zarr", n)
        list_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert len(store.study_keys()) == n
        listed = time.perf_counter() - t0
        whole = one_job(store, tmp / "whole", Shard(), rng)
        sharded = {}
        for i in range(SHARDS):
            for k, v in one_job(store, tmp / "sharded", Shard(i, SHARDS), rng).items():
                sharded[k] = sharded.get(k, 0.0) + v
        t0 = time.perf_counter()
        merged = merge(tmp / "sharded")
        sharded["merge"] = time.perf_counter() - t0
        assert merged["rows"] == n
    whole_s = sum(whole.values())
    return {"studies": n, "list_store_s": round(listed, 4), "make_stand_in_s": round(list_s, 3),
            "whole_job_s": {k: round(v, 4) for k, v in whole.items()}, "whole_job_total_s": round(whole_s, 3),
            "whole_ms_per_study": round(1000 * whole_s / n, 3),
            f"{SHARDS}_shards_s": {k: round(v, 4) for k, v in sharded.items()},
            f"{SHARDS}_shards_ms_per_study": round(1000 * sum(sharded.values()) / n, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for n in args.n:
        r = measure(n, rng)
        results.append(r)
        print(json.dumps(r))
    base = results[0]
    growth = {r["studies"]: round(r["whole_ms_per_study"] / base["whole_ms_per_study"], 2) for r in results}
    record = {"benchmark": "bookkeeping", "date": str(date.today()), "device": device("cpu"), "host": host(),
              "batch_size": BATCH, "results": results,
              "per_study_cost_relative_to_smallest": growth}
    print("per-study cost relative to", base["studies"], "studies:", growth)
    out = args.out or Path(__file__).parent / "results" / f"bookkeeping-{date.today()}-{host()}.json"
    out.write_text(json.dumps(record, indent=1))
    print("->", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
