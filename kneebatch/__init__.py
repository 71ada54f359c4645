"""kneebatch: batch segmentation and measurement of knee MRI cohorts.

From Python: ``kneebatch.segment(image, affine, roles=...)`` segments one image in memory,
``kneebatch.open_store(path)`` opens a cohort store, ``kneebatch.read_results(out)`` reads a
job's tables as pandas (:mod:`kneebatch.api`; docs/api.md). Importing kneebatch loads none of
them: they are imported on first use.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["segment", "open_store", "read_results", "__version__"]
_API = {"segment", "open_store", "read_results", "Segmentation", "Results"}


def __getattr__(name):  # PEP 562: the public API, loaded when first asked for
    if name in _API:
        return getattr(importlib.import_module("kneebatch.api"), name)
    raise AttributeError(f"module 'kneebatch' has no attribute {name!r}")
