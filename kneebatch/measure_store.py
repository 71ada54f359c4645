"""``kneebatch measure``: measurements for every study of a cohort store.

Label maps come from the store (the newest segmentation, or the one of a given model,
or a named set such as ``truth``) or from a folder of NIfTI/MetaImage files named by
study key (as ``kneebatch export`` writes them) or StudyInstanceUID / case name, on
any grid that covers the study (see :mod:`kneebatch.ingest.label_import`). Every study of the store ends in
exactly one of ``measurements.parquet`` and ``failures.parquet``; convert failures
are carried over.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kneebatch import __version__
from kneebatch.distributed.tasks import map_unordered
from kneebatch.errors import StudyError, failure_row
from kneebatch.ingest.label_import import label_file, read_label_file, study_names
from kneebatch.ingest.nifti import volume_stem
from kneebatch.ingest.store import CohortStore
from kneebatch.measure import measure_study, measurement_schema
from kneebatch.outputs import FAILURE_SCHEMA, claim_output_dir, merge_rows, read_rows, write_rows, write_text_atomic
from kneebatch.progress import progress_bar


@dataclass
class MeasureReport:
    measured: int = 0
    failed: int = 0
    carried_failures: int = 0
    seconds: float = 0.0
    models: list = field(default_factory=list)  # model hashes of the measured segmentations


def measure_one(job, store_path: str, label_map: dict | None = None) -> dict:
    """Measure one study; never raises. Returns ``{"row": ...}`` or ``{"failure": ...}``."""
    key, label_path, label_name = job
    store = CohortStore(store_path, create=False)
    try:
        image, grid = store.read_image(key)
        if label_path is not None:
            labels, how = read_label_file(label_path, grid, label_map)
            source, model_hash = "file", None
        else:
            labels, how = store.read_schema_labels(key, label_name), "same_grid"
            model_hash = store.label_attrs(key, label_name).get("model_hash")
            source = "store"
        row = measure_study(key, labels.astype("uint8"), image, grid, store.channels(key), source,
                            knee_side=store.study_attrs(key).get("knee_side"))
        row.update(model_hash=model_hash, label_name=label_name, label_grid=how)
        return {"row": row}
    except Exception as e:  # one bad study never stops a run
        return {"failure": failure_row(key, "measure", e)}


def measure_store(store_path, out, labels_dir=None, client=None, show_progress=None, label_map=None,
                  model: str | None = None, label_name: str | None = None) -> MeasureReport:
    """Measure every study of the store: its label maps in the store (the newest segmentation,
    or the one of ``model``, or the set ``label_name``) or the files in ``labels_dir``."""
    t0 = time.perf_counter()
    store = CohortStore(store_path, create=False)
    if labels_dir is not None and not Path(labels_dir).is_dir():
        raise FileNotFoundError(f"labels folder {labels_dir} does not exist")
    out = claim_output_dir(out, "measure", {}, owned=("measurements.parquet", "failures.parquet", "provenance.json"))
    keys = store.study_keys()
    jobs, failures = [], []
    names = study_names(store) if labels_dir is not None else {}
    for k in keys:
        if labels_dir is not None:
            path = label_file(labels_dir, names[k])
            if path is None:
                failures.append(failure_row(k, "measure", StudyError(
                    "no_labels", "no <study_key>[_labels] or <StudyInstanceUID> label file for this study in the "
                                 "labels folder")))
            else:
                # which name matched, never the name: a StudyInstanceUID is an identifier
                by = "study_key" if volume_stem(path).startswith(k) else "study_uid"
                jobs.append((k, str(path), f"file named by {by}"))
            continue
        name = label_name or store.segmentation(k, model)
        if name is None or name not in store.label_names(k):
            failures.append(failure_row(k, "measure", StudyError("no_labels", "run segmentation first, or pass --labels")))
        else:
            jobs.append((k, None, name))
    report = MeasureReport()
    rows = []
    with progress_bar(len(jobs), "measuring studies", show_progress) as advance:
        for r in map_unordered(measure_one, jobs, client, store_path=str(store.path), label_map=label_map):
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
    report.models = sorted({r["model_hash"] for r in rows if r["model_hash"]})
    report.seconds = time.perf_counter() - t0
    provenance = {
        "kneebatch_version": __version__,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "measure",
        "label_source": "file" if labels_dir is not None else "store",
        "label_map": {str(k): v for k, v in (label_map or {}).items()},
        "models": report.models,
        "studies_in_store": len(keys),
        "measured": report.measured,
        "failed": report.failed + report.carried_failures,
        "python": platform.python_version(),
    }
    write_text_atomic(out / "provenance.json", json.dumps(provenance, indent=2))
    return report
