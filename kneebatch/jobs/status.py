"""``kneebatch status OUT``: where a job stands, shard by shard.

A shard is *finished* when its record (``OUT/shards/*.json``) exists; one that has started saves
its progress as it goes (``OUT/progress/*.json``: studies saved, failed, studies/s). Of a SLURM
submission (``OUT/slurm/submit.json``), the other shards are *running* or *pending* as
``squeue`` reports them, and *failed* when SLURM no longer knows them (exited without a
record: out of time or memory, cancelled, crashed). Without SLURM they are *missing*.
"""

from __future__ import annotations

import json
from pathlib import Path

from kneebatch.ingest.store import is_store
from kneebatch.jobs.job import SHARDED, progress_records, shard_records
from kneebatch.jobs.shards import Shard
from kneebatch.jobs.slurm import SLURM_DIR, now_utc, queued_tasks, sbatch, submission
from kneebatch.outputs import MARKER, write_text_atomic


def job_status(out) -> dict:
    out = Path(out)
    submit = submission(out)
    if (out / MARKER).exists():
        command = json.loads((out / MARKER).read_text())["command"]
        if command not in SHARDED:
            raise ValueError(f"{out} holds the outputs of 'kneebatch {command}', a command without shards")
    elif is_store(out):
        command = "convert"
    elif submit:  # submitted, no task has started yet
        command = submit["command"][0]
    else:
        raise ValueError(f"{out} holds no kneebatch job outputs")
    records = {Shard.parse(r["report"]["shard"]).index: r["report"] for r in shard_records(out)}
    if not records and not submit:
        return _whole_job(out, command)
    count = submit["shards"] if submit else max([Shard.parse(r["shard"]).count for r in records.values()] or [1])
    queue = queued_tasks(submit) if submit else None
    progress = progress_records(out)
    shards = []
    for i in range(count):
        if i in records:
            r = records[i]
            shards.append({"shard": f"{i}/{count}", "state": "finished", "studies": r["studies"],
                           "saved": r["saved"] + r["already_done"], "failed": r["failed"],
                           "studies_per_s": r["studies_per_s"], "seconds": r["seconds"]})
        else:
            if not submit:
                state = "unfinished" if i in progress else "missing"  # running here, or stopped
            elif queue is None:
                state = "unknown"  # SLURM cannot be asked from here
            else:
                state = queue.get(i, "failed").lower()
            shards.append({"shard": f"{i}/{count}", "state": state, **_progress_of(progress.get(i))})
    final = out / ("keymap.parquet" if command == "convert" else "provenance.json")  # what merge writes last
    merged = final.exists() and all(s["state"] == "finished" for s in shards) and (
        not records or final.stat().st_mtime >= max(
            (p.stat().st_mtime for p in (out / "shards").glob("shard-*.json")), default=0))
    return {"out": str(out), "command": command, "shards": shards, "merged": merged,
            "slurm_job": ", ".join(str(j["job_id"]) for j in submit["jobs"]) if submit else None}


def _whole_job(out: Path, command: str) -> dict:
    """A job run whole (no ``--shard``): finished once it wrote its final tables (a store: once it
    has a keymap), else unfinished (running, or stopped: the same command resumes it)."""
    from kneebatch.ingest.store import CohortStore
    from kneebatch.jobs.parts import Parts
    from kneebatch.measure import measurement_schema
    from kneebatch.outputs import FAILURE_SCHEMA, read_table

    whole = {"shard": "whole"}
    if command == "convert":
        store = CohortStore(out, create=False)
        finished = store.keymap_path.exists()
        stored = len(store.study_keys())
        whole.update(studies=stored, saved=stored,
                     failed=read_table(store.failures_path, FAILURE_SCHEMA).num_rows)
    else:
        finished = (out / "provenance.json").exists()
        if finished:
            prov = json.loads((out / "provenance.json").read_text())
            whole.update(studies=prov["studies"], saved=prov["rows"], failed=prov["failed"] + prov["carried_failures"],
                         studies_per_s=prov.get("studies_per_s"), updated_utc=prov.get("created_utc"))
        else:
            whole.update(saved=len(Parts(out, measurement_schema()).done_keys()),
                         **_progress_of(progress_records(out).get(0)))
    whole["state"] = "finished" if finished else "unfinished"
    return {"out": str(out), "command": command, "shards": [whole], "merged": finished, "slurm_job": None}


def _progress_of(record: dict | None) -> dict:
    """The columns a running shard's progress record fills."""
    if record is None:
        return {}
    return {k: record[k] for k in ("studies", "saved", "failed", "studies_per_s", "updated_utc")}


def print_status(status: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kneebatch {status['command']}: {status['out']}"
                  + (f" (SLURM job {status['slurm_job']})" if status["slurm_job"] else ""))
    for col in ("shard", "state", "studies", "saved", "failed", "studies/s", "last saved (UTC)"):
        table.add_column(col, justify="right" if col not in ("shard", "state") else "left")
    for s in status["shards"]:
        table.add_row(s["shard"], s["state"], *(str(s.get(k, "")) for k in ("studies", "saved", "failed")),
                      f"{s['studies_per_s']:.2f}" if "studies_per_s" in s else "",
                      s.get("updated_utc", "")[11:19])
    console = Console()
    console.print(table)
    states = [s["state"] for s in status["shards"]]
    if states == ["unfinished"]:
        console.print("a job run whole (no shards), not finished: running, or stopped (rerun the same command to "
                      "resume)")
    elif status["merged"] and status["shards"][0]["shard"] == "whole":
        console.print("finished: the final tables are written")
    elif status["merged"]:
        console.print("merged: the final tables are up to date")
    elif all(s == "finished" for s in states):
        console.print(f"every shard has finished: kneebatch merge {status['out']}")
    elif any(s in ("failed", "missing") for s in states):
        console.print("some shards failed or never ran: resubmit them (they resume), then merge")


def resubmit(out) -> dict:
    """Submit again the shards that have no record and are not queued or running."""
    out = Path(out)
    record = submission(out)
    if record is None:
        raise ValueError(f"{out} has no SLURM submission (slurm/submit.json)")
    status = job_status(out)
    if any(s["state"] == "unknown" for s in status["shards"]):
        raise ValueError("SLURM cannot be asked which shards are still queued (squeue failed); try again")
    again = [int(s["shard"].split("/")[0]) for s in status["shards"] if s["state"] in ("failed", "missing")]
    if again:
        job_id = sbatch(Path(record["script"]), "--array=" + ",".join(map(str, again)))
        record["jobs"].append({"job_id": job_id, "tasks": again, "submitted_utc": now_utc()})
        write_text_atomic(out / SLURM_DIR / "submit.json", json.dumps(record, indent=1))
    return {**record, "resubmitted": again}
