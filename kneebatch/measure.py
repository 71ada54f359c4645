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

from kneebatch import __version__, ops
from kneebatch import labels as L
from kneebatch.cartilage_regions import REGION_DOC, REGIONS, STAT_DOC, empty_values, regional_cartilage
from kneebatch.geometry import Grid
from kneebatch.ingest.roles import ROLES
from kneebatch.ingest.visits import NO_VISIT
from kneebatch.plausibility import NORMALISER, implausible, thickness_outlier, uncertain
from kneebatch.sides import fibula_direction

GROUP_TOTALS = ("bone", "cartilage", "meniscus", "ligament", "muscle")
EXPECTED = ("femur", "tibia", "patella", "femoral_cartilage", "medial_tibial_cartilage",
            "lateral_tibial_cartilage", "patellar_cartilage", "medial_meniscus", "lateral_meniscus")
FOV_CHECKED = ("patella", "femoral_cartilage", "medial_meniscus", "lateral_meniscus")
THICKNESS_PLAUSIBLE_MM = (0.3, 8.0)
THICKNESS_HIGH_PERCENTILE = 95  # the "thick end" of a plate: robust, unlike the maximum
# the share of a tissue its largest piece must hold. Bones, and the tissues whose truth is one
# piece in every synthetic knee of the varied range (benchmarks/plausibility_reference.py: the
# smallest share over 80 knees: 0.911 for the patellar cartilage, >= 0.995 for the others; 0.891 and
# >= 0.997 over 40 knees of another seed); not the menisci, MCL, ACL or effusion, whose horns,
# fibres or pockets come apart at 3-4 mm slices in true knees too (shares down to 0.14-0.69)
FRAGMENT_LIMITS = {"femur": 0.95, "tibia": 0.95, "patella": 0.95, "pcl": 0.9, "patellar_tendon": 0.9,
                   "medial_tibial_cartilage": 0.9, "lateral_tibial_cartilage": 0.9, "patellar_cartilage": 0.8}
FRAGMENT_CHECKED = tuple(FRAGMENT_LIMITS)
# crop around a plate for its distances: bone farther than the thickest
# plausible cartilage cannot be the nearest bone of a voxel that counts
THICKNESS_MARGIN_MM = THICKNESS_PLAUSIBLE_MM[1]


def _field(name: str, type_, unit: str, doc: str, nullable: bool = True) -> pa.Field:
    """A column with its unit and meaning in the schema itself (Parquet keeps them; docs/columns.md
    is made from them)."""
    return pa.field(name, type_, nullable=nullable, metadata={"unit": unit, "doc": doc})


def measurement_schema() -> pa.Schema:
    f64 = pa.float64()
    fields = [_field("study_key", pa.string(), "", "pseudonymous study key (keyed hash of the StudyInstanceUID)",
                     nullable=False),
              _field("subject_key", pa.string(), "", "pseudonymous subject key (keyed hash of the PatientID); "
                     "null without one"),
              _field("visit_days", pa.int64(), "days", "days since the subject's first study in the store "
                     "(from StudyDate; no absolute date leaves the store's keymap); null without one")]
    for label in L.LABELS:
        fields += [_field(f"{label.name}_volume_mm3", f64, "mm3", f"{label.name}: voxel count x voxel volume"),
                   _field(f"{label.name}_volume_ml", f64, "mL", f"{label.name}: volume in millilitres (mm3 / 1000)")]
    for group in GROUP_TOTALS:
        fields += [_field(f"total_{group}_volume_mm3", f64, "mm3", f"all {group} labels together"),
                   _field(f"total_{group}_volume_ml", f64, "mL", f"all {group} labels together")]
    for plate in L.in_group("cartilage"):
        fields += [_field(f"{plate.name}_thickness_mean_mm", f64, "mm",
                          f"{plate.name}: mean distance from its articular-surface voxels to its bone; NaN if absent"),
                   _field(f"{plate.name}_thickness_p95_mm", f64, "mm",
                          f"{plate.name}: 95th percentile of those distances; NaN if absent")]
    for region in REGIONS:
        fields += [_field(f"{region}_{stat}", f64, unit, f"{region} ({REGION_DOC[region]}, Wirth & Eckstein 2008): {doc}")
                   for stat, (unit, doc) in STAT_DOC.items()]
    for label in L.LABELS:
        fields += [_field(f"{label.name}_{role.lower()}_mean", f64, "scanner units",
                          f"{label.name}: mean intensity in the {role} channel; NaN without one") for role in ROLES]
    fields += [_field(f"{label.name}_confidence", f64, "probability",
                      f"{label.name}: the engines' mean probability of it over the voxels they labelled it "
                      "(kneebatch.inference.segment.confidence); null for imported labels and other tools' models")
               for label in L.LABELS if label.id != L.BACKGROUND]
    text = pa.string()
    fields += [
        _field("voxel_volume_mm3", f64, "mm3", "voxel volume of the label map (the store's grid)"),
        _field("spacing_z_mm", f64, "mm", "voxel spacing along z (patient right)"),
        _field("spacing_y_mm", f64, "mm", "voxel spacing along y (inferior)"),
        _field("spacing_x_mm", f64, "mm", "voxel spacing along x (posterior)"),
        _field("qc_flags", pa.list_(text), "", "missing:<label>, fov_truncates:<label>, "
               "thickness_implausible:<plate>, fragmented:<tissue> (its largest piece too small a share), "
               "implausible:<tissue or medial/lateral pair> "
               "(size against the patella, kneebatch.plausibility), uncertain:<tissue> (the engines' confidence far "
               "below that on their held-out studies), sides_unresolved, subregions_undetermined (cartilage "
               "too scattered for the OA subregion rules: their columns are NaN)"),
        _field("qc_ok", pa.bool_(), "", "no QC flags"),
        _field("knee_side", text, "", "left / right, from the DICOM headers or the fibula"),
        _field("knee_side_source", text, "", "dicom, anatomy or null (undetermined)"),
        _field("label_source", text, "", "segmentation (run), store (measure) or file (measure --labels)"),
        _field("label_name", text, "", "the label map's name in the store, or which name a --labels file matched"),
        _field("label_grid", text, "", "same_grid, reoriented (exact) or resampled (nearest neighbour)"),
        _field("model_hash", text, "", "coarse+fine engine hashes and the engines' config hash that made the labels "
                                        "(null for imported labels)"),
        _field("engine_set", text, "", "the engine set that segmented the study, e.g. t1-t2, dess-pdfs (null for imported "
               "labels); model_hash names its files"),
        _field("channels_used", text, "", "the series (contrast roles) the engines segmented, e.g. T1+T2FS"),
        _field("kneebatch_version", text, "", "the version that measured"),
    ]
    return pa.schema(fields)


def columns_markdown(schema: pa.Schema | None = None) -> str:
    """Every column of measurements.parquet with its type, unit and meaning, from the schema."""
    schema = schema or measurement_schema()
    lines = ["# measurements.parquet: every column", "",
             "Made from the schema (`kneebatch columns --markdown > docs/columns.md`); the Parquet files carry the "
             "same unit and meaning in each field's metadata. What the measurements are: "
             "[outputs.md](outputs.md).", "",
             "| column | type | unit | meaning |", "| --- | --- | --- | --- |"]
    for f in schema:
        meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items()}
        lines.append(f"| `{f.name}` | {f.type} | {meta.get('unit', '')} | {meta.get('doc', '')} |")
    return "\n".join(lines) + "\n"


def dice(pred, truth) -> float:
    """Dice of two boolean masks (NumPy or torch): 2|P and T| / (|P| + |T|); 0 when both are empty
    (callers score only labels the truth holds). kneebatch's one Dice: validation, test and the
    accuracy benchmarks all use it."""
    return 2.0 * int((pred & truth).sum()) / max(int(pred.sum()) + int(truth.sum()), 1)


def dice_per_label(pred, truth) -> dict[str, float]:
    """Dice of ``pred`` against ``truth`` for every label present in ``truth`` (NumPy or torch)."""
    return {label.name: dice(pred == label.id, truth == label.id) for label in L.LABELS
            if bool((truth == label.id).any())}


def volumes(labels, grid: Grid, counts=None) -> dict:
    """``<label>_volume_mm3`` / ``_ml`` for every label and group totals (``counts``: host voxel
    counts per label id, else counted here)."""
    counts = ops.to_host(ops.label_counts(labels, L.N_CLASSES)) if counts is None else counts
    counts = np.asarray(counts).astype(np.float64)
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


def _thickness(labels, grid: Grid, plate: str):
    """``[mean, p95]`` thickness (mm, float64, on ``labels``' device) of one plate; NaN when absent.

    Not the maximum: where a plate curves away from the slice plane (thick 2-D slices) or
    meets the bone at a margin, a few surface voxels see their bone across a whole slice
    or along the plate, and the maximum measured 2-2.5 times the true thickness."""
    xp = ops.namespace(labels)
    missing = xp.full((2,), float("nan"), dtype=xp.float64, device=ops.device_of(labels))
    label = L.by_name(plate)
    margin = tuple(int(math.ceil(THICKNESS_MARGIN_MM / s)) for s in grid.spacing)
    box = ops.bounding_box(labels == label.id, margin)
    if box is None:
        return missing
    sub = labels[box]
    cart = sub == label.id
    bone = sub == L.by_name(label.bone).id
    if not bool(xp.any(bone)):
        return missing
    articular = ops.surface(cart, exclude=bone)
    # plate voxels farther from their bone than any cartilage is thick are segmentation
    # strays (a few voxels of the wrong plate), not thickness
    for part in (articular, cart):
        if bool(xp.any(part)):
            dist = ops.distances_to(bone, part, grid.spacing)
            samples = dist[dist <= THICKNESS_PLAUSIBLE_MM[1]]
            if samples.shape[0]:
                return xp.stack([xp.mean(samples), ops.quantile(samples, THICKNESS_HIGH_PERCENTILE / 100)])
    return missing


def cartilage_thickness(labels, grid: Grid, plate: str) -> tuple[float, float]:
    """(mean, 95th percentile) thickness in mm of one plate; NaN when the plate is absent."""
    mean, p95 = ops.to_host(_thickness(labels, grid, plate))
    return float(mean), float(p95)


def _fragment_sizes(mask):
    """``[largest piece, all]`` voxels of a mask (components only inside its box)."""
    xp = ops.namespace(mask)
    box = ops.bounding_box(mask)
    if box is None:
        return xp.zeros((2,), dtype=xp.int64, device=ops.device_of(mask))
    mask = mask[box]
    return xp.stack([xp.sum(xp.astype(ops.largest_component(mask), xp.int64)),
                     xp.sum(xp.astype(mask, xp.int64))])


def study_values(labels, image, grid: Grid, channels, confidence=None) -> dict:
    """Every number a row needs, reduced where ``labels`` live (any namespace and device):
    small arrays, brought to the host in one copy by :func:`measure_study`."""
    xp = ops.namespace(labels)
    values = {"counts": ops.label_counts(labels, L.N_CLASSES)}
    if confidence is not None:
        values["confidence"] = confidence
    for plate in L.in_group("cartilage"):
        values[f"thickness:{plate.name}"] = _thickness(labels, grid, plate.name)
    if image is not None:
        for c, name in enumerate(channels):
            values[f"means:{name}"] = ops.label_means(labels, image[c, ...], L.N_CLASSES, values["counts"])
    for name in FOV_CHECKED:
        values[f"border:{name}"] = ops.touches_border(labels == L.by_name(name).id)
    for name in FRAGMENT_CHECKED:
        values[f"pieces:{name}"] = _fragment_sizes(labels == L.by_name(name).id)
    for name in ("fibula", "tibia"):
        values[f"centroid:{name}"] = ops.centroid(labels == L.by_name(name).id)
    return {k: xp.reshape(xp.astype(v, xp.float64), (-1,)) for k, v in values.items()}


def values_to_host(values: dict) -> dict:
    """The arrays of :func:`study_values` as NumPy, through one device-to-host copy."""
    xp = ops.namespace(*values.values())
    host = ops.to_host(xp.concat(list(values.values())))
    out, at = {}, 0
    for k, v in values.items():
        out[k] = host[at:at + v.shape[0]]
        at += v.shape[0]
    return out


def intensity_means(means: dict, channels) -> dict:
    """``<label>_<role>_mean`` for every contrast role; NaN for the roles the study lacks."""
    out = {f"{label.name}_{role.lower()}_mean": math.nan for label in L.LABELS for role in ROLES}
    for name in channels:
        for label in L.LABELS:
            out[f"{label.name}_{name.lower()}_mean"] = float(means[f"means:{name}"][label.id])
    return out


def qc_flags(values: dict, row: dict) -> list[str]:
    flags = []
    for name in EXPECTED:
        if row[f"{name}_volume_mm3"] == 0:
            flags.append(f"missing:{name}")
    for name in FOV_CHECKED:
        if row[f"{name}_volume_mm3"] > 0 and values[f"border:{name}"][0]:
            flags.append(f"fov_truncates:{name}")
    for plate in L.in_group("cartilage"):
        mean = row[f"{plate.name}_thickness_mean_mm"]
        lo, hi = THICKNESS_PLAUSIBLE_MM
        if not math.isnan(mean) and (not lo <= mean <= hi or thickness_outlier(plate.name, mean)):
            flags.append(f"thickness_implausible:{plate.name}")
    for name in FRAGMENT_CHECKED:
        largest, total = values[f"pieces:{name}"]
        if total and largest < FRAGMENT_LIMITS[name] * total:
            flags.append(f"fragmented:{name}")
    if f"fov_truncates:{NORMALISER}" not in flags:  # sizes relative to a whole patella only
        flags.extend(implausible(row))
    return flags


def knee_side_from_anatomy(values: dict, grid: Grid) -> str | None:
    """'left' or 'right': the fibula is lateral, so the side of the patient it lies on
    relative to the tibia names the knee; None when either is missing or too close."""
    centres = []
    for name in ("fibula", "tibia"):
        count, *index = values[f"centroid:{name}"]
        if count == 0:
            return None
        centres.append(grid.index_to_world([float(i) for i in index]))
    # LPS x grows to the patient's left: a fibula to the left of the tibia is a left knee's
    direction = fibula_direction(centres[0][0], centres[1][0])
    return None if direction is None else ("left" if direction > 0 else "right")


def knee_crop(labels, grid: Grid):
    """The femoral and tibial plates with the bone under them, on the host, and its grid: the
    subregion rules (sorting, hole filling, 2-D maps) run on the CPU, on a few MB."""
    plates = labels == L.by_name("femoral_cartilage").id
    for name in ("medial_tibial_cartilage", "lateral_tibial_cartilage"):
        plates = plates | (labels == L.by_name(name).id)
    margin = tuple(int(math.ceil(THICKNESS_MARGIN_MM / s)) for s in grid.spacing)
    box = ops.bounding_box(plates, margin)
    if box is None:
        return None, None
    return ops.to_host(labels[box]), grid.crop([b.start for b in box], [b.stop - b.start for b in box])


def regional_values(labels, grid: Grid, knee_side: str | None) -> dict | None:
    """The subregion columns of one label map (any namespace and device); None when plates too
    odd for the region rules (a few scattered voxels) left them undetermined: the row keeps its
    other numbers and says so (``subregions_undetermined``), the study does not fail."""
    host, crop = knee_crop(labels, grid)
    if host is None:
        return empty_values()
    try:
        return regional_cartilage(host, crop, knee_side).values
    except (ValueError, IndexError, ZeroDivisionError, FloatingPointError):
        return None


def _uncovered(covered) -> set[str]:
    return {label.name for label in L.LABELS if label.id not in covered}


def _about(flag: str, names: set[str]) -> bool:
    """Whether a QC flag (``kind:tissue`` or ``kind:medial/lateral``) names one of ``names``."""
    _, _, tissues = flag.partition(":")
    return any(t in names for t in tissues.split("/"))


def null_uncovered(row: dict, covered) -> dict:
    """The row of a label map that holds only the ``covered`` label ids (another tool's model):
    every number about a tissue it does not segment is null, never 0 (in place)."""
    absent = _uncovered(covered)
    for name in absent:
        for col in [c for c in row if c.startswith(f"{name}_")]:
            row[col] = None
    for group in GROUP_TOTALS:
        if any(label.name in absent for label in L.in_group(group)):
            row[f"total_{group}_volume_mm3"] = row[f"total_{group}_volume_ml"] = None
    plates = {"F": "femoral_cartilage", "MT": "medial_tibial_cartilage", "LT": "lateral_tibial_cartilage"}
    for region in REGIONS:
        # every region needs the tibial plates (the frame, the notch) and its own plate
        needs = {plates["MT"], plates["LT"], plates["F" if region.endswith("F") else region[1:]]}
        if needs & absent:
            for stat in STAT_DOC:
                row[f"{region}_{stat}"] = None
    return row


def confidence_by_tissue(confidence, counts) -> dict:
    """``{tissue: confidence}`` from the host copy of the per-label vector (None where none was
    given or the label map has no such voxel: the confidence is of the working grid, the counts
    of the map)."""
    return {label.name: None if confidence is None or not counts[label.id] or math.isnan(confidence[label.id])
            else float(confidence[label.id]) for label in L.LABELS if label.id != L.BACKGROUND}


def measure_study(key: str, labels, image, grid: Grid, channels, label_source: str, extra_flags=(),
                  knee_side: str | None = None, visit: dict | None = None, covered=None, confidence=None,
                  confidence_reference: dict | None = None) -> dict:
    """One row of ``measurements.parquet``. ``labels``/``image`` may live on any xp device (only
    one vector of results comes back); ``extra_flags``: QC flags known from how the labels were
    made (segmentation); ``knee_side``: from the DICOM headers when they said, else found from
    the anatomy; ``visit``: the study's subject key and visit day
    (:func:`kneebatch.ingest.visits.visit_of`); ``covered``: the label ids the labels can hold
    (another tool's model), the others' numbers null (:func:`null_uncovered`); ``confidence``: the
    engines' per label (:func:`kneebatch.inference.segment.confidence`), flagged against
    ``confidence_reference`` (:func:`kneebatch.plausibility.uncertain`)."""
    if tuple(labels.shape) != grid.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match grid {grid.shape}")
    values = values_to_host(study_values(labels, image, grid, channels if image is not None else (), confidence))
    row = {"study_key": key, **NO_VISIT, **(visit or {})}
    row.update(volumes(None, grid, values["counts"]))
    for plate in L.in_group("cartilage"):
        mean, p95 = values[f"thickness:{plate.name}"]
        row[f"{plate.name}_thickness_mean_mm"] = float(mean)
        row[f"{plate.name}_thickness_p95_mm"] = float(p95)
    side = knee_side or knee_side_from_anatomy(values, grid)
    regional = regional_values(labels, grid, side)
    row.update(empty_values() if regional is None else regional)
    if image is not None:
        row.update(intensity_means(values, channels))
    row["voxel_volume_mm3"] = grid.voxel_volume_mm3
    row["spacing_z_mm"], row["spacing_y_mm"], row["spacing_x_mm"] = grid.spacing
    by_tissue = confidence_by_tissue(values.get("confidence"), values["counts"])
    row.update({f"{name}_confidence": value for name, value in by_tissue.items()})
    flags = [*qc_flags(values, row), *uncertain(by_tissue, confidence_reference), *extra_flags] + (
        ["subregions_undetermined"] if regional is None else [])
    if covered is not None:  # nothing is missing or implausible that the labels never hold
        flags = [f for f in flags if not _about(f, _uncovered(covered))]
        null_uncovered(row, covered)
    row["qc_flags"] = flags
    row["qc_ok"] = not flags
    row["knee_side"] = side
    row["knee_side_source"] = None if side is None else "dicom" if knee_side else "anatomy"
    row["label_source"] = label_source
    row["label_name"] = None
    row["label_grid"] = None
    row["model_hash"] = None
    row["engine_set"] = None
    row["channels_used"] = None
    row["kneebatch_version"] = __version__
    return row
