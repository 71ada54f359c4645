"""Which kind of model a folder holds, and one model standing where ``run`` expects engine sets."""

from __future__ import annotations

from pathlib import Path

from kneebatch.inference.external import ExternalModel
from kneebatch.inference.monai_bundle import MonaiBundle, declared_channels
from kneebatch.inference.nnunet import EXACT, TILES_PER_CALL, NnUNetFolder, NnUNetModel
from kneebatch.inference.onnx_model import OnnxModel, OnnxSpec
from kneebatch.inference.totalseg import TotalSegmentatorModel, task_of


def model_kind(path) -> str:
    """``monai`` (a bundle: ``configs/``), ``onnx`` (``model.json``) or ``nnunet`` (the rest: an
    nnU-Net v2 folder, checked as it is read)."""
    path = Path(path)
    return "monai" if (path / "configs").is_dir() else "onnx" if (path / "model.json").is_file() else "nnunet"


def check_backend_for(path, backend: str) -> None:
    """Only an nnU-Net model's network runs on another backend; the others run as their tool runs them."""
    if backend != EXACT and model_kind(path) != "nnunet":
        raise ValueError(f"--backend {backend} runs an nnU-Net model's network faster; this {model_kind(path)} model "
                         "runs as its own tool runs it: leave --backend out")


def open_model(path, roles: list[str] | None = None, label_map: str | None = None, device: str = "cpu",
               threads: int | None = None, tta: bool = False, axis_order: str = "store", backend: str = EXACT,
               tiles_per_call: int | None = None) -> ExternalModel:
    """The model in folder ``path``, whichever kind (:func:`model_kind`). ``backend``: how an
    nnU-Net model's network runs."""
    check_backend_for(path, backend)
    kind = model_kind(path)
    if kind == "monai":
        return MonaiBundle.open(path, roles, label_map, device, threads, tta, axis_order)
    if kind == "onnx":
        return OnnxModel.open(path, roles, label_map, device, threads, tta, axis_order)
    # a TotalSegmentator task's weights run inside TotalSegmentator's own steps (its axis order,
    # its fold 0)
    return (TotalSegmentatorModel if task_of(path) is not None else NnUNetModel).open(
        path, roles, label_map, device, threads, tta, axis_order, backend=backend,
        tiles_per_call=tiles_per_call or TILES_PER_CALL)


def declared_inputs(path) -> dict:
    """``{index: name}`` of a model folder's input channels, as it declares them."""
    kind = model_kind(path)
    if kind == "monai":
        return declared_channels(path)
    if kind == "onnx":
        return {str(i): r for i, r in enumerate(OnnxSpec.read(path).input_roles)}
    return NnUNetFolder.read(path).dataset["channel_names"]


class ModelSet:
    """One external model in the place of kneebatch's engine sets (what ``run`` asks of them):
    each study whose series have the model's roles goes to it; the model loads once per process."""

    net_batch = 1

    def __init__(self, path, roles: list[str] | None = None, label_map: str | None = None, device: str = "cpu",
                 threads: int | None = None, tta: bool = False, axis_order: str = "store", backend: str = EXACT,
                 tiles_per_call: int | None = None):
        import torch

        self.model = open_model(path, roles, label_map, device, threads, tta, axis_order, backend, tiles_per_call)
        self.folders = {self.model.name: Path(path)}
        self.device = torch.device(device)

    def choose(self, channels) -> tuple[str, list[int]]:
        from kneebatch.errors import StudyError

        absent = [r for r in self.model.roles if r not in channels]
        if absent:
            raise StudyError("missing_role", f"found {', '.join(channels) or 'no series'}; the model "
                                             f"{self.model.name} takes {' + '.join(self.model.roles)}")
        return self.model.name, [list(channels).index(r) for r in self.model.roles]

    def get(self, name: str) -> ExternalModel:
        return self.model

    def verify(self, backend: str = "", allow_low_accuracy: bool = False) -> None:
        """The model's network loads, before anything is written."""
        self.model.verify()

    def settings(self) -> dict:
        """What changes the labels: the files, the roles, the label translation, the mirroring."""
        return {"model": self.model.describe()}
