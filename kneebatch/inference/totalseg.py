"""TotalSegmentator's task weights as engines, run with TotalSegmentator's own wrapper steps.

A TotalSegmentator task is a plain nnU-Net v2 folder (``~/.totalsegmentator/nnunet/results/
DatasetNNN_…/<Trainer>__nnUNetPlans__3d_fullres``), but TotalSegmentator does not hand the image
to nnU-Net as it is (``totalsegmentator/nnunet.py`` ``nnUNet_predict_image``, 2.18):

1. the image is turned to nibabel's closest canonical (RAS) voxel order;
2. resampled to the task's isotropic spacing (``ndimage.zoom``, order 1, edges ``nearest``)
   and cast to int32;
3. segmented by nnU-Net without mirroring, with a tile step of 0.8 for the ``total`` and
   ``total_mr`` tasks (0.5 for the others);
4. the labels resampled back to the canonical grid (order 0) and turned back.

This module does those steps with the same nibabel and SciPy calls, in memory, around nnU-Net's
own predictor (:class:`kneebatch.inference.nnunet.NnUNetModel`), so the labels are those
``TotalSegmentator`` writes (tested against its ``nnUNet_predict_image``). Nothing is
downloaded and no usage statistics are sent: the weights are read where they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kneebatch.geometry import Grid, affine_to_nifti
from kneebatch.inference.external import label_lut
from kneebatch.inference.nnunet import NnUNetFolder, NnUNetModel


@dataclass(frozen=True)
class Task:
    name: str  # TotalSegmentator's task (its --task)
    spacing_mm: float  # the isotropic spacing it resamples to
    tile_step: float  # nnU-Net's tile_step_size it asks for


def _task(name: str, spacing_mm: float) -> Task:
    return Task(name, spacing_mm, 0.8 if name in ("total", "total_v3", "total_mr") else 0.5)


# TotalSegmentator 2.18's tasks by dataset id (totalsegmentator/map_tasks_config.py); the knee's
# bones and thigh muscles are in these
TASKS = {
    **{i: _task("total", 1.5) for i in (291, 292, 293, 294, 295)}, 297: _task("total", 3.0), 298: _task("total", 6.0),
    850: _task("total_mr", 1.5), 851: _task("total_mr", 1.5), 852: _task("total_mr", 3.0), 853: _task("total_mr", 6.0),
    304: _task("appendicular_bones", 1.5), 855: _task("appendicular_bones_mr", 1.5),
    857: _task("thigh_shoulder_muscles_mr", 1.5),
}
AUXILIARY = {"appendicular_bones"}  # tasks whose auxiliary labels TotalSegmentator deletes (not run here: say so)


# the dataset folders TotalSegmentator 2.18 downloads them into: a folder is its task's only by
# these names, so that a group's own DatasetNNN with one of those ids stays a plain nnU-Net model
DATASETS = {
    291: "TotalSegmentator_part1_organs_1559subj", 292: "TotalSegmentator_part2_vertebrae_1532subj",
    293: "TotalSegmentator_part3_cardiac_1559subj", 294: "TotalSegmentator_part4_muscles_1559subj",
    295: "TotalSegmentator_part5_ribs_1559subj", 297: "TotalSegmentator_total_3mm_1559subj",
    298: "TotalSegmentator_total_6mm_1559subj", 304: "appendicular_bones_ext_1559subj",
    850: "TotalSegMRI_part1_organs_1088subj", 851: "TotalSegMRI_part2_muscles_1088subj",
    852: "TotalSegMRI_total_3mm_1088subj", 853: "TotalSegMRI_total_6mm_1088subj",
    855: "TotalSegMRI_appendicular_bones_1088subj", 857: "TotalSegMRI_thigh_shoulder_1088subj",
}


def task_of(path) -> Task | None:
    """The TotalSegmentator task whose weights the trained model folder holds (by its dataset
    folder's name, ``DatasetNNN_…/<Trainer>__<Plans>__<conf>``), or None."""
    found = re.match(r"Dataset(\d{3})_(.+)$", Path(path).resolve().parent.name)
    if not found or DATASETS.get(int(found.group(1))) != found.group(2).removesuffix("_v204"):
        return None
    return TASKS.get(int(found.group(1)))


class TotalSegmentatorModel(NnUNetModel):
    """A TotalSegmentator task folder: nnU-Net's predictor inside TotalSegmentator's steps."""

    kind = "totalsegmentator"
    default_folds = (0,)  # TotalSegmentator runs fold 0 of every task (its DEFAULT_CONFIG)

    def __init__(self, folder: NnUNetFolder, *args, **kwargs):
        task = task_of(folder.path)
        if task is None:
            raise ValueError(f"{folder.name} is not a TotalSegmentator task's folder (the dataset folders it "
                             f"downloads: {', '.join(f'Dataset{i}_{n}' for i, n in sorted(DATASETS.items()))})")
        if task.name in AUXILIARY:
            raise ValueError(f"{folder.name}: TotalSegmentator deletes this task's auxiliary labels after predicting; "
                             "kneebatch does not run that step yet")
        kwargs["tile_step_size"] = task.tile_step
        super().__init__(folder, *args, **kwargs)
        if self.axis_order != "store":
            raise ValueError("--axis-order: TotalSegmentator turns every image to RAS itself; leave the option out")
        if self.tta:
            raise ValueError("--tta: TotalSegmentator never mirrors (its trainers are NoMirroring); leave the option out")
        self.task = task
        self.name = f"totalsegmentator:{task.name}:{folder.name}"
        self.axis_order = "RAS"  # TotalSegmentator's closest canonical, whatever the store's order

    @staticmethod
    def labels_of(folder: NnUNetFolder, label_map: str | None) -> np.ndarray:
        """A whole-body task's structures that are not the knee's (organs, spine …) are background."""
        return label_lut(folder.dataset["labels"], label_map, others_background=True)

    def describe(self) -> dict:
        return {**super().describe(), "task": self.task.name, "resample_mm": self.task.spacing_mm,
                "tile_step_size": self.task.tile_step}

    def segment(self, image: np.ndarray, grid: Grid) -> np.ndarray:
        """kneebatch labels on ``grid`` of ``image`` ``[C, Z, Y, X]``, as TotalSegmentator labels
        the NIfTI ``kneebatch export --images`` writes of it."""
        import nibabel as nib

        # the affine as the NIfTI file stores it (float32), which TotalSegmentator reads back
        affine = affine_to_nifti(grid.affine).astype(np.float32).astype(np.float64)
        original = nib.Nifti1Image(np.asarray(image, np.float64)[0].transpose(2, 1, 0), affine)
        canonical = nib.as_closest_canonical(original)
        resampled = change_spacing(canonical, [self.task.spacing_mm] * 3, order=1, dtype=np.int32)
        # as nnU-Net's SimpleITK reader gives the saved file: (z, y, x) float32, its spacing reversed
        data = np.asarray(resampled.dataobj).transpose(2, 1, 0)[None].astype(np.float32)
        spacing = [float(s) for s in resampled.header.get_zooms()[:3]][::-1]
        with self._exclusive():
            predicted = np.asarray(self.predictor().predict_single_npy_array(data, {"spacing": spacing}))
        labels = nib.Nifti1Image(predicted.transpose(2, 1, 0).astype(np.uint8), resampled.affine)
        back = change_spacing(labels, [self.task.spacing_mm] * 3, target_shape=canonical.shape, order=0,
                              dtype=np.uint8, force_affine=canonical.affine)
        turned = back.as_reoriented(nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                                    nib.orientations.io_orientation(original.affine)))
        return self._translated(np.asarray(turned.get_fdata()).astype(np.uint8).transpose(2, 1, 0))


def change_spacing(img, new_spacing, target_shape=None, order: int = 0, dtype=None, force_affine=None):
    """TotalSegmentator's ``resampling.change_spacing`` (its CPU path): ``ndimage.zoom`` with
    ``mode="nearest"``, each axis scaled by old over new spacing (or to ``target_shape``), the
    affine's columns scaled alike."""
    import nibabel as nib
    from scipy import ndimage

    data = img.get_fdata()
    old_shape = np.array(data.shape)
    spacing = np.array(img.header.get_zooms()[:3])
    new_spacing = np.array(new_spacing)
    if target_shape is not None:
        zoom = np.array(target_shape) / old_shape
        new_spacing = spacing / zoom
    else:
        zoom = spacing / new_spacing
    if np.array_equal(spacing, new_spacing):
        return img
    affine = np.copy(img.affine)
    for axis in range(3):
        affine[:3, axis] = affine[:3, axis] / zoom[axis]
    new = ndimage.zoom(data, zoom, mode="nearest", order=order)
    if dtype is not None:
        new = new.astype(dtype)
    return nib.Nifti1Image(new, force_affine if force_affine is not None else affine)
