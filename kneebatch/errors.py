"""Why a study could not be processed: stable reason codes and a message for a person.

Every failure row (convert, measure, run) carries one of these codes.
"""

from __future__ import annotations

REASONS = {
    # files (stage "scan": a row per file that is not a usable DICOM image)
    "not_dicom": "not a DICOM file",
    "unreadable_file": "the file could not be read",
    "missing_uid": "DICOM file without StudyInstanceUID or SeriesInstanceUID",
    "not_an_image": "DICOM object without pixel data (report, plan, ...)",
    "special_file": "a device, FIFO or socket (or a link to one): never read",
    "unnamed_volume": "a NIfTI/MetaImage file whose name does not give its contrast: name it <case>_<ROLE>.nii.gz "
                      "(ROLE: T1, T2, T2FS, PD, PDFS, DESS, GRE3D, other) or map nnU-Net suffixes with --channels",
    # studies
    "not_mr": "the study has no MR image series",
    "not_sagittal": "the study's MR series are not sagittal (axial/coronal/oblique are refused)",
    "too_large": "the image dimensions are implausibly large; refused before reading pixels",
    "no_usable_series": "the study has no usable sagittal MR series",
    "missing_slice": "a slice is missing from the stack (a gap of a whole slice step)",
    "duplicate_slice": "two slices share one position",
    "irregular_spacing": "slice positions are not evenly spaced",
    "inconsistent_size": "slices of one series differ in rows/columns",
    "inconsistent_orientation": "slices of one series differ in orientation",
    "inconsistent_spacing": "slices of one series differ in pixel spacing",
    "too_few_slices": "the series has too few slices to be a volume",
    "unreadable_pixels": "pixel data could not be decoded",
    "pixel_data_length": "the pixel data's length is not Rows x Columns x frames x samples (a damaged or "
                         "mislabelled file): read as it is, it would be measured as if it were the image",
    "uid_collision": "one StudyInstanceUID holds two patients or two study dates, or one SeriesInstanceUID is "
                     "in two studies (a PACS or anonymiser fault): nothing of it is merged or converted",
    "non_finite_values": "the image holds NaN or infinite values",
    "constant_image": "every voxel of the image has the same value",
    "bad_scaling": "the intensity scaling (RescaleSlope, scl_slope) is zero or not finite",
    "bad_dtype": "the voxel type is not a real number type kneebatch can store",
    "out_of_range_values": "integer voxel values outside 0-65535 (negative or too large): the store keeps uint16",
    "bad_geometry": "the image geometry is missing or degenerate",
    "no_labels": "the study has no label map to measure",
    "label_geometry_mismatch": "the label map's grid does not cover the study's image grid",
    "unknown_label_ids": "the label map holds ids that are not in kneebatch's schema and not mapped (--label-map)",
    "partial_label_set": "the label map holds a partial label set's own ids (e.g. OAI-ZIB's, imported for "
                         "training): it trains nets, it is not measured or exported as kneebatch's labels",
    "unsupported_contrast": "the engines need contrasts this study does not have",
    "missing_role": "the model (--model) takes a series this study does not have",
    "worker_died": "the worker processing this study died every time it was tried (out of memory, crash); "
                   "recorded as poison and not retried in this run",
    "source_missing": "the study's DICOM source is not where it was converted from (exports that need it: SEG)",
    "source_changed": "the study's DICOM source differs from what was converted (slices added, removed or moved)",
    "unsupported": "kneebatch cannot do this for this kind of input yet; the message says what",
    "internal_error": "an unexpected error; the message says which",
}


class StudyError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {REASONS[reason]}" + (f" ({detail})" if detail else ""))

    @property
    def message(self) -> str:
        return REASONS[self.reason] + (f": {self.detail}" if self.detail else "")



def internal_message(exc: BaseException) -> str:
    """The message of a failure row for an unexpected error: its type only. Exception texts
    (nibabel's, zarr's, OS errors) carry file paths, and paths carry identifiers."""
    return f"{type(exc).__name__} (details withheld: they may name files)"


def failure_row(study_key: str, stage: str, exc: BaseException) -> dict:
    """The one way to make a failure row: a reason code and a message that names no file and
    no identifier (a StudyError's own message, or only the type of an unexpected error)."""
    if isinstance(exc, StudyError):
        return {"study_key": study_key, "stage": stage, "reason": exc.reason, "message": exc.message}
    return {"study_key": study_key, "stage": stage, "reason": "internal_error", "message": internal_message(exc)}
