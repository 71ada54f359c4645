"""``kneebatch submit … --slurm``: a job as a SLURM array, one task per shard.

The sbatch script (``OUT/slurm/array.sbatch``) runs the same command with
``--shard $SLURM_ARRAY_TASK_ID/N``, with the interpreter that submitted it (a cluster's
shared file system), after the user's ``--setup`` lines (``module load …``, a venv).
``OUT/slurm/submit.json`` records the submissions; ``kneebatch status`` reads it, and
``--resubmit OUT`` sends only the shards that neither finished nor are queued (a
resubmitted shard resumes from its saved parts). ``--wait`` polls the queue and merges.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from kneebatch.distributed.cluster import Resources
from kneebatch.jobs.job import progress_records, shard_records
from kneebatch.jobs.shards import Shard
from kneebatch.outputs import write_text_atomic

SLURM_DIR = "slurm"


def array_script(argv: list[str], shards: int, out: Path, resources: Resources) -> str:
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "kneebatch", *argv])
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=kneebatch-{argv[0]}",
        f"#SBATCH --array=0-{shards - 1}",
        f"#SBATCH --output={out.resolve() / SLURM_DIR}/%A_%a.log",
        f"#SBATCH --chdir={Path.cwd()}",
        *resources.directives(),
        "set -euo pipefail",
        resources.setup,
        f'exec {command} --quiet --shard "${{SLURM_ARRAY_TASK_ID}}/{shards}"',
        "",
    ])


def submit(argv: list[str], out, shards: int, resources: Resources) -> dict:
    """Write the array script into ``OUT/slurm`` and submit all ``shards`` tasks."""
    _need("sbatch")
    out = Path(out)
    folder = out / SLURM_DIR
    if (folder / "submit.json").exists():
        raise ValueError(f"{out} already has a SLURM submission; resubmit its unfinished shards with "
                         f"'kneebatch submit --resubmit {out}', or choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "array.sbatch"
    write_text_atomic(script, array_script(argv, shards, out, resources))
    job_id = sbatch(script)
    record = {"command": argv, "shards": shards, "script": str(script.resolve()),
              "jobs": [{"job_id": job_id, "tasks": list(range(shards)), "submitted_utc": now_utc()}]}
    write_text_atomic(folder / "submit.json", json.dumps(record, indent=1))
    return record


def submit_job(command: str, job_argv: list[str], out, store, shards: int = 4, resources: Resources | None = None,
               src=None, key_file=None, force: bool = False) -> dict:
    """``kneebatch submit``: a convert, run or measure as an array of ``shards`` tasks. What every
    task would find out too late is checked once here (``--force`` would remove the other shards'
    work; a run's or measure's store must exist), and what the tasks would race on is made once
    (a convert's store and the study-key secret it records)."""
    from kneebatch.ingest.store import CohortStore
    from kneebatch.jobs.convert import prepare_store

    if force:
        raise ValueError("--force starts OUT clean, which would remove the other shards' work; give a new OUT")
    if command == "convert":
        prepare_store(src, store, key_file)
    else:
        CohortStore(store, create=False)
    return submit([command, *job_argv], out, shards, resources)


def submission(out) -> dict | None:
    path = Path(out) / SLURM_DIR / "submit.json"
    return json.loads(path.read_text()) if path.exists() else None


def queued_tasks(record: dict) -> dict[int, str] | None:
    """Shard index -> SLURM state of the submission's tasks still queued or running (the newest
    submission of a shard counts); None when ``squeue`` cannot be asked."""
    if shutil.which("squeue") is None:
        return None
    ids = ",".join(str(j["job_id"]) for j in record["jobs"])
    done = subprocess.run(["squeue", "-h", "-r", "-j", ids, "-o", "%F %K %T"], capture_output=True, text=True)
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:  # every job has ended and SLURM has forgotten them
            return {}
        return None
    states = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            states[int(parts[1])] = parts[2]
    return states


def wait(out, poll_s: float = 2.0, show=None) -> None:
    """Until none of the submission's tasks is queued or running, with a live line of where the
    shards stand (``show(line)``; default: stderr, rewritten in place on a terminal, a new line
    only when it changes elsewhere)."""
    record = submission(out)
    show = show or _status_line()
    last = None
    while True:
        queue = queued_tasks(record)
        line = progress_line(out, record["shards"], queue)
        if line != last:
            show(line)
            last = line
        if queue is not None and not queue:
            return
        time.sleep(poll_s)


def progress_line(out, shards: int, queue: dict | None) -> str:
    """``3/8 shards finished (1,204 studies, 2.10 studies/s), 4 running, 1 pending``."""
    records = [r["report"] for r in shard_records(out)]
    finished = {Shard.parse(r["shard"]).index for r in records}
    running = [p for i, p in progress_records(out).items() if i not in finished]
    states = list((queue or {}).values())
    # finished shards' studies and the running ones' so far; the rate of those still running now
    studies = sum(r.get("saved", 0) + r.get("already_done", 0) for r in records) + sum(p["saved"] for p in running)
    rate = sum(p["studies_per_s"] for p in running) if running else sum(r.get("studies_per_s", 0.0) for r in records)
    queued = "SLURM's queue cannot be asked" if queue is None else \
        f"{states.count('RUNNING')} running, {len(states) - states.count('RUNNING')} pending"
    return f"{len(records)}/{shards} shards finished ({studies:,} studies, {rate:.2f} studies/s), {queued}"


def _status_line():
    tty = sys.stderr.isatty()

    def show(line: str) -> None:
        print(("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    return show


def sbatch(script: Path, *options: str) -> str:
    done = subprocess.run(["sbatch", "--parsable", *options, str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"sbatch refused the job: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def _need(exe: str) -> None:
    if shutil.which(exe) is None:
        raise FileNotFoundError(f"{exe} not found: submit from a SLURM login node (or start cluster/local-slurm.sh "
                                "and export SLURM_CONF)")


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
