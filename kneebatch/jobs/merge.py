"""``kneebatch merge OUT``: the final tables of a job run as N shards, once all N have finished.

OUT is a ``run``/``measure`` output folder (its parts gathered into the final tables) or a
cohort store converted in shards (the shards' keymap and failure rows folded in).
"""

from __future__ import annotations

import json
from pathlib import Path

from kneebatch.ingest.store import CohortStore, is_store
from kneebatch.jobs.convert import merge_store
from kneebatch.jobs.job import SHARDED, all_shards, gather, shard_records
from kneebatch.jobs.parts import Parts
from kneebatch.jobs.slurm import submission
from kneebatch.measure import measurement_schema
from kneebatch.outputs import MARKER


def merge(out) -> dict:
    """Merge ``out``'s shards. A job's: its gathered summary (``rows``, ``failed``,
    ``carried_failures``, ``studies``, ``shards``, ``seconds``); a store's: ``shards``,
    ``studies`` and ``failed`` (with ``store: True``)."""
    out = Path(out)
    if is_store(out):
        return {**merge_store(out), "store": True}
    submitted = submission(out)
    if submitted and not shard_records(out):  # submitted, and no task has finished (or started) yet
        n = submitted["shards"]
        raise ValueError(f"shards {', '.join(f'{i}/{n}' for i in range(n))} have not finished; kneebatch status {out}")
    if not (out / MARKER).exists():
        raise ValueError(f"{out} holds no kneebatch job outputs")
    marker = json.loads((out / MARKER).read_text())
    if marker["command"] not in SHARDED:
        raise ValueError(f"{out} holds the outputs of 'kneebatch {marker['command']}', which has no shards to merge")
    records, n = all_shards(out)
    store = CohortStore(marker["settings"]["store"], create=False)
    provenance = {**records[0]["provenance"], "shards": [r["report"] for r in records]}
    summary = gather(out, Parts(out, measurement_schema()), store, provenance)
    return {**summary, "shards": n, "seconds": max(r["report"]["seconds"] for r in records)}
