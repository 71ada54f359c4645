"""Label maps from files (NIfTI / MetaImage) onto a study's stored grid.

Used to measure or train on ground truth, manual segmentations or kneebatch's own
exports. A file is found by the names a user has for the study: its study key (as
``kneebatch export`` names files, ``<key>_labels.nii.gz``) or its StudyInstanceUID /
case name. The map may lie on any grid that covers the study's image: the same grid,
the same grid in another voxel order (mapped exactly, as an export in the source's
order is), or another grid (nearest-neighbour resampling, recorded). Foreign label ids
(another data set's schema) are translated with ``label_map`` (every id of the file must be
in it; ``N:background`` drops one); ids outside kneebatch's schema that are not mapped are an
error, never a silent table of zeros.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kneebatch import labels as L
from kneebatch.errors import StudyError
from kneebatch.geometry import Grid, resample, to_canonical
from kneebatch.ingest.nifti import VOLUME_SUFFIXES, read_volume
from kneebatch.ingest.store import CohortStore
from kneebatch.outputs import read_rows


def label_file(labels_dir, names, suffixes=VOLUME_SUFFIXES) -> Path | None:
    """The first existing ``<name>[_labels]<suffix>`` in ``labels_dir`` for the study's names."""
    for name in filter(None, names):
        for stem in (f"{name}_labels", name):
            for suffix in suffixes:
                p = Path(labels_dir) / f"{stem}{suffix}"
                # a name built from header values must stay a file name: never a path elsewhere
                if p.name == f"{stem}{suffix}" and "/" not in stem and stem not in (".", "..") and p.is_file():
                    return p
    return None


def study_names(store: CohortStore, folders: bool = False) -> dict[str, list[str]]:
    """Study key -> the names a label file may have (key first, then UID or case name).

    ``folders``: also the last three folder names of the study's source path that no other
    study of the store shares (public label sets name files by a patient or scan ID that is a
    folder of the image tree: OAI-ZIB by the OAI patient ID, SKM-TEA by its scan ID). A name
    two studies share (a patient's visits) never names either."""
    rows = {r["study_key"]: r for r in read_rows(store.keymap_path)}
    keys = store.study_keys()
    names = {k: [k, rows.get(k, {}).get("study_uid", "")] for k in keys}
    if folders:
        parts = {k: [p for p in Path(rows[k]["source_path"] or "").parts[-3:] if p not in ("/", "..", ".")]
                 for k in keys if k in rows}
        count = {}
        for ps in parts.values():
            for p in set(ps):
                count[p] = count.get(p, 0) + 1
        for k, ps in parts.items():
            names[k] += [p for p in reversed(ps) if count[p] == 1]
    return names


def translate(labels: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """Label ids as kneebatch's schema: mapped by ``label_map`` (every non-zero id of the file must
    be listed), else checked; ids outside the schema or the map raise ``unknown_label_ids``."""
    if not np.issubdtype(labels.dtype, np.integer):
        rounded = np.rint(labels)
        if not np.all(np.isfinite(labels)) or not np.array_equal(rounded, labels):
            raise StudyError("unknown_label_ids", "the label map holds values that are not whole numbers")
        labels = rounded
    labels = labels.astype(np.int64)
    ids = np.unique(labels)
    if label_map:
        unknown = np.array([i for i in ids if i != 0 and int(i) not in label_map])
    else:
        unknown = ids[(ids < 0) | (ids >= L.N_CLASSES)]
    if unknown.size:
        shown = ", ".join(str(int(i)) for i in unknown[:10]) + (" ..." if unknown.size > 10 else "")
        hint = "not in --label-map (map them, to background if need be)" if label_map else "(map them with --label-map)"
        raise StudyError("unknown_label_ids", f"ids {shown} {hint}")
    if label_map:
        lut = np.zeros(int(max(ids.max(), max(label_map))) + 1, np.uint8)
        for src, dst in label_map.items():
            lut[src] = dst
        return lut[labels]
    return labels.astype(np.uint8)


def labels_onto(labels: np.ndarray, label_grid: Grid, grid: Grid) -> tuple[np.ndarray, str]:
    """``labels`` on ``grid`` and how they got there: ``same_grid``, ``reoriented`` (only the
    voxel order differed: exact) or ``resampled`` (nearest neighbour)."""
    if label_grid.same_as(grid):
        return labels, "same_grid"
    data, reoriented = to_canonical(label_grid).apply(labels, label_grid)
    if reoriented.same_as(grid):
        return data, "reoriented"
    if not covers(label_grid, grid):
        covered = resample(np.ones(label_grid.shape, np.uint8), label_grid, grid, order=0)
        raise StudyError("label_geometry_mismatch", f"the label map covers {100 * float(np.mean(covered > 0)):.1f} % "
                                                    f"of the image grid {grid.shape}")
    return resample(labels, label_grid, grid, order=0, mode="nearest"), "resampled"


def covers(outer: Grid, inner: Grid, tol_voxels: float = 1e-3) -> bool:
    """Whether every voxel centre of ``inner`` lies inside the voxels of ``outer`` (the corners
    decide: the grids are affine)."""
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in inner.shape], indexing="ij")).reshape(3, -1).T
    idx = outer.world_to_index(inner.index_to_world(corners))
    return bool(np.all(idx >= -0.5 - tol_voxels) and np.all(idx <= np.asarray(outer.shape) - 0.5 + tol_voxels))


def read_label_file(path, grid: Grid, label_map: dict[int, int] | None = None) -> tuple[np.ndarray, str]:
    """The label map in ``path`` on the study's ``grid``, ids as kneebatch's schema."""
    labels, label_grid = read_volume(path)
    labels = translate(np.asarray(labels), label_map)
    return labels_onto(labels, label_grid, grid)


def import_labels(store_path, labels_dir, name: str = "labels",
                  label_map: dict[int, int] | None = None) -> tuple[int, list[str]]:
    """Returns (number imported, study keys without a usable label file)."""
    store = CohortStore(store_path, create=False)
    done, missing = 0, []
    for key, names in study_names(store).items():
        path = label_file(labels_dir, names)
        if path is None:
            missing.append(key)
            continue
        labels, how = read_label_file(path, store.grid(key), label_map)
        store.write_labels(key, labels, {"source": "import", "label_grid": how}, name=name)
        done += 1
    return done, missing
