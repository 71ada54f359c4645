"""kneebatch: batch segmentation and measurement of knee MRI cohorts."""

__version__ = "0.1.0"
