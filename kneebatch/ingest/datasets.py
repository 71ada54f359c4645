"""Public knee data sets' label files: their layouts, and importing them into a store with their
own ids (their label sets, which of kneebatch's labels each id stands for, are in
:mod:`kneebatch.label_sets`).

Layouts:

- **OAI-ZIB** (Ambellan et al., MedIA 2019): ``segmentation_masks/<OAI patient ID>.segmentation_masks.mhd``
  (+ ``.raw``), ids 1 femoral bone, 2 femoral cartilage, 3 tibial bone, 4 tibial cartilage, for
  the baseline sagittal DESS. The masks carry no pose (the data set's README: "they fit the
  MRI scans up to rigid alignment"): their voxels are the DESS's, as ITK reads them
  ``[row (bottom to top), column, slice]`` (``readMaskSimpleITK.py`` shows sagittal slice *s* as
  ``array[:, :, s]``; users' loaders flip the first axis to match the DICOM rows).
  :func:`oai_zib_labels` puts them on the study's stored grid through its recorded source grid.
- **SKM-TEA** (Desai et al., NeurIPS 2021): ``segmentation_masks/dicom-track/MTR_<nnn>.nii.gz``,
  ids 1 patellar cartilage, 2 femoral cartilage, 3 medial and 4 lateral tibial cartilage,
  5 medial and 6 lateral meniscus, with the NIfTI's own geometry (read like any label file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kneebatch.errors import StudyError
from kneebatch.ingest.label_import import label_file, read_label_file, study_names
from kneebatch.ingest.store import CohortStore
from kneebatch.label_sets import LabelSet

LAYOUT_SUFFIX = {"oai-zib": ".segmentation_masks.mhd", "skm-tea": ".nii.gz"}


def check_ids(labels: np.ndarray, label_set: LabelSet) -> np.ndarray:
    """The file's ids as they are (uint8), refused when one is not in the set."""
    ids = np.unique(labels)
    unknown = [int(i) for i in ids if i != 0 and int(i) not in label_set.ids]
    if unknown:
        raise StudyError("unknown_label_ids", f"ids {unknown[:10]} are not in the label set {label_set.name}")
    return labels.astype(np.uint8)


def oai_zib_labels(path, store, key) -> np.ndarray:
    """An OAI-ZIB mask on the study's stored (canonical) grid, through the DESS's source grid."""
    from kneebatch.ingest.metaimage import read_metaimage

    data, _ = read_metaimage(path)
    # ITK's array [a0, a1, a2] is the DESS's [row bottom-to-top, column, slice]: to [slice, row, column]
    voxels = np.ascontiguousarray(np.asarray(data).transpose(2, 0, 1)[:, ::-1, :])
    reorientation, source = store.source_order(key)
    if voxels.shape != source.shape:
        raise StudyError("label_geometry_mismatch", f"the OAI-ZIB mask has {voxels.shape} voxels "
                                                    f"(slice, row, column); the study's DESS has {source.shape}")
    data, grid = reorientation.apply(voxels, source)
    if not grid.same_as(store.grid(key)):
        raise StudyError("label_geometry_mismatch", "the study's stored grid is not its DESS's grid reoriented")
    return data


def dataset_label_file(folder, names, label_set: LabelSet) -> Path | None:
    """``<name><layout suffix>`` in ``folder`` (or its ``segmentation_masks/`` or ``dicom-track``)."""
    suffix = (LAYOUT_SUFFIX.get(label_set.name, ".nii.gz"),)
    folder = Path(folder)
    for where in (folder, folder / "segmentation_masks", folder / "segmentation_masks" / "dicom-track"):
        found = label_file(where, names, suffix)
        if found is not None:
            return found
    return None


def import_dataset_labels(store_path, labels_dir, label_set, name: str) -> tuple[int, list[str]]:
    """A public data set's label files (:mod:`kneebatch.ingest.datasets`) into the store, their ids
    kept as the set's (training maps them with the set). Returns (number imported, keys without)."""
    store = CohortStore(store_path, create=False)
    done, missing = 0, []
    for key, names in study_names(store, folders=True).items():
        path = dataset_label_file(labels_dir, names, label_set) or label_file(labels_dir, names)
        if path is None:
            missing.append(key)
            continue
        if path.name.endswith(".segmentation_masks.mhd"):  # OAI-ZIB: no pose, the DESS's voxels
            labels, how = oai_zib_labels(path, store, key), "oai_zib_voxels"
        else:
            labels, how = read_label_file(path, store.grid(key))
        labels = check_ids(labels, label_set)
        store.write_labels(key, labels, {"source": "import", "label_grid": how, "label_set": label_set.name,
                                         "label_classes": [[i, list(n)] for i, n in label_set.classes]}, name=name)
        done += 1
    return done, missing
