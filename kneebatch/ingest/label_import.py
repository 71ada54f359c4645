"""Put label maps from NIfTI files (``<StudyInstanceUID>.nii[.gz]``) into the store.

Used for training on ground truth or manual segmentations: the label map must lie
on the study's T1 grid (the store's image grid); anything else is refused.
"""

from __future__ import annotations

from pathlib import Path

from kneebatch.errors import StudyError
from kneebatch.ingest.nifti import read_nifti
from kneebatch.ingest.store import CohortStore
from kneebatch.outputs import read_rows


def label_file(labels_dir: Path, study_uid: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        p = Path(labels_dir) / f"{study_uid}{suffix}"
        if p.exists():
            return p
    return None


def read_label_file(path, grid):
    """The label map in ``path``, checked against the study grid."""
    labels, label_grid = read_nifti(path)
    if not label_grid.same_as(grid):
        raise StudyError("label_geometry_mismatch", f"labels {label_grid.shape} vs image {grid.shape}")
    return labels.astype("uint8")


def import_labels(store_path, labels_dir, name: str = "labels") -> tuple[int, list[str]]:
    """Returns (number imported, study keys without a usable label file)."""
    store = CohortStore(store_path, create=False)
    uid_of = {r["study_key"]: r["study_uid"] for r in read_rows(store.keymap_path)}
    done, missing = 0, []
    for key in store.study_keys():
        path = label_file(Path(labels_dir), uid_of.get(key, ""))
        if path is None:
            missing.append(key)
            continue
        store.write_labels(key, read_label_file(path, store.grid(key)), {"source": "import"}, name=name)
        done += 1
    return done, missing
