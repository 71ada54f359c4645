"""Put label maps (``<StudyInstanceUID or case>.nii[.gz]`` / ``.mhd`` / ``.mha``) into the store.

Used for training on ground truth or manual segmentations: the label map must lie
on the study's T1 grid (the store's image grid); anything else is refused. Foreign
label ids (another data set's schema) are translated with ``label_map``.
"""

from __future__ import annotations

from pathlib import Path

from kneebatch.errors import StudyError
import numpy as np

from kneebatch.ingest.nifti import VOLUME_SUFFIXES, read_volume
from kneebatch.ingest.store import CohortStore
from kneebatch.outputs import read_rows


def label_file(labels_dir: Path, study_uid: str) -> Path | None:
    for suffix in VOLUME_SUFFIXES:
        p = Path(labels_dir) / f"{study_uid}{suffix}"
        if p.exists():
            return p
    return None


def parse_label_map(text: str) -> dict[int, int]:
    """``"1:femur,2:femoral_cartilage"`` -> {1: id of femur, 2: id of femoral_cartilage}."""
    from kneebatch import labels as L

    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        src, name = item.split(":", 1)
        out[int(src)] = L.by_name(name.strip()).id
    return out


def read_label_file(path, grid, label_map: dict[int, int] | None = None):
    """The label map in ``path``, checked against the study grid, ids translated by ``label_map``."""
    labels, label_grid = read_volume(path)
    if not label_grid.same_as(grid):
        raise StudyError("label_geometry_mismatch", f"labels {label_grid.shape} vs image {grid.shape}")
    labels = np.asarray(labels)
    if label_map:
        lut = np.zeros(int(max(labels.max(), max(label_map))) + 1, np.uint8)
        for src, dst in label_map.items():
            lut[src] = dst
        return lut[labels.astype(np.int64)]
    return labels.astype(np.uint8)


def import_labels(store_path, labels_dir, name: str = "labels",
                  label_map: dict[int, int] | None = None) -> tuple[int, list[str]]:
    """Returns (number imported, study keys without a usable label file)."""
    store = CohortStore(store_path, create=False)
    uid_of = {r["study_key"]: r["study_uid"] for r in read_rows(store.keymap_path)}
    done, missing = 0, []
    for key in store.study_keys():
        path = label_file(Path(labels_dir), uid_of.get(key, ""))
        if path is None:
            missing.append(key)
            continue
        store.write_labels(key, read_label_file(path, store.grid(key), label_map), {"source": "import"}, name=name)
        done += 1
    return done, missing
