"""``kneebatch export --format seg``: label maps as DICOM Segmentation objects (highdicom),
referencing the source series they were made on: what PACS and DICOM viewers take.

The SEG lies on the study's reference series (the one the store's grid came from): its
frames are that series' slices, in the source's own voxel order, so no resampling happens.
Each schema label is one segment (segment number = label id), coded with SNOMED CT where a
code for the structure exists, else with its tissue class; the segment label is the
schema's name. A SEG carries the source's patient and study identifiers (it must, to be
filed with the study): it is written for the user's own systems, never by default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from kneebatch import __version__
from kneebatch import labels as L
from kneebatch.errors import StudyError
from kneebatch.ingest import dicom
from kneebatch.ingest.store import CohortStore

# SNOMED CT concepts by label, else by group (pydicom's code dictionary names)
_TYPE_BY_NAME = {"femur": "Femur", "tibia": "Tibia", "fibula": "Fibula", "patella": "Patella",
                 "patellar_tendon": "PatellarTendon", "effusion": "Effusion"}
_TYPE_BY_GROUP = {"bone": "Bone", "cartilage": "Cartilage", "meniscus": "Meniscus", "ligament": "Ligament",
                  "tendon": "Tendon", "muscle": "SkeletalMuscle", "fat": "AdiposeTissue", "fluid": "Effusion"}


def segment_descriptions() -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="kneebatch", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    out = []
    for label in L.LABELS:
        kind = getattr(codes.SCT, _TYPE_BY_NAME.get(label.name) or _TYPE_BY_GROUP[label.group])
        category = codes.SCT.MorphologicallyAbnormalStructure if label.group == "fluid" else codes.SCT.AnatomicalStructure
        out.append(hd.seg.SegmentDescription(
            segment_number=label.id, segment_label=label.name, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_id=label.name, tracking_uid=hd.UID()))
    return out


def reference_datasets(store: CohortStore, key: str, row: dict | None) -> list[pydicom.Dataset]:
    """The reference series' files of a study, read again from its source (``row``: its keymap
    row, with the path), in the order of the source grid's slice axis."""

    attrs = store.study_attrs(key)
    if attrs.get("source_kind") != "dicom":
        raise StudyError("unsupported", "the study was converted from volume files: a SEG needs its DICOM series")
    if row is None or not Path(row["source_path"]).exists():
        raise StudyError("source_missing", "its source folder (keymap.parquet) is not there any more")
    headers = []
    for path in dicom.list_files(Path(row["source_path"])):
        found = dicom.read_header(path)
        headers += [h for h in (found if isinstance(found, list) else [found])
                    if isinstance(h, dicom.SliceHeader) and h.study_uid == row["study_uid"]]
    study = dicom.group_studies(headers).get(row["study_uid"])
    series = dicom.choose_series(study).get(attrs["reference_role"]) if study else None
    if series is None:
        raise StudyError("source_missing", f"no {attrs['reference_role']} series in its source any more")
    if any(h.frame >= 0 for h in series.slices):
        raise StudyError("unsupported", "SEG export of multi-frame (enhanced) sources is not supported yet")
    dicom.silence_pydicom()
    datasets = [pydicom.dcmread(h.path) for h in series.slices]
    _, source = store.source_order(key)
    normal = source.direction[:, 0]
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))
    if len(datasets) != source.shape[0]:
        raise StudyError("source_changed", f"its series has {len(datasets)} slices now, {source.shape[0]} when converted")
    if not np.allclose(np.asarray(datasets[0].ImagePositionPatient, float), source.origin, atol=0.05):
        raise StudyError("source_changed", "its first slice is not where it was when converted")
    return datasets


def write_seg(store: CohortStore, key: str, labels_source_order: np.ndarray, path: Path, keymap_row: dict | None,
              series_number: int = 900):
    """A LABELMAP SEG of ``labels_source_order`` (the label map in the source's voxel order);
    ``keymap_row``: the study's row of ``keymap.parquet`` (where its source is)."""
    import highdicom as hd

    datasets = reference_datasets(store, key, keymap_row)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=labels_source_order.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP, segment_descriptions=segment_descriptions(),
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="kneebatch", manufacturer_model_name="kneebatch", software_versions=__version__,
        device_serial_number="none", series_description="kneebatch segmentation", omit_empty_frames=False)
    seg.save_as(path)
    return path
