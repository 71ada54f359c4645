"""One skeleton for the batch jobs over a store (``run``, ``measure``).

A job claims its output folder, finds what is left to do (its shard's studies without a
saved row), maps batches over a Dask client (or in-process), saves each finished batch
as part files at once, and at the end gathers the parts into the final tables with the
convert failures carried over, plus a provenance manifest. A job run as one shard of N
(``--shard i/N``) writes its parts and a shard record instead; ``kneebatch merge OUT``
gathers once every shard has finished. Per-study work stays with the command; the
skeleton never looks inside a row.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kneebatch import __version__
from kneebatch.distributed.tasks import died_message, map_unordered, retry_alone
from kneebatch.errors import StudyError, failure_row
from kneebatch.jobs.parts import Parts, concat
from kneebatch.jobs.shards import Shard
from kneebatch.outputs import FAILURE_SCHEMA, claim_output_dir, sha256_file, write_table_atomic, write_text_atomic
from kneebatch.progress import progress_bar

FINAL = ("measurements.parquet", "failures.parquet", "provenance.json")
SHARDED = ("run", "measure")  # the jobs with an OUT of their own (convert's is the store)
OWNED = ("parts/part-*.arrow", "parts/part-*.parquet", "shards/shard-*.json", "progress/shard-*.json", *FINAL)
PROGRESS = "progress"  # OUT/progress/<shard>.json: how far a running shard (or whole job) has come


@dataclass
class JobReport:
    command: str
    shard: str = "0/1"
    studies: int = 0  # of the store (of the shard)
    saved: int = 0  # studies with a row saved by this run
    failed: int = 0  # studies without a row at the end (this shard's, or all when gathered)
    already_done: int = 0
    carried_failures: int = 0  # convert failures carried into failures.parquet
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)  # reason -> studies that failed with it in this run
    models: list = field(default_factory=list)  # model hashes of the gathered rows

    @property
    def segmented(self) -> int:  # run's word for a saved row
        return self.saved

    @property
    def measured(self) -> int:  # measure's
        return self.saved

    @property
    def studies_per_s(self) -> float:
        return self.saved / self.seconds if self.seconds else 0.0


class Job:
    def __init__(self, command: str, store, out, settings: dict, schema: pa.Schema, shard: Shard | None = None,
                 force: bool = False):
        self.t0 = time.perf_counter()
        self.shard = shard or Shard()
        if force and not self.shard.whole:
            raise ValueError("--force starts the folder clean, which would remove the other shards' work; "
                             "give a new folder instead")
        self.store = store
        self.out = claim_output_dir(out, command, {**settings, "store": str(Path(store.path).resolve())}, force,
                                    owned=OWNED)
        self.parts = Parts(self.out, schema)
        self.keys = self.shard.select(store.study_keys())
        done = self.parts.done_keys()
        self.todo = [k for k in self.keys if k not in done]
        self.report = JobReport(command, str(self.shard), studies=len(self.keys),
                                already_done=len(self.keys) - len(self.todo))

    def save(self, keys, rows: list[dict], failures: list[dict], seconds: dict | None = None) -> None:
        self.parts.save(keys, rows, failures)
        self.report.saved += len(rows)
        for f in failures:
            self.report.reasons[f["reason"]] = self.report.reasons.get(f["reason"], 0) + 1
        for k, v in (seconds or {}).items():
            self.report.stage_seconds[k] = self.report.stage_seconds.get(k, 0.0) + v
        self.report.seconds = time.perf_counter() - self.t0
        write_progress(self.out, self.shard, self.report)

    def map(self, batch_fn, batches: list, client, stage: str, label: str, show_progress=None, **kwargs) -> None:
        """Run ``batch_fn`` over the batches (:func:`map_batches`), every result saved as it comes."""
        map_batches(batch_fn, batches, client, stage, label,
                    lambda r: self.save(r["keys"], r["rows"], r["failures"], r.get("seconds")), show_progress, **kwargs)

    def finish(self, provenance: dict) -> JobReport:
        """Gather (a whole job) or record this shard (one of N: ``merge`` gathers)."""
        self.report.seconds = time.perf_counter() - self.t0
        (self.out / PROGRESS / f"{self.shard.name}.json").unlink(missing_ok=True)  # the record says it all now
        try:
            (self.out / PROGRESS).rmdir()  # only when no other shard's record is left in it
        except OSError:
            pass
        if self.shard.whole:
            timing = {"seconds": round(self.report.seconds, 1), "studies_per_s": round(self.report.studies_per_s, 3)}
            gathered = gather(self.out, self.parts, self.store, {**provenance, **timing})
            self.report.failed, self.report.carried_failures = gathered["failed"], gathered["carried_failures"]
            self.report.models = gathered["models"]
        else:
            # every study left to do was tried in this run (failed ones too): its failures are this run's
            self.report.failed = sum(self.report.reasons.values())
            write_shard_record(self.out, self.shard, {**asdict(self.report), "studies_per_s": self.report.studies_per_s},
                               provenance)
        return self.report


def map_batches(batch_fn, batches: list, client, stage: str, label: str, save, show_progress=None, **kwargs) -> None:
    """Run ``batch_fn(batch, **kwargs) -> {"keys", "rows", "failures", "seconds"}`` over the
    batches (on ``client``'s workers, or here), handing every result to ``save`` as it comes. A
    batch that killed its worker is split, and a study that kills its worker even alone becomes a
    ``worker_died`` failure row of ``stage``: every job's one rule for a lost worker."""
    def split_or_record(batch, exc):
        if len(batch) > 1:
            return None, [[item] for item in batch]
        return retry_alone(batch, exc, lambda batch, exc: {
            "keys": [study_key_of(batch[0])], "rows": [], "seconds": {},
            "failures": [failure_row(study_key_of(batch[0]), stage, StudyError("worker_died", died_message(exc)))]})

    with progress_bar(sum(len(b) for b in batches), label, show_progress) as advance:
        for result in map_unordered(batch_fn, batches, client, on_error=split_or_record, **kwargs):
            save(result)
            advance(len(result["keys"]))


SHARDS = "shards"  # OUT/shards (a store's STORE/shards): one record per finished shard


def write_shard_record(out, shard: Shard, report: dict, provenance: dict | None = None) -> None:
    """``OUT/shards/<shard>.json``: a shard has finished (``merge`` waits for all N), with its report."""
    record = {"report": {**report, "shard": str(shard)}, "finished_utc": _now(), "provenance": provenance or {}}
    (Path(out) / SHARDS).mkdir(exist_ok=True)
    write_text_atomic(Path(out) / SHARDS / f"{shard.name}.json", json.dumps(record, indent=1))


def write_progress(out, shard: Shard, report: JobReport) -> None:
    """``OUT/progress/<shard>.json``, rewritten as each batch is saved: ``status`` and ``submit
    --wait`` show how far a running shard has come (studies saved, failed, studies/s)."""
    record = {"shard": str(shard), "studies": report.studies, "saved": report.saved + report.already_done,
              "failed": sum(report.reasons.values()), "seconds": round(report.seconds, 1),
              "studies_per_s": report.studies_per_s, "updated_utc": _now()}
    (Path(out) / PROGRESS).mkdir(exist_ok=True)
    write_text_atomic(Path(out) / PROGRESS / f"{shard.name}.json", json.dumps(record))


def progress_records(out) -> dict[int, dict]:
    """Shard index -> the progress record of each shard (or whole job: index 0) still running."""
    found = {}
    for p in sorted((Path(out) / PROGRESS).glob("shard-*.json")):
        try:
            record = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):  # being replaced this instant
            continue
        found[Shard.parse(record["shard"]).index] = record
    return found


def study_key_of(item) -> str:
    """A batch item is a study key or a tuple that starts with one."""
    return item if isinstance(item, str) else item[0]


def gather(out: Path, parts: Parts, store, provenance: dict) -> dict:
    """The final tables: every study of the store in exactly one of measurements.parquet and
    failures.parquet (convert failures carried over), and provenance.json naming them."""
    rows, failures = parts.gather()
    keys = pa.array(store.study_keys(), pa.string())
    carried = pq.read_table(store.failures_path, schema=FAILURE_SCHEMA) if Path(store.failures_path).exists() \
        else FAILURE_SCHEMA.empty_table()
    carried = carried.filter(pc.invert(pc.is_in(carried["study_key"], value_set=keys)))
    rows = rows.filter(pc.is_in(rows["study_key"], value_set=keys))  # a study removed from the store since
    failures = failures.filter(pc.is_in(failures["study_key"], value_set=keys))
    write_table_atomic(rows, out / "measurements.parquet")
    write_table_atomic(concat([carried, failures], FAILURE_SCHEMA).sort_by("study_key"), out / "failures.parquet")
    models = rows["model_hash"].unique().drop_null().to_pylist() if "model_hash" in rows.column_names else []
    summary = {"studies": len(keys), "rows": rows.num_rows, "failed": failures.num_rows,
               "carried_failures": carried.num_rows, "models": sorted(models)}
    if "engine_set" in rows.column_names:  # the sets studies got (engine_sets lists every set offered)
        summary["studies_per_engine_set"] = {r["values"]: r["counts"]
                                             for r in pc.value_counts(rows["engine_set"].drop_null()).to_pylist()}
    write_text_atomic(out / "provenance.json", json.dumps({
        "kneebatch_version": __version__,
        "created_utc": _now(),
        **provenance,
        **summary,
        "python": platform.python_version(),
        # the manifest: what a complete job wrote; a table not listed here is not final
        "outputs": {name: {"rows": pq.ParquetFile(out / name).metadata.num_rows, "sha256": sha256_file(out / name)}
                    for name in ("measurements.parquet", "failures.parquet")},
        "parts": len(parts.row_files()),
    }, indent=1))
    return summary


def shard_records(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / SHARDS).glob("shard-*.json"))]


def all_shards(out) -> tuple[list[dict], int]:
    """The shard records in ``out/shards`` and N, once all N shards have finished; otherwise a
    ValueError that names the missing ones."""
    records = shard_records(out)
    if not records:
        raise ValueError(f"{out} has no finished shards (shards/*.json); a job run without --shard gathers itself")
    counts = {Shard.parse(r["report"]["shard"]).count for r in records}
    if len(counts) != 1:
        raise ValueError(f"{out} holds shards of different counts {sorted(counts)}; one job, one N")
    n = counts.pop()
    missing = sorted(set(range(n)) - {Shard.parse(r["report"]["shard"]).index for r in records})
    if missing:
        raise ValueError(f"shards {', '.join(f'{i}/{n}' for i in missing)} have not finished; run or resubmit them, "
                         "then merge again")
    return records, n


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
