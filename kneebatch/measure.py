"""Measurements from a label map and its geometry, in explicit units.

Volumes are voxel counts (one ``bincount``) times the voxel volume in mm³; ``_ml``
columns are the same numbers / 1000. Cartilage thickness is measured per plate
from the articular surface to the nearest voxel of the bone the plate sits on
(Euclidean distance between voxel centres, anisotropic spacing), which equals
the slab thickness for voxel-aligned plates; plate voxels farther than 8 mm from
their bone (segmentation strays) are left out.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from kneebatch import __version__
from kneebatch import labels as L
from kneebatch import ops
from kneebatch.geometry import Grid

GROUP_TOTALS = ("bone", "cartilage", "meniscus", "ligament", "muscle")
EXPECTED = ("femur", "tibia", "patella", "femoral_cartilage", "medial_tibial_cartilage",
            "lateral_tibial_cartilage", "patellar_cartilage", "medial_meniscus", "lateral_meniscus")
FOV_CHECKED = ("patella", "femoral_cartilage", "medial_meniscus", "lateral_meniscus")
THICKNESS_PLAUSIBLE_MM = (0.3, 8.0)
FRAGMENT_CHECKED = ("femur", "tibia", "patella")
# crop around a plate for its distances: bone farther than the thickest
# plausible cartilage cannot be the nearest bone of a voxel that counts
THICKNESS_MARGIN_MM = THICKNESS_PLAUSIBLE_MM[1]


def _cartilage_plates():
    return [label for label in L.LABELS if label.group == "cartilage"]


def measurement_schema() -> pa.Schema:
    fields = [pa.field("study_key", pa.string(), nullable=False)]
    for label in L.LABELS:
        fields += [pa.field(f"{label.name}_volume_mm3", pa.float64()), pa.field(f"{label.name}_volume_ml", pa.float64())]
    for group in GROUP_TOTALS:
        fields += [pa.field(f"total_{group}_volume_mm3", pa.float64()), pa.field(f"total_{group}_volume_ml", pa.float64())]
    for plate in _cartilage_plates():
        fields += [pa.field(f"{plate.name}_thickness_mean_mm", pa.float64()),
                   pa.field(f"{plate.name}_thickness_max_mm", pa.float64())]
    for label in L.LABELS:
        fields += [pa.field(f"{label.name}_t1_mean", pa.float64()), pa.field(f"{label.name}_t2_mean", pa.float64())]
    fields += [
        pa.field("voxel_volume_mm3", pa.float64()),
        pa.field("spacing_z_mm", pa.float64()),
        pa.field("spacing_y_mm", pa.float64()),
        pa.field("spacing_x_mm", pa.float64()),
        pa.field("qc_flags", pa.list_(pa.string())),
        pa.field("qc_ok", pa.bool_()),
        pa.field("label_source", pa.string()),
        pa.field("model_hash", pa.string()),  # engines that made the labels (null for imported labels)
        pa.field("kneebatch_version", pa.string()),
    ]
    return pa.schema(fields)


def dice_per_label(pred, truth) -> dict[str, float]:
    """Dice of ``pred`` against ``truth`` for every label present in ``truth`` (NumPy or torch)."""
    out = {}
    for label in L.LABELS:
        p, t = pred == label.id, truth == label.id
        n_truth = int(t.sum())
        if n_truth:
            out[label.name] = 2.0 * int((p & t).sum()) / (int(p.sum()) + n_truth)
    return out


def volumes(labels, grid: Grid, counts=None) -> dict:
    """``<label>_volume_mm3`` / ``_ml`` for every label and group totals (``counts``: reuse ``label_counts``)."""
    counts = ops.label_counts(labels, L.N_CLASSES) if counts is None else counts
    counts = np.asarray(ops.to_numpy(counts)).astype(np.float64)
    vv = grid.voxel_volume_mm3
    out = {}
    for label in L.LABELS:
        mm3 = float(counts[label.id] * vv)
        out[f"{label.name}_volume_mm3"] = mm3
        out[f"{label.name}_volume_ml"] = mm3 / 1000.0
    for group in GROUP_TOTALS:
        mm3 = float(sum(counts[label.id] for label in L.in_group(group)) * vv)
        out[f"total_{group}_volume_mm3"] = mm3
        out[f"total_{group}_volume_ml"] = mm3 / 1000.0
    return out


def cartilage_thickness(labels, grid: Grid, plate: str) -> tuple[float, float]:
    """(mean, max) thickness in mm of one plate; NaN when the plate is absent."""
    xp = ops.namespace(labels)
    label = L.by_name(plate)
    cart = labels == label.id
    margin = tuple(int(math.ceil(THICKNESS_MARGIN_MM / s)) for s in grid.spacing)
    box = ops.bounding_box(cart, margin)
    if box is None:
        return math.nan, math.nan
    sub = labels[box]
    cart = sub == label.id
    bone = sub == L.by_name(label.bone).id
    if not bool(xp.any(bone)):
        return math.nan, math.nan
    articular = ops.surface(cart, exclude=bone)
    # plate voxels farther from their bone than any cartilage is thick are segmentation
    # strays (a few voxels of the wrong plate), not thickness
    for part in (articular, cart):
        if bool(xp.any(part)):
            dist = ops.distances_to(bone, part, grid.spacing)
            samples = dist[dist <= THICKNESS_PLAUSIBLE_MM[1]]
            if samples.size:
                return float(np.mean(samples)), float(np.max(samples))
    return math.nan, math.nan


def intensity_means(labels, image, channels, counts=None) -> dict:
    out = {}
    for c, name in enumerate(channels):
        means = ops.to_numpy(ops.label_means(labels, image[c], L.N_CLASSES, counts))
        for label in L.LABELS:
            out[f"{label.name}_{name.lower()}_mean"] = float(means[label.id])
    return out


def qc_flags(labels, row: dict) -> list[str]:
    flags = []
    for name in EXPECTED:
        if row[f"{name}_volume_mm3"] == 0:
            flags.append(f"missing:{name}")
    for name in FOV_CHECKED:
        mask = labels == L.by_name(name).id
        if row[f"{name}_volume_mm3"] > 0 and ops.touches_border(mask):
            flags.append(f"fov_truncates:{name}")
    for plate in _cartilage_plates():
        mean = row[f"{plate.name}_thickness_mean_mm"]
        lo, hi = THICKNESS_PLAUSIBLE_MM
        if not math.isnan(mean) and not lo <= mean <= hi:
            flags.append(f"thickness_implausible:{plate.name}")
    for name in FRAGMENT_CHECKED:
        if row[f"{name}_volume_mm3"] == 0:
            continue
        mask = labels == L.by_name(name).id
        mask = mask[ops.bounding_box(mask)]  # components only inside its box
        largest = np.count_nonzero(ops.to_numpy(ops.largest_component(mask)))
        if largest < 0.95 * np.count_nonzero(ops.to_numpy(mask)):
            flags.append(f"fragmented:{name}")
    return flags


def measure_study(key: str, labels, image, grid: Grid, channels, label_source: str, extra_flags=()) -> dict:
    """One row of ``measurements.parquet``. ``labels``/``image`` may live on any xp device;
    ``extra_flags``: QC flags known from how the labels were made (segmentation)."""
    if tuple(labels.shape) != grid.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match grid {grid.shape}")
    row = {"study_key": key}
    counts = ops.label_counts(labels, L.N_CLASSES)
    row.update(volumes(labels, grid, counts))
    for plate in _cartilage_plates():
        mean, mx = cartilage_thickness(labels, grid, plate.name)
        row[f"{plate.name}_thickness_mean_mm"] = mean
        row[f"{plate.name}_thickness_max_mm"] = mx
    if image is not None:
        row.update(intensity_means(labels, image, channels, counts))
    row["voxel_volume_mm3"] = grid.voxel_volume_mm3
    row["spacing_z_mm"], row["spacing_y_mm"], row["spacing_x_mm"] = grid.spacing
    flags = [*qc_flags(labels, row), *extra_flags]
    row["qc_flags"] = flags
    row["qc_ok"] = not flags
    row["label_source"] = label_source
    row["model_hash"] = None
    row["kneebatch_version"] = __version__
    return row
