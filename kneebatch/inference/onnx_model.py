"""An ONNX network with a small JSON spec as a kneebatch engine.

The folder holds the network (``model.onnx``, exported from any framework) and ``model.json``,
which says what the network needs that the file cannot::

    {"kind": "onnx", "onnx": "model.onnx",
     "input_roles": ["DESS"],                       # the store's series, one per input channel
     "labels": {"background": 0, "femur": 1, ...},  # its output channels (names as in run --model)
     "spacing_mm": [0.7, 0.5, 0.5],                 # the voxel size it was trained at (its axis order)
     "patch_size": [32, 96, 96], "overlap": 0.5,    # its sliding window
     "normalisation": "zscore",                      # zscore | percentile (0.5-99.5 % to 0-1) | none
     "axis_order": "store"}                          # or a NIfTI code (RAS ...): the order it was trained in

Inference (the same for any network, so the ONNX export and its framework source give the same
labels): each channel normalised over the whole image, the image resampled (trilinear) to
``spacing_mm``, MONAI's sliding window with Gaussian weighting, mirrored along every axis
with ``--tta``, the logits resampled back to the study's grid, argmax.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kneebatch.inference.external import ExternalModel, label_lut
from kneebatch.outputs import sha256_file

NORMALISATIONS = ("zscore", "percentile", "none")


@dataclass(frozen=True)
class OnnxSpec:
    folder: Path
    onnx: str
    input_roles: list[str]
    labels: dict
    patch_size: list[int]
    spacing_mm: list[float] | None = None
    overlap: float = 0.5
    normalisation: str = "zscore"
    axis_order: str = "store"

    @classmethod
    def read(cls, folder) -> OnnxSpec:
        folder = Path(folder)
        try:
            raw = json.loads((folder / "model.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{folder}/model.json cannot be read as JSON ({e})") from None
        need = ("onnx", "input_roles", "labels", "patch_size")
        missing = [k for k in need if k not in raw]
        if missing or raw.get("kind", "onnx") != "onnx":
            raise ValueError(f"{folder}/model.json: an ONNX model's spec needs kind 'onnx' and "
                             f"{', '.join(need)} (missing: {', '.join(missing) or 'none'}; docs/models.md)")
        spec = cls(folder, raw["onnx"], [str(r) for r in raw["input_roles"]], raw["labels"],
                   [int(p) for p in raw["patch_size"]], raw.get("spacing_mm"), float(raw.get("overlap", 0.5)),
                   raw.get("normalisation", "zscore"), raw.get("axis_order", "store"))
        if spec.normalisation not in NORMALISATIONS:
            raise ValueError(f"{folder}/model.json: normalisation {spec.normalisation!r} is not one of "
                             f"{', '.join(NORMALISATIONS)}")
        if len(spec.patch_size) != 3 or (spec.spacing_mm is not None and len(spec.spacing_mm) != 3):
            raise ValueError(f"{folder}/model.json: patch_size and spacing_mm are three numbers (z, y, x)")
        if not (folder / spec.onnx).is_file():
            raise ValueError(f"{folder}: no {spec.onnx}, the network model.json names")
        return spec


def normalise(x, how: str):
    """Each channel of ``x`` ``[1, C, Z, Y, X]`` (torch) over the whole image."""
    import torch

    if how == "none":
        return x
    out = []
    for c in range(x.shape[1]):
        v = x[:, c:c + 1]
        if how == "zscore":
            out.append((v - v.mean()) / max(float(v.std()), 1e-8))
        else:
            lo, hi = np.percentile(v.numpy(), [0.5, 99.5])
            out.append((v.clamp(float(lo), float(hi)) - float(lo)) / max(float(hi - lo), 1e-8))
    return torch.cat(out, dim=1)


class OnnxModel(ExternalModel):
    kind = "onnx"

    def __init__(self, spec: OnnxSpec, roles: list[str], lut: np.ndarray, device: str = "cpu",
                 threads: int | None = None, tta: bool = False, axis_order: str = "store"):
        super().__init__(roles, lut, device, threads, axis_order if axis_order != "store" else spec.axis_order, tta)
        self.spec = spec
        self.hashes = {name: sha256_file(spec.folder / name) for name in ("model.json", spec.onnx)}
        self.name = f"onnx:{spec.folder.name}"
        self.network = None  # loaded on first use; any callable [N, C, z, y, x] -> logits (tensors)

    @classmethod
    def open(cls, path, roles=None, label_map=None, device="cpu", threads=None, tta=False,
             axis_order="store") -> OnnxModel:
        spec = OnnxSpec.read(path)
        return cls(spec, roles or [r.upper() for r in spec.input_roles], label_lut(spec.labels, label_map), device,
                   threads, tta, axis_order)

    def verify(self) -> None:
        self._net()

    def _net(self):
        if self.network is None:
            from kneebatch.inference.engines import OnnxRuntimeEngine

            self.network = OnnxRuntimeEngine(self.spec.folder / self.spec.onnx,
                                             expected_sha256=self.hashes[self.spec.onnx], threads=self.threads,
                                             device=self.device_name)
        return self.network

    def describe(self) -> dict:
        return {**super().describe(), "spec": {k: v for k, v in self.spec.__dict__.items() if k != "folder"}}

    def _segment(self, image: np.ndarray, spacing_zyx: list[float]) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        from monai.inferers import sliding_window_inference

        net = self._net()
        shape = image.shape[1:]
        with torch.inference_mode():
            x = normalise(torch.from_numpy(image)[None], self.spec.normalisation)
            if self.spec.spacing_mm:
                size = [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing_zyx, self.spec.spacing_mm)]
                x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
            flips = [()] + ([c for k in (1, 2, 3) for c in itertools.combinations((2, 3, 4), k)] if self.tta else [])
            logits = None
            for axes in flips:
                xi = torch.flip(x, axes) if axes else x
                out = sliding_window_inference(xi, roi_size=self.spec.patch_size, sw_batch_size=1, predictor=net,
                                               overlap=self.spec.overlap, mode="gaussian")
                out = torch.flip(out, axes) if axes else out
                logits = out if logits is None else logits + out
            if tuple(logits.shape[2:]) != tuple(shape):
                logits = F.interpolate(logits, size=list(shape), mode="trilinear", align_corners=False)
            return torch.argmax(logits[0], dim=0).to(torch.uint8).numpy()
