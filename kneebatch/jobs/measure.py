"""``kneebatch measure``: measurements for every study of a cohort store.

Label maps come from the store (the newest segmentation, or the one of a given model,
or a named set such as ``truth``) or from a folder of NIfTI/MetaImage files named by
study key (as ``kneebatch export`` writes them) or StudyInstanceUID / case name, on
any grid that covers the study (see :mod:`kneebatch.ingest.label_import`). Every study of the store ends in
exactly one of ``measurements.parquet`` and ``failures.parquet``; convert failures
are carried over.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kneebatch import labels as L
from kneebatch.errors import StudyError, failure_row
from kneebatch.ingest.label_import import label_file, read_label_file, study_names
from kneebatch.ingest.nifti import volume_stem
from kneebatch.ingest.store import CohortStore
from kneebatch.ingest.visits import study_context
from kneebatch.jobs.job import Job, JobReport
from kneebatch.jobs.shards import Shard
from kneebatch.measure import measure_study, measurement_schema

BATCH = 8  # studies per task and per part file


def _confidence_vector(by_tissue: dict | None):
    """The engines' confidence a label map carries (run wrote it), as the per-label vector
    :func:`kneebatch.measure.measure_study` takes; None for maps without one."""
    if not by_tissue:
        return None
    vector = np.full(L.N_CLASSES, np.nan)
    for name, value in by_tissue.items():
        if value is not None:
            vector[L.by_name(name).id] = value
    return vector


def measure_one(job, store_path: str, label_map: dict | None = None) -> dict:
    """Measure one study; never raises. Returns ``{"row": ...}`` or ``{"failure": ...}``."""
    key, label_path, label_name = job
    store = CohortStore(store_path, create=False)
    try:
        image, grid = store.read_image(key)
        made = {}
        if label_path is not None:
            labels, how = read_label_file(label_path, grid, label_map)
            source = "file"
        else:
            labels, how = store.read_schema_labels(key, label_name), "same_grid"
            made = store.label_attrs(key, label_name)
            source = "store"
        row = measure_study(key, labels.astype("uint8"), image, grid, store.channels(key), source,
                            covered=made.get("covered"), confidence=_confidence_vector(made.get("confidence")),
                            confidence_reference=made.get("confidence_reference"), **study_context(store, key))
        row.update(model_hash=made.get("model_hash"), engine_set=made.get("engine_set"), label_name=label_name,
                   label_grid=how)
        return {"row": row}
    except Exception as e:  # one bad study never stops a run
        return {"failure": failure_row(key, "measure", e)}


def measure_batch(jobs, store_path: str, label_map: dict | None = None) -> dict:
    results = [measure_one(job, store_path, label_map) for job in jobs]
    return {"keys": [job[0] for job in jobs], "rows": [r["row"] for r in results if "row" in r],
            "failures": [r["failure"] for r in results if "failure" in r]}


def measure_store(store_path, out, labels_dir=None, client=None, show_progress=None, label_map=None,
                  model: str | None = None, label_name: str | None = None, shard: Shard | None = None,
                  force: bool = False, per_study: dict | None = None) -> JobReport:
    """Measure every study of the store (of ``shard``): its label maps in the store (the newest
    segmentation, or the one of ``model``, or the set ``label_name``, or ``per_study``'s name for
    each study: the maps a run wrote, :func:`kneebatch.outputs.label_maps_of`) or the files in
    ``labels_dir``. A re-run into the same ``out`` resumes; other settings are refused."""
    store = CohortStore(store_path, create=False)
    if labels_dir is not None and not Path(labels_dir).is_dir():
        raise FileNotFoundError(f"labels folder {labels_dir} does not exist")
    if labels_dir is None:
        store.require_labels(label_name, model)
    settings = {"labels": str(Path(labels_dir).resolve()) if labels_dir is not None else None,
                "label_map": {str(k): v for k, v in (label_map or {}).items()}, "model": model,
                "label_name": label_name, "per_study": per_study}
    job = Job("measure", store, out, settings, measurement_schema(), shard, force)
    jobs, failures = [], []
    names = study_names(store) if labels_dir is not None else {}
    for k in job.todo:
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
        name = per_study.get(k) if per_study is not None else label_name or store.segmentation(k, model)
        if name is None or name not in store.label_names(k):
            failures.append(failure_row(k, "measure", StudyError("no_labels", "not segmented by that run" if per_study
                                                                 is not None else "run segmentation first, or pass "
                                                                                  "--labels")))
        else:
            jobs.append((k, None, name))
    if failures:
        job.save([f["study_key"] for f in failures], [], failures)
    batches = [jobs[i:i + BATCH] for i in range(0, len(jobs), BATCH)]
    job.map(measure_batch, batches, client, "measure", "measuring studies", show_progress,
            store_path=str(store.path), label_map=label_map)
    return job.finish({"command": "measure", "label_source": "file" if labels_dir is not None else "store",
                       **settings})
