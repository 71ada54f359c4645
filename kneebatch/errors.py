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
    # studies
    "not_mr": "the study has no MR image series",
    "not_sagittal": "the study's MR series are not sagittal (axial/coronal/oblique are refused)",
    "multiframe_unsupported": "enhanced (multi-frame) MR objects are not supported yet",
    "too_large": "the image dimensions are implausibly large; refused before reading pixels",
    "missing_t1": "no sagittal T1-weighted series was found",
    "missing_t2": "no sagittal T2-weighted series was found",
    "missing_slice": "a slice is missing from the stack (a gap of a whole slice step)",
    "duplicate_slice": "two slices share one position",
    "irregular_spacing": "slice positions are not evenly spaced",
    "inconsistent_size": "slices of one series differ in rows/columns",
    "inconsistent_orientation": "slices of one series differ in orientation",
    "inconsistent_spacing": "slices of one series differ in pixel spacing",
    "too_few_slices": "the series has too few slices to be a volume",
    "unreadable_pixels": "pixel data could not be decoded",
    "non_finite_values": "the image holds NaN or infinite values",
    "bad_geometry": "the image geometry is missing or degenerate",
    "no_labels": "the study has no label map to measure",
    "label_geometry_mismatch": "the label map's grid differs from the study's image grid",
    "worker_died": "the worker processing this study died every time it was tried (out of memory, crash); "
                   "recorded as poison and not retried in this run",
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

