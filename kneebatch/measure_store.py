"""``kneebatch measure``: measurements for every study of a cohort store.

Label maps come from the store (``labels`` arrays written by segmentation) or from
a folder of NIfTI files named ``<StudyInstanceUID>.nii[.gz]`` on each study's T1
grid (ground truth, manual segmentations). Every study of the store ends in
exactly one of ``measurements.parquet`` and ``failures.parquet``; convert failures
are carried over.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kneebatch import __version__
from kneebatch.distributed.tasks import map_unordered
from kneebatch.errors import StudyError
from kneebatch.ingest.label_import import label_file, read_label_file
from kneebatch.ingest.store import CohortStore
from kneebatch.measure import measure_study, measurement_schema
from kneebatch.outputs import FAILURE_SCHEMA, merge_rows, read_rows, write_rows
from kneebatch.progress import progress_bar


@dataclass
class MeasureReport:
    measured: int = 0
    failed: int = 0
    carried_failures: int = 0
    seconds: float = 0.0


def measure_one(job, store_path: str) -> dict:
    """Measure one study; never raises. Returns ``{"row": ...}`` or ``{"failure": ...}``."""
    key, label_path = job
    store = CohortStore(store_path, create=False)
    try:
        image, grid = store.read_image(key)
        if label_path is not None:
            labels = read_label_file(label_path, grid)
            source = "nifti"
        else:
            labels = store.read_labels(key)
            if labels is None:
                raise StudyError("no_labels", "run segmentation first, or pass --labels")
            source = "store"
        row = measure_study(key, labels.astype("uint8"), image, grid, store.channels(key), source)
        return {"row": row}
    except StudyError as e:
        return {"failure": {"study_key": key, "stage": "measure", "reason": e.reason, "message": e.message}}
    except Exception as e:  # one bad study never stops a run
        return {"failure": {"study_key": key, "stage": "measure", "reason": "internal_error",
                            "message": f"{type(e).__name__}: {e}"[:500]}}


def measure_store(store_path, out, labels_dir=None, client=None, show_progress=None) -> MeasureReport:
    t0 = time.perf_counter()
    store = CohortStore(store_path, create=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = store.study_keys()
    jobs = []
    missing_label_files = []
    if labels_dir is not None:
        uid_of = {r["study_key"]: r["study_uid"] for r in read_rows(store.keymap_path)}
        for k in keys:
            path = label_file(Path(labels_dir), uid_of.get(k, ""))
            if path is None:
                missing_label_files.append(k)
            else:
                jobs.append((k, str(path)))
    else:
        jobs = [(k, None) for k in keys]

    report = MeasureReport()
    rows, failures = [], []
    failures += [{"study_key": k, "stage": "measure", "reason": "no_labels",
                  "message": "no <StudyInstanceUID>.nii[.gz] for this study in the labels folder"}
                 for k in missing_label_files]
    with progress_bar(len(jobs), "measuring studies", show_progress) as advance:
        for r in map_unordered(measure_one, jobs, client, store_path=str(store.path)):
            if "row" in r:
                rows.append(r["row"])
            else:
                failures.append(r["failure"])
            advance()
    carried = [f for f in read_rows(store.failures_path) if f["study_key"] not in set(keys)]
    report.carried_failures = len(carried)
    rows.sort(key=lambda r: r["study_key"])
    write_rows(rows, measurement_schema(), out / "measurements.parquet")
    write_rows(merge_rows(carried, failures), FAILURE_SCHEMA, out / "failures.parquet")
    report.measured, report.failed = len(rows), len(failures)
    report.seconds = time.perf_counter() - t0
    provenance = {
        "kneebatch_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "measure",
        "label_source": "nifti" if labels_dir is not None else "store",
        "studies_in_store": len(keys),
        "measured": report.measured,
        "failed": report.failed + report.carried_failures,
        "python": platform.python_version(),
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return report
