"""Public knee label sets that annotate a subset of the schema, and their file layouts.

A :class:`LabelSet` says which of kneebatch's labels each id of a data set's files stands
for; an id may stand for several (OAI-ZIB's "tibial cartilage" is kneebatch's medial and
lateral plates together). Training on such files uses a marginal loss
(:mod:`kneebatch.training.losses`): the net's probabilities are summed over each id's
labels, and the file's background stands for every label the set does not annotate, so
tissues the data set leaves out are not unlearnt.

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

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kneebatch import labels as L
from kneebatch.errors import StudyError


@dataclass(frozen=True)
class LabelSet:
    name: str
    classes: tuple  # ((file id, (schema label names...)), ...), file ids > 0

    @property
    def ids(self) -> dict[int, tuple[int, ...]]:
        return {i: tuple(L.by_name(n).id for n in names) for i, names in self.classes}

    @property
    def is_partial(self) -> bool:
        """Whether some schema label is not annotated, or an id stands for several labels."""
        covered = [lab for ids in self.ids.values() for lab in ids]
        return len(covered) != len(L.LABELS) or any(len(v) > 1 for v in self.ids.values())

    def class_names(self) -> list[str]:
        """Names of the set's classes in id order, background (every unannotated label) first."""
        return ["background"] + ["+".join(names) for _, names in sorted(self.classes)]

    def membership(self) -> np.ndarray:
        """``[n set classes, n schema classes]`` 0/1: which schema classes each set class sums."""
        m = np.zeros((len(self.classes) + 1, L.N_CLASSES), np.float32)
        order = {i: row + 1 for row, (i, _) in enumerate(sorted(self.classes))}
        for i, ids in self.ids.items():
            m[order[i], list(ids)] = 1
        m[0] = 1 - m[1:].sum(0)  # background: the labels no class claims, and 0
        return m

    def file_to_class(self) -> np.ndarray:
        """Lookup: a file id -> its row in :meth:`membership` (ids not in the set: -1)."""
        lut = np.full(max(i for i, _ in self.classes) + 1, -1, np.int64)
        lut[0] = 0
        for row, (i, _) in enumerate(sorted(self.classes)):
            lut[i] = row + 1
        return lut

    def schema_to_class(self) -> np.ndarray:
        """Lookup: a schema label id -> the set class that holds it (to score predictions)."""
        return np.argmax(self.membership(), axis=0)


LABEL_SETS = {
    "oai-zib": LabelSet("oai-zib", ((1, ("femur",)), (2, ("femoral_cartilage",)), (3, ("tibia",)),
                                    (4, ("medial_tibial_cartilage", "lateral_tibial_cartilage")))),
    "skm-tea": LabelSet("skm-tea", ((1, ("patellar_cartilage",)), (2, ("femoral_cartilage",)),
                                    (3, ("medial_tibial_cartilage",)), (4, ("lateral_tibial_cartilage",)),
                                    (5, ("medial_meniscus",)), (6, ("lateral_meniscus",)))),
}
LAYOUT_SUFFIX = {"oai-zib": ".segmentation_masks.mhd", "skm-tea": ".nii.gz"}


def parse_label_set(text: str) -> LabelSet:
    """A data set's name (``oai-zib``, ``skm-tea``) or ``"1:femur,4:medial_tibial_cartilage+lateral_tibial_cartilage"``."""
    text = text.strip()
    if text.lower() in LABEL_SETS:
        return LABEL_SETS[text.lower()]
    classes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        src, _, names = item.partition(":")
        try:
            i = int(src)
            parts = tuple(n.strip() for n in names.split("+"))
            for n in parts:
                L.by_name(n)
            if i <= 0 or i in classes:
                raise ValueError
        except (KeyError, ValueError):
            raise ValueError(f"--label-map: {item!r} is not ID:LABEL[+LABEL...] with a positive ID used once and "
                             f"labels of the schema ('kneebatch labels' lists them), or one of "
                             f"{', '.join(LABEL_SETS)}") from None
        classes[i] = parts
    if not classes:
        raise ValueError("--label-map: no ID:LABEL pairs found")
    claimed = [n for parts in classes.values() for n in parts]
    if len(claimed) != len(set(claimed)):
        raise ValueError("--label-map: a label is claimed by two ids")
    return LabelSet("custom", tuple(sorted(classes.items())))


def check_ids(labels: np.ndarray, label_set: LabelSet) -> np.ndarray:
    """The file's ids as they are (uint8), refused when one is not in the set."""
    ids = np.unique(labels)
    unknown = [int(i) for i in ids if i != 0 and int(i) not in label_set.ids]
    if unknown:
        raise StudyError("unknown_label_ids", f"ids {unknown[:10]} are not in the label set {label_set.name}")
    return labels.astype(np.uint8)


def oai_zib_labels(path, store, key) -> np.ndarray:
    """An OAI-ZIB mask on the study's stored (canonical) grid, through the DESS's source grid."""
    from kneebatch.export import source_order
    from kneebatch.ingest.metaimage import read_metaimage

    data, _ = read_metaimage(path)
    # ITK's array [a0, a1, a2] is the DESS's [row bottom-to-top, column, slice]: to [slice, row, column]
    voxels = np.ascontiguousarray(np.asarray(data).transpose(2, 0, 1)[:, ::-1, :])
    reorientation, source = source_order(store, key)
    if voxels.shape != source.shape:
        raise StudyError("label_geometry_mismatch", f"the OAI-ZIB mask has {voxels.shape} voxels "
                                                    f"(slice, row, column); the study's DESS has {source.shape}")
    data, grid = reorientation.apply(voxels, source)
    if not grid.same_as(store.grid(key)):
        raise StudyError("label_geometry_mismatch", "the study's stored grid is not its DESS's grid reoriented")
    return data


def dataset_label_file(folder, names, label_set: LabelSet) -> Path | None:
    """``<name><layout suffix>`` in ``folder`` (or its ``segmentation_masks/`` or ``dicom-track``)."""
    from kneebatch.ingest.label_import import label_file

    suffix = (LAYOUT_SUFFIX.get(label_set.name, ".nii.gz"),)
    folder = Path(folder)
    for where in (folder, folder / "segmentation_masks", folder / "segmentation_masks" / "dicom-track"):
        found = label_file(where, names, suffix)
        if found is not None:
            return found
    return None


def label_set_from_map(text: str) -> LabelSet | None:
    """The partial label set a ``--label-map`` describes, or None when it maps ids one to one onto
    every schema label (or only translates ids: ``N:background``), i.e. full labels."""
    if not text.strip():
        return None
    if "background" in text and text.strip().lower() not in LABEL_SETS:
        return None  # a translation of full labels (parse_label_map's syntax)
    label_set = parse_label_set(text)
    return label_set if label_set.is_partial else None
