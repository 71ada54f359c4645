"""Which kind of model a folder holds, and one model standing where ``run`` expects engine sets."""

from __future__ import annotations

from pathlib import Path

from kneebatch.inference.external import ExternalModel
from kneebatch.inference.monai_bundle import MonaiBundle, declared_channels
from kneebatch.inference.nnunet import NnUNetFolder, NnUNetModel
from kneebatch.inference.onnx_model import OnnxModel, OnnxSpec


def open_model(path, roles: list[str] | None = None, label_map: str | None = None, device: str = "cpu",
               threads: int | None = None, tta: bool = False, axis_order: str = "store") -> ExternalModel:
    """The model in folder ``path``, whichever kind: an nnU-Net v2 folder (``dataset.json`` +
    ``plans.json``), an ONNX network with its ``model.json``, or a MONAI bundle (``configs/``)."""
    path = Path(path)
    if (path / "configs").is_dir():
        return MonaiBundle.open(path, roles, label_map, device, threads, tta, axis_order)
    if (path / "model.json").is_file():
        return OnnxModel.open(path, roles, label_map, device, threads, tta, axis_order)
    return NnUNetModel.open(path, roles, label_map, device, threads, tta, axis_order)


def declared_inputs(path) -> dict:
    """``{index: name}`` of a model folder's input channels, as it declares them."""
    path = Path(path)
    if (path / "configs").is_dir():
        return declared_channels(path)
    if (path / "model.json").is_file():
        return {str(i): r for i, r in enumerate(OnnxSpec.read(path).input_roles)}
    return NnUNetFolder.read(path).dataset["channel_names"]


class ModelSet:
    """One external model in the place of kneebatch's engine sets (what ``run`` asks of them):
    each study whose series have the model's roles goes to it; the model loads once per process."""

    net_batch = 1

    def __init__(self, path, roles: list[str] | None = None, label_map: str | None = None, device: str = "cpu",
                 threads: int | None = None, tta: bool = False, axis_order: str = "store"):
        import torch

        self.model = open_model(path, roles, label_map, device, threads, tta, axis_order)
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
