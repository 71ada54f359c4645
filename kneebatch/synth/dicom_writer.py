"""Write a volume as a real DICOM MR series (one MR Image Storage file per slice)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kneebatch.geometry import Grid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
UID_ROOT = "1.2.826.0.1.3680043.10.1177."  # synthetic data only


@dataclass
class SeriesInfo:
    description: str
    number: int
    repetition_time_ms: float
    echo_time_ms: float
    acquisition: str  # "2D" or "3D"
    thickness_mm: float
    uid: str = ""
    image_type: tuple = ("ORIGINAL", "PRIMARY", "M", "NORM")
    # sequence headers as a Siemens scanner writes them (kneebatch.ingest.roles reads them)
    scanning_sequence: tuple = ("SE",)
    sequence_variant: tuple = ("SK",)
    scan_options: tuple = ()
    sequence_name: str = "*tse2d1_5"
    flip_angle_deg: float = 150.0
    laterality: str = ""  # "L", "R" or "" (not written)
    inversion_time_ms: float = 0.0  # written when > 0
    field_t: float = 3.0
    manufacturer: str = "SIEMENS"


def _fmt(v: float) -> str:
    """DS values are at most 16 characters."""
    s = f"{v:.10g}"
    return s if len(s) <= 16 else f"{v:.6f}"[:16]


def write_series(directory: Path, volume: np.ndarray, grid: Grid, series: SeriesInfo,
                 patient: dict, study: dict, slice_order: np.ndarray | None = None) -> list[Path]:
    """One file per slice, names ``001``, ``002``... (no extension, as OAI ships).

    ``patient`` and ``study`` are DICOM keyword -> value (the study carries its
    FrameOfReferenceUID).

    ``slice_order`` permutes which slice goes into which file/InstanceNumber so that
    readers cannot rely on either; slice geometry is always in ImagePositionPatient.
    """
    directory.mkdir(parents=True, exist_ok=True)
    n = volume.shape[0]
    order = np.arange(n) if slice_order is None else np.asarray(slice_order)
    direction = grid.direction
    col_dir = direction[:, 1]  # rows advance along the image column direction
    row_dir = direction[:, 2]
    dz, dy, dx = grid.spacing
    paths = []
    for file_index, z in enumerate(order):
        ds = Dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        sop_uid = generate_uid(prefix=UID_ROOT)
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID_ROOT + "1"
        ds.file_meta = meta
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(series.image_type)
        for key, value in patient.items():
            setattr(ds, key, value)
        for key, value in study.items():
            setattr(ds, key, value)
        ds.Modality = "MR"
        ds.Manufacturer = series.manufacturer
        ds.SeriesInstanceUID = series.uid
        ds.SeriesNumber = series.number
        ds.SeriesDescription = series.description
        ds.ProtocolName = series.description
        ds.BodyPartExamined = "KNEE"
        ds.ScanningSequence = list(series.scanning_sequence)
        ds.SequenceVariant = list(series.sequence_variant)
        if series.scan_options:
            ds.ScanOptions = list(series.scan_options)
        ds.SequenceName = series.sequence_name
        ds.FlipAngle = _fmt(series.flip_angle_deg)
        if series.laterality:
            ds.Laterality = series.laterality
        ds.MRAcquisitionType = series.acquisition
        ds.RepetitionTime = _fmt(series.repetition_time_ms)
        ds.EchoTime = _fmt(series.echo_time_ms)
        if series.inversion_time_ms > 0:
            ds.InversionTime = _fmt(series.inversion_time_ms)
        ds.MagneticFieldStrength = _fmt(series.field_t)
        ds.SliceThickness = _fmt(series.thickness_mm)
        ds.SpacingBetweenSlices = _fmt(dz)
        ds.InstanceNumber = file_index + 1
        pos = grid.index_to_world([z, 0, 0])
        ds.ImagePositionPatient = [_fmt(v) for v in pos]
        ds.ImageOrientationPatient = [_fmt(v) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = _fmt(float(pos @ direction[:, 0]))
        ds.PixelSpacing = [_fmt(dy), _fmt(dx)]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(volume[z], dtype="<u2").tobytes()
        path = directory / f"{file_index + 1:03d}"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
