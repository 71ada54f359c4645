"""kneebatch from Python: segment one image held in memory, open a cohort store, read a job's
results. ``kneebatch.segment``, ``kneebatch.open_store`` and ``kneebatch.read_results`` are these
functions (the package root loads this module on first use).

The batch commands (``convert``, ``run``, ``measure``) are library calls too:
:func:`kneebatch.jobs.convert.convert`, :func:`kneebatch.jobs.run.run`,
:func:`kneebatch.jobs.measure.measure_store`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kneebatch.geometry import Grid, affine_from_nifti, to_canonical


@dataclass
class Segmentation:
    labels: np.ndarray  # uint8, in the voxel order of the image given (kneebatch.labels: ids)
    grid: Grid  # that image's grid
    engine_set: str  # the set that ran (chosen by the roles, or forced)
    model_hash: str  # its weights and config
    channels_used: list  # the roles the set took, in its channel order
    measurements: dict | None = None  # one measurements.parquet row (``measure=True``)


def segment(image, affine=None, roles=("T1", "T2FS"), engines=None, backend: str = "onnxruntime",
            device: str = "cpu", threads: int | None = None, tta: bool = False, measure: bool = False,
            nifti_affine=None, allow_low_accuracy: bool = False) -> Segmentation:
    """Segment one study given as arrays, as ``kneebatch run`` segments a stored one.

    ``image``: ``[C, Z, Y, X]`` (or ``[Z, Y, X]`` for one series), one channel per series, all on
    one grid, in any voxel order. ``affine``: that grid's 4 x 4 matrix from voxel index
    ``(z, y, x)`` to patient coordinates in mm, LPS (DICOM's); or give ``nifti_affine``, a NIfTI's
    ``(i, j, k) -> RAS`` matrix, for ``image`` as ``data.transpose(2, 1, 0)`` of the NIfTI's array
    (nibabel: ``img.get_fdata().transpose(2, 1, 0)``, ``img.affine``). ``roles``: each channel's
    contrast role (``T1``, ``T2FS``, ``DESS``, ``PDFS``, ...; ``kneebatch engines list`` shows which
    sets take which). ``engines``: a shipped set's name, a set's folder or a folder of sets
    (default: the shipped sets, each study getting the one its roles fit); engines whose recorded
    validation Dice is below 0.5 are refused unless ``allow_low_accuracy``.

    The image is put in kneebatch's canonical voxel order exactly (no resampling), segmented, and
    the label map returned in the image's own voxel order. ``measure``: also the measurements
    (volumes in mm3 and mL, cartilage thickness, QC flags) of a ``measurements.parquet`` row.
    """
    import torch

    from kneebatch.inference.engine_dir import InferenceOptions
    from kneebatch.inference.segment import segment as run_engines

    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"image: [C, Z, Y, X] or [Z, Y, X], not {image.ndim} dimensions")
    roles = [roles] if isinstance(roles, str) else list(roles)
    if len(roles) != image.shape[0]:
        raise ValueError(f"{image.shape[0]} channels but {len(roles)} roles ({', '.join(roles)})")
    if (affine is None) == (nifti_affine is None):
        raise ValueError("give the image's grid: affine (z, y, x -> LPS mm) or nifti_affine (i, j, k -> RAS mm)")
    grid = Grid(tuple(image.shape[1:]), np.asarray(affine_from_nifti(nifti_affine) if affine is None else affine,
                                                   float))
    reorientation = to_canonical(grid)
    canonical, canonical_grid = reorientation.apply(image.astype(np.float32), grid)
    options = InferenceOptions.resolve(engines, backend, device, threads, None, tta,
                                       allow_low_accuracy=allow_low_accuracy)
    options.check()
    sets = options.load_sets()
    sets.verify(options.backend, options.allow_low_accuracy)  # damaged, changed or useless engines: refused
    name, inputs = sets.choose(roles)
    chosen = sets.get(name)
    x = torch.from_numpy(canonical).to(chosen.device)
    labels, info = run_engines(x[inputs], canonical_grid, chosen.coarse, chosen.fine, chosen.config)
    row = None
    if measure:
        from kneebatch.jobs.segment import segmentation_row

        row = segmentation_row("api", labels, x, canonical_grid, roles, info, chosen,
                               "+".join(roles[i] for i in inputs))
    labels = reorientation.invert(labels.cpu().numpy() if hasattr(labels, "cpu") else np.asarray(labels), grid)
    return Segmentation(labels.astype(np.uint8), grid, name, chosen.model_hash, [roles[i] for i in inputs], row)


def open_store(path):
    """A cohort store (made by ``kneebatch convert``) to read: its study keys, images with their
    grids, label maps (:class:`kneebatch.ingest.store.CohortStore`)."""
    from kneebatch.ingest.store import CohortStore

    return CohortStore(path, create=False)


@dataclass
class Results:
    measurements: object  # pandas.DataFrame: one row per study
    failures: object  # pandas.DataFrame: one row per study without a row, with its reason
    provenance: dict  # what ran: engines and their hashes, options, versions


def read_results(out) -> Results:
    """The final tables of a ``run`` or ``measure`` output folder as pandas DataFrames, with its
    provenance (a folder whose job has not finished, or whose shards are not merged, is refused)."""
    import pandas as pd

    out = Path(out)
    if not (out / "provenance.json").exists():
        raise FileNotFoundError(f"{out} has no provenance.json: the job has not finished (or its shards are not "
                                f"merged: kneebatch merge {out})")
    return Results(pd.read_parquet(out / "measurements.parquet"), pd.read_parquet(out / "failures.parquet"),
                   json.loads((out / "provenance.json").read_text()))
