"""nnU-Net v2 trained model folders as kneebatch engines.

A folder as nnU-Net writes it (``dataset.json``, ``plans.json``, ``fold_N/checkpoint_final.pth``,
e.g. a group's own model, or a TotalSegmentator task's weights) segments studies of the store
through nnU-Net's own code, in this process: its preprocessing (transpose, crop to non-zero,
normalisation, resampling), sliding window with Gaussian weighting and mirroring, fold
ensembling, and export back to the study's grid (``nnUNetPredictor.predict_single_npy_array``).
Its labels are therefore the ones ``nnUNetv2_predict`` gives for the same image (tested with
``np.array_equal``). The file-based predictor is not used: it starts worker processes, which a
Dask worker (a daemon) may not.

Differences from nnU-Net's own loading, on purpose:

- checkpoints are read with ``torch.load(weights_only=True)`` (tensors, containers, numbers and
  NumPy scalars only), never unpickled as code;
- the network is built once per worker and each fold's weights are kept, as nnU-Net does;
- a cascade runs whole: the folder of its second stage (``3d_cascade_fullres``) brings the first
  (``3d_lowres``, beside it as nnU-Net's trainer leaves it), whose labels go into the second on
  the study's grid, as ``nnUNetv2_predict -prev_stage_predictions`` takes them from files.

The image goes in as the store holds it (``[C, Z, Y, X]``, spacing ``(z, y, x)``): exactly what
nnU-Net's SimpleITK reader gives for the NIfTI ``kneebatch export`` writes of the study. A
model trained on images in another axis order sees its training order only if the store's
does: check one study first (docs/models.md).

``backend`` other than ``torch`` (nnU-Net's own predictor, its labels exactly): the same
predictor with its network run on batches of tiles through ONNX Runtime or a compiled network
(:mod:`kneebatch.inference.nnunet_fast`), equal but for near-ties, and faster.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kneebatch import labels as L
from kneebatch.inference.external import ExternalModel, label_lut
from kneebatch.outputs import sha256_file

CHECKPOINT = "checkpoint_final.pth"
EXACT = "torch"  # nnU-Net's own predictor, unchanged
BACKENDS = (EXACT, "onnxruntime", "torch-compile")
TILES_PER_CALL = 8  # network inputs per call of a fast backend (tiles and their mirrored copies)

def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents without running its pickle as code: tensors, containers, numbers
    and NumPy scalars (nnU-Net's logs hold some) only."""
    import torch

    safe = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]
    try:
        safe.append(np._core.multiarray.scalar)
    except AttributeError:  # NumPy 1.x
        safe.append(np.core.multiarray.scalar)
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError names the object it refused
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path.name}: kneebatch loads weights only, and this checkpoint holds other Python objects "
            f"({first[:160]}). If you trust it, copy the model folder and in the copy re-save what inference "
            f"needs over this file: python -c \"import torch; p = 'COPY/{path.parent.name}/{path.name}'; "
            f"c = torch.load(p, weights_only=False); torch.save({{k: c[k] for k in ('network_weights', "
            f"'init_args', 'trainer_name', 'inference_allowed_mirroring_axes') if k in c}}, p)\"; then run "
            f"--model COPY") from None


@dataclass
class NnUNetFolder:
    """What a model folder declares, read without nnunetv2."""

    path: Path
    dataset: dict
    plans: dict
    folds: list[str]
    checkpoint: str
    files: list[Path] = field(default_factory=list)
    previous: NnUNetFolder | None = None  # a cascade's first stage

    @classmethod
    def read(cls, path, folds=None, checkpoint: str = CHECKPOINT) -> NnUNetFolder:
        path = Path(path)
        missing = [f for f in ("dataset.json", "plans.json") if not (path / f).is_file()]
        if missing:
            raise ValueError(f"{path} is not an nnU-Net v2 model folder: no {' or '.join(missing)} (a trained model "
                             "is <Trainer>__<Plans>__<configuration>/ with dataset.json, plans.json and "
                             f"fold_N/{checkpoint})")
        try:
            dataset = json.loads((path / "dataset.json").read_text())
            plans = json.loads((path / "plans.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: dataset.json or plans.json is not JSON ({e})") from None
        if "configurations" not in plans or "transpose_forward" not in plans:
            raise ValueError(f"{path}/plans.json is not an nnU-Net v2 plans file (no configurations or "
                             "transpose_forward): was it written by nnU-Net v1?")
        found = sorted(p.parent.name.removeprefix("fold_") for p in path.glob(f"fold_*/{checkpoint}"))
        use = [str(f) for f in folds] if folds else found
        absent = [f for f in use if f not in found]
        if not found or absent:
            raise ValueError(f"{path}: no {checkpoint} in fold_{', fold_'.join(absent or ['N'])} (folds with one: "
                             f"{', '.join(found) or 'none'})")
        files = [path / "dataset.json", path / "plans.json"] + [path / f"fold_{f}" / checkpoint for f in use]
        return cls(path, dataset, plans, use, checkpoint, files, cls._previous_stage(path, plans, folds, checkpoint))

    @classmethod
    def _previous_stage(cls, path: Path, plans: dict, folds, checkpoint: str) -> NnUNetFolder | None:
        """The first stage of a cascade, from the folder nnU-Net names ``<Trainer>__<Plans>__<stage>``
        next to this one (None: not a cascade)."""
        trainer, _, configuration = path.name.rpartition("__")
        previous = plans["configurations"].get(configuration, {}).get("previous_stage")
        if previous is None:
            return None
        first = path.parent / f"{trainer}__{previous}"
        if not first.is_dir():
            raise ValueError(f"{path.name} is the second stage of a cascade: its first stage {first.name} must be "
                             f"next to it in {path.parent} (nnU-Net's results layout)")
        return cls.read(first, folds, checkpoint)

    @property
    def name(self) -> str:
        """``Dataset123_Knee/nnUNetTrainer__nnUNetPlans__3d_fullres``: what nnU-Net calls it."""
        return f"{self.path.parent.name}/{self.path.name}"

    def sha256(self) -> dict[str, str]:
        out = {}
        for f in self.files:
            out[str(f.relative_to(self.path))] = sha256_file(f)
        if self.previous is not None:
            out.update({f"{self.previous.path.name}/{k}": v for k, v in self.previous.sha256().items()})
        return out


class NnUNetModel(ExternalModel):
    """A loaded nnU-Net model folder, run through nnU-Net's own predictor."""

    kind = "nnunet"
    default_folds: tuple | None = None  # every fold found, ensembled as nnUNetv2_predict does

    def __init__(self, folder: NnUNetFolder, roles: list[str], lut: np.ndarray, device: str = "cpu",
                 tta: bool = True, tile_step_size: float = 0.5, threads: int | None = None,
                 axis_order: str = "store", backend: str = EXACT, tiles_per_call: int = TILES_PER_CALL):
        super().__init__(roles, lut, device, threads, axis_order, tta)
        if backend not in BACKENDS:
            raise ValueError(f"--backend {backend} for an nnU-Net model: choose {', '.join(BACKENDS)} "
                             f"({EXACT}: nnU-Net's own predictor, its labels exactly)")
        self.folder, self.tile_step_size, self.backend = folder, tile_step_size, backend
        self.tiles_per_call = tiles_per_call
        self.hashes = folder.sha256()
        self.name = f"nnunet:{folder.name}"
        self._predictor = None
        # a cascade's first stage: the same inputs, its own labels never leave this model
        self.previous = None if folder.previous is None else NnUNetModel(
            folder.previous, roles, lut, device, tta, tile_step_size, threads, axis_order, backend, tiles_per_call)

    @classmethod
    def open(cls, path, roles=None, label_map=None, device="cpu", threads=None, tta=False, axis_order="store",
             folds=None, checkpoint: str = CHECKPOINT, backend: str = EXACT,
             tiles_per_call: int = TILES_PER_CALL) -> NnUNetModel:
        folder = NnUNetFolder.read(path, folds if folds is not None else cls.default_folds, checkpoint)
        roles = roles or [str(folder.dataset["channel_names"][str(i)]).upper()
                          for i in range(len(folder.dataset["channel_names"]))]
        return cls(folder, roles, cls.labels_of(folder, label_map), device, tta, threads=threads,
                   axis_order=axis_order, backend=backend, tiles_per_call=tiles_per_call)

    @staticmethod
    def labels_of(folder: NnUNetFolder, label_map: str | None) -> np.ndarray:
        """The model's label ids as kneebatch's (:func:`~kneebatch.inference.external.label_lut`)."""
        return label_lut(folder.dataset["labels"], label_map)

    @property
    def label_name(self) -> str:
        # nnU-Net mirrors by default: its maps without mirroring are the ones named apart; a fast
        # backend's maps (equal but for near-ties) are named apart from the exact ones
        return L.segmentation_name(self.model_hash) + ("" if self.tta else "-notta") + (
            "" if self.backend == EXACT else f"-{self.backend}")

    def predictor(self):
        if self._predictor is None:
            self._predictor = build_predictor(self.folder, self.device_name, self.tta, self.tile_step_size,
                                              self.backend, self.tiles_per_call, self.threads)
        return self._predictor

    def verify(self) -> None:
        import importlib.util

        if importlib.util.find_spec("nnunetv2") is None:
            raise ValueError("--model with an nnU-Net folder needs nnunetv2: pip install 'kneebatch[nnunet]' "
                             "torch==2.13.0 (or your own torch)")
        self.predictor()
        if self.previous is not None:
            self.previous.predictor()

    def describe(self) -> dict:
        first = {} if self.previous is None else {"previous_stage": self.folder.previous.name}
        fast = {} if self.backend == EXACT else {"tiles_per_call": self.tiles_per_call}
        return {**super().describe(), "name": self.folder.name, "folds": self.folder.folds, "backend": self.backend,
                **fast, **first}

    def _segment(self, image: np.ndarray, spacing_zyx: list[float]) -> np.ndarray:
        first = None if self.previous is None else self.previous._segment(image, spacing_zyx)
        if first is not None:  # as nnU-Net reads a previous stage's file: [1, z, y, x], float32
            first = first[None].astype(np.float32)
        return self.predictor().predict_single_npy_array(image, {"spacing": spacing_zyx},
                                                         segmentation_previous_stage=first)


def find_trainer(name: str):
    """nnU-Net's trainer class ``name`` from ``nnunetv2.training.nnUNetTrainer`` and below, as
    nnU-Net's own search finds it, except that a module which fails to import is skipped, not
    fatal: nnunetv2 ships trainers for optional architectures (Primus imports timm, which imports
    torchvision), and a torchvision built for another torch stops nnU-Net's search before it
    reaches variants such as ``nnUNetTrainerNoMirroring`` (TotalSegmentator's)."""
    import importlib
    import pkgutil

    import nnunetv2.training.nnUNetTrainer as package

    try:
        return getattr(importlib.import_module("nnunetv2.training.nnUNetTrainer.nnUNetTrainer"), name)
    except AttributeError:
        pass
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".", onerror=lambda _: None):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # an optional architecture's dependency missing or broken
            continue
        found = getattr(module, name, None)
        if isinstance(found, type):
            return found
    return None


def build_predictor(folder: NnUNetFolder, device: str = "cpu", tta: bool = True, tile_step_size: float = 0.5,
                    backend: str = EXACT, tiles_per_call: int = TILES_PER_CALL, threads: int | None = None):
    """nnU-Net's predictor for the folder, as ``initialize_from_trained_model_folder`` builds it,
    but with the checkpoints read as weights only; with a fast ``backend``, its network runs
    batched tiles there (:mod:`kneebatch.inference.nnunet_fast`)."""
    import inspect

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoints = [load_checkpoint(folder.path / f"fold_{f}" / folder.checkpoint) for f in folder.folds]
    first = checkpoints[0]
    configuration = first["init_args"]["configuration"]
    plans_manager = PlansManager(folder.plans)
    config = plans_manager.get_configuration(configuration)
    if len(config.patch_size) != 3:
        raise ValueError(f"{folder.name}: configuration {configuration} is 2-D; kneebatch runs 3-D models")
    n_in = determine_num_input_channels(plans_manager, config, folder.dataset)
    n_out = plans_manager.get_label_manager(folder.dataset).num_segmentation_heads
    trainer = find_trainer(first["trainer_name"])
    if trainer is None:
        raise ValueError(f"{folder.name}: trainer class {first['trainer_name']} is not in nnunetv2 (a custom trainer "
                         "must be importable: see nnU-Net's share-models-with-custom-trainers)")
    if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
        network = trainer.build_network_architecture(plans_manager, config, n_in, n_out, enable_deep_supervision=False)
    else:  # nnunetv2 < 2.7
        network = trainer.build_network_architecture(config.network_arch_class_name, config.network_arch_init_kwargs,
                                                     config.network_arch_init_kwargs_req_import, n_in, n_out,
                                                     enable_deep_supervision=False)
    parameters = [c["network_weights"] for c in checkpoints]
    network.load_state_dict(parameters[0])
    settings = dict(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=tta,
                    perform_everything_on_device=device != "cpu", device=torch.device(device), verbose=False,
                    verbose_preprocessing=False, allow_tqdm=False)
    # nnU-Net prints its device notes to stdout (a worker's log is no place for them)
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == EXACT:
            predictor = nnUNetPredictor(**settings)
        else:
            from kneebatch.inference.nnunet_fast import BatchedPredictor

            predictor = BatchedPredictor(backend, tiles_per_call, threads, **settings)
        predictor.manual_initialization(network, plans_manager, config, parameters, folder.dataset,
                                        first["trainer_name"], first.get("inference_allowed_mirroring_axes"))
    return predictor


