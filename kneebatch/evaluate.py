"""``kneebatch evaluate PRED TRUTH OUT``: label maps scored against reference ones, per study and tissue.

``PRED`` is a folder of label files (NIfTI / MetaImage: ``kneebatch export``'s
``<name>_labels.nii.gz``, nnU-Net's ``<case>.nii.gz``, anyone's) or a ``run`` / ``measure``
output folder (its label maps are read from the store it used). ``TRUTH`` is a folder of
reference label files, found by the same names (study key, StudyInstanceUID or case name,
with or without ``_labels``). A reference on another grid is mapped onto the prediction's
(exactly when only the voxel order differs, else nearest neighbour); ids of another schema
are translated with ``--label-map`` / ``--truth-label-map`` (``ID:LABEL,...``).

Per study and tissue: Dice, the 95th-percentile Hausdorff distance in mm (symmetric, over
surface voxels, as MONAI's ``compute_hausdorff_distance(percentile=95)``), both volumes in mm3
and the volume error in %. ``OUT/evaluation.parquet`` holds the rows, ``OUT/summary.json`` the
per-tissue summary (mean Dice, median HD95, median absolute volume error).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from kneebatch import labels as L
from kneebatch.ingest.label_import import label_file, labels_onto, read_label_file, study_names, translate
from kneebatch.ingest.nifti import VOLUME_SUFFIXES, read_volume, volume_stem
from kneebatch.ingest.store import CohortStore
from kneebatch.measure import dice
from kneebatch.outputs import MARKER, claim_output_dir, store_of, write_table_atomic, write_text_atomic
from kneebatch.progress import progress_bar

EVALUATION_SCHEMA = pa.schema([
    pa.field("case", pa.string(), nullable=False),  # the study key, or the prediction file's case name
    pa.field("tissue", pa.string(), nullable=False),
    pa.field("dice", pa.float64()),  # null when neither map has the tissue
    pa.field("hd95_mm", pa.float64()),  # null when either map lacks it
    pa.field("volume_pred_mm3", pa.float64()),
    pa.field("volume_truth_mm3", pa.float64()),
    pa.field("volume_error_pct", pa.float64()),  # (pred - truth) / truth; null when the truth lacks it
])


def hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """The 95th-percentile symmetric Hausdorff distance (mm) between two masks' surfaces (a
    surface voxel: in the mask, with a face neighbour outside it); NaN when either is empty."""
    from scipy.ndimage import binary_erosion, distance_transform_edt

    if not pred.any() or not truth.any():
        return math.nan
    # the masks' bounding box, a voxel wider: the surfaces and the distances between them are all inside
    both = np.argwhere(pred | truth)
    lo, hi = np.maximum(both.min(0) - 1, 0), both.max(0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, t = pred[box], truth[box]
    ps, ts = p & ~binary_erosion(p), t & ~binary_erosion(t)
    to_truth = distance_transform_edt(~ts, sampling=spacing)[ps]
    to_pred = distance_transform_edt(~ps, sampling=spacing)[ts]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def score(pred: np.ndarray, truth: np.ndarray, spacing, case: str) -> list[dict]:
    """One row per tissue either map holds."""
    voxel_mm3 = float(np.prod(spacing))
    rows = []
    present = set(np.unique(pred).tolist()) | set(np.unique(truth).tolist())
    for label in L.LABELS:
        if label.id not in present:
            continue
        p, t = pred == label.id, truth == label.id
        vp, vt = float(p.sum()) * voxel_mm3, float(t.sum()) * voxel_mm3
        rows.append({"case": case, "tissue": label.name, "dice": dice(p, t), "hd95_mm": _none(hd95(p, t, spacing)),
                     "volume_pred_mm3": vp, "volume_truth_mm3": vt,
                     "volume_error_pct": 100.0 * (vp - vt) / vt if vt else None})
    return rows


def _none(x: float):
    return None if math.isnan(x) else x


def _pairs_from_files(pred_dir: Path, truth_dir: Path):
    for path in sorted(p for p in pred_dir.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES)):
        stem = volume_stem(path)
        case = stem[: -len("_labels")] if stem.endswith("_labels") else stem
        yield case, path, label_file(truth_dir, [case])


def _job_store(out: Path) -> CohortStore:
    store = store_of(out)
    if store is None:
        raise ValueError(f"{out} holds kneebatch outputs that name no store; give a run or measure folder "
                         "or a folder of label files")
    return CohortStore(store, create=False)


def evaluate(pred, truth_dir, out, label_map: dict | None = None, truth_label_map: dict | None = None,
             show_progress=None) -> dict:
    """Score ``pred`` (a folder of label files, or a run/measure output folder) against the
    reference files in ``truth_dir``; writes ``out/evaluation.parquet`` and ``out/summary.json``
    and returns the summary."""
    pred, truth_dir = Path(pred), Path(truth_dir)
    for folder, what in ((pred, "predictions"), (truth_dir, "reference labels")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    job = (pred / MARKER).exists() and (pred / "measurements.parquet").exists()
    settings = {"pred": str(pred.resolve()), "truth": str(truth_dir.resolve()),
                "label_map": {str(k): v for k, v in (label_map or {}).items()},
                "truth_label_map": {str(k): v for k, v in (truth_label_map or {}).items()}}
    out = claim_output_dir(out, "evaluate", settings, force=True, owned=("evaluation.parquet", "summary.json"))
    rows, without_truth = [], []
    if job:
        import pyarrow.parquet as pq

        store = _job_store(pred)
        names = study_names(store)
        measured = pq.read_table(pred / "measurements.parquet", columns=["study_key", "label_name"]).to_pylist()
        items = [(r["study_key"], r["label_name"]) for r in measured]
    else:
        items = list(_pairs_from_files(pred, truth_dir))
    with progress_bar(len(items), "scoring studies", show_progress) as advance:
        for item in items:
            if job:
                key, label_name = item
                truth_path = label_file(truth_dir, names.get(key, [key]))
                if truth_path is not None:
                    grid = store.grid(key)
                    predicted = translate(store.read_labels(key, label_name), label_map)
                    truth, _ = read_label_file(truth_path, grid, truth_label_map)
                    rows += score(predicted, truth, grid.spacing, key)
                case = key
            else:
                case, pred_path, truth_path = item
                if truth_path is not None:
                    data, grid = read_volume(pred_path)
                    predicted = translate(np.asarray(data), label_map)
                    truth, truth_grid = read_volume(truth_path)
                    truth, _ = labels_onto(translate(np.asarray(truth), truth_label_map), truth_grid, grid)
                    rows += score(predicted, truth, grid.spacing, case)
            if truth_path is None:
                without_truth.append(case)
            advance()
    table = pa.Table.from_pylist(rows, EVALUATION_SCHEMA)
    write_table_atomic(table, out / "evaluation.parquet")
    summary = summarise(rows)
    summary.update(cases=len({r["case"] for r in rows}), without_truth=without_truth)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def summarise(rows: list[dict]) -> dict:
    """Per tissue: cases, mean Dice, median HD95 (mm), median absolute volume error (%)."""
    tissues = {}
    for label in L.LABELS:
        mine = [r for r in rows if r["tissue"] == label.name]
        if not mine:
            continue

        def values(col, mine=mine):
            return [r[col] for r in mine if r[col] is not None]

        tissues[label.name] = {
            "cases": len(mine),
            "mean_dice": float(np.mean(values("dice"))),
            "median_hd95_mm": float(np.median(values("hd95_mm"))) if values("hd95_mm") else None,
            "median_abs_volume_error_pct": float(np.median(np.abs(values("volume_error_pct"))))
            if values("volume_error_pct") else None}
    means = [t["mean_dice"] for t in tissues.values()]
    return {"tissues": tissues, "mean_dice": float(np.mean(means)) if means else None}
