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
- the network is built once per worker and each fold's weights are kept, as nnU-Net does.

The image goes in as the store holds it (``[C, Z, Y, X]``, spacing ``(z, y, x)``): exactly what
nnU-Net's SimpleITK reader gives for the NIfTI ``kneebatch export`` writes of the study. A
model trained on images in another axis order sees its training order only if the store's
does: check one study first (docs/models.md).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kneebatch import labels as L
from kneebatch.geometry import Grid, orientation_direction, to_canonical
from kneebatch.label_sets import parse_label_map

CHECKPOINT = "checkpoint_final.pth"

# names other tools give kneebatch's tissues (TotalSegmentator's MR tasks, SKM-TEA, OAI-ZIB)
ALIASES = {
    "femoral cartilage": "femoral_cartilage", "tibial cartilage medial": "medial_tibial_cartilage",
    "tibial cartilage lateral": "lateral_tibial_cartilage", "medial tibial cartilage": "medial_tibial_cartilage",
    "lateral tibial cartilage": "lateral_tibial_cartilage", "patellar cartilage": "patellar_cartilage",
    "meniscus medial": "medial_meniscus", "meniscus lateral": "lateral_meniscus",
    "medial meniscus": "medial_meniscus", "lateral meniscus": "lateral_meniscus",
    "quadriceps femoris": "quadriceps_muscle", "quadriceps": "quadriceps_muscle",
    "thigh posterior compartment": "hamstring_muscle", "hamstrings": "hamstring_muscle",
    "gastrocnemius": "gastrocnemius_muscle", "subcutaneous fat": "subcutaneous_fat",
    "joint effusion": "effusion", "femur bone": "femur", "tibia bone": "tibia",
}


def _canonical(name: str) -> str:
    name = name.lower().replace("_", " ").replace("-", " ").strip()
    for side in (" left", " right"):  # TotalSegmentator names both legs' muscles; a knee has one
        name = name.removesuffix(side)
    return " ".join(name.split())


def label_lut(labels: dict, label_map: str | None = None) -> np.ndarray:
    """Lookup: the model's label id -> kneebatch's, from ``dataset.json``'s ``labels`` (names of
    the schema or of :data:`ALIASES`) or an explicit ``--label-map ID:LABEL,...`` translation.
    An unmapped label is an error that lists every one."""
    ids = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ValueError(f"nnU-Net model: label {name!r} is a region ({value}); region-based models are not "
                             "supported")
        ids[int(value)] = name
    explicit = parse_label_map(label_map) if label_map else {}
    lut = np.zeros(max(ids) + 1, np.uint8)
    unmapped = []
    for i, name in ids.items():
        if i == 0:
            continue
        if i in explicit:
            lut[i] = explicit[i]
            continue
        wanted = _canonical(name)
        known = {_canonical(label.name): label.id for label in L.LABELS}
        target = known.get(wanted) or (L.by_name(ALIASES[wanted]).id if wanted in ALIASES else None)
        if target is None:
            unmapped.append(f"{i}:{name}")
        else:
            lut[i] = target
    if unmapped:
        raise ValueError(f"nnU-Net model: labels not in kneebatch's schema: {', '.join(unmapped)}; map them with "
                         "--label-map ID:LABEL,... ('kneebatch labels' lists the labels; ID:background drops one)")
    return lut


def model_roles(channel_names: dict, known_roles, channels: str | None = None) -> list[str]:
    """The store role each input channel of the model takes: ``dataset.json``'s ``channel_names``
    where they name a role (``T1``, ``DESS`` ...), else ``--channels 0:DESS,1:PDFS``."""
    known = {r.upper(): r for r in known_roles}
    n = len(channel_names)
    given = {}
    for item in filter(None, (s.strip() for s in (channels or "").split(","))):
        index, _, role = item.partition(":")
        if not index.strip().isdigit() or role.strip().upper() not in known:
            raise ValueError(f"--channels: {item!r} is not INDEX:ROLE with a role of {', '.join(known.values())}")
        given[int(index)] = known[role.strip().upper()]
    if given and sorted(given) != list(range(n)):
        raise ValueError(f"--channels names channels {sorted(given)}; the model takes {n}: 0..{n - 1}")
    if given:
        return [given[i] for i in range(n)]
    roles = []
    for i in range(n):
        name = str(channel_names[str(i)])
        if name.upper() not in known:
            raise ValueError(f"nnU-Net model: input channel {i} is {name!r}, not a role of the store "
                             f"({', '.join(known.values())}); say which with --channels {i}:ROLE")
        roles.append(known[name.upper()])
    return roles


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
            f"({first[:160]}). If you trust it, re-save what inference needs: python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False); torch.save({{k: c[k] for k in ('network_weights', "
            f"'init_args', 'trainer_name', 'inference_allowed_mirroring_axes') if k in c}}, '{path}.weights')\" "
            f"and name it with --checkpoint {path.name}.weights") from None


@dataclass
class NnUNetFolder:
    """What a model folder declares, read without nnunetv2."""

    path: Path
    dataset: dict
    plans: dict
    folds: list[str]
    checkpoint: str
    files: list[Path] = field(default_factory=list)

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
        return cls(path, dataset, plans, use, checkpoint, files)

    @property
    def name(self) -> str:
        """``Dataset123_Knee/nnUNetTrainer__nnUNetPlans__3d_fullres``: what nnU-Net calls it."""
        return f"{self.path.parent.name}/{self.path.name}"

    def sha256(self) -> dict[str, str]:
        out = {}
        for f in self.files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[str(f.relative_to(self.path))] = h.hexdigest()
        return out


class NnUNetModel:
    """A loaded nnU-Net model: ``segment`` takes a study's image and gives kneebatch labels."""

    kind = "nnunet"

    def __init__(self, folder: NnUNetFolder, roles: list[str], lut: np.ndarray, device: str = "cpu",
                 tta: bool = True, tile_step_size: float = 0.5, threads: int | None = None,
                 axis_order: str = "store"):
        self.folder, self.roles, self.lut = folder, roles, lut
        # the voxel order the model was trained in: the store's, or a NIfTI orientation code
        self.axis_order = axis_order if axis_order == "store" else axis_order.upper()
        self._target = None if axis_order == "store" else orientation_direction(axis_order)
        self.device_name, self.tta, self.tile_step_size, self.threads = device, tta, tile_step_size, threads
        self.hashes = folder.sha256()
        self.name = f"nnunet:{folder.name}"
        self._predictor = None
        self._lock = threading.Lock()  # one study at a time through the predictor's network

    @property
    def model_hash(self) -> str:
        digest = hashlib.sha256(json.dumps(self.hashes, sort_keys=True).encode()).hexdigest()
        return f"nnunet-{digest[:16]}"

    @property
    def label_name(self) -> str:
        return L.segmentation_name(self.model_hash) + ("" if self.tta else "-notta")

    @property
    def covered(self) -> set[int]:
        """kneebatch label ids the model segments."""
        return {int(v) for v in self.lut[1:] if v}

    @property
    def device(self):
        import torch

        return torch.device(self.device_name)

    def predictor(self):
        if self._predictor is None:
            self._predictor = build_predictor(self.folder, self.device_name, self.tta, self.tile_step_size)
        return self._predictor

    def segment(self, image: np.ndarray, grid: Grid) -> np.ndarray:
        """kneebatch labels (uint8, on ``grid``) of ``image`` ``[C, Z, Y, X]`` (the model's channels,
        in its order) on ``grid``: brought to the model's axis order by an exact permutation and
        flips (no resampling), segmented, and brought back."""
        if self._target is None:
            return self._segment(image, grid.spacing)
        turn = to_canonical(grid, self._target)
        turned, turned_grid = turn.apply(image, grid)
        return turn.invert(self._segment(turned, turned_grid.spacing), turned_grid)

    def _segment(self, image: np.ndarray, spacing_zyx) -> np.ndarray:
        import torch

        with self._lock:
            predictor = self.predictor()
            before = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                seg = predictor.predict_single_npy_array(np.ascontiguousarray(image, dtype=np.float32),
                                                         {"spacing": [float(s) for s in spacing_zyx]})
            finally:
                torch.set_num_threads(before)
        seg = np.asarray(seg)
        if seg.max(initial=0) >= len(self.lut):
            raise ValueError(f"the model predicted label {int(seg.max())}, beyond its dataset.json")
        return self.lut[seg]


def build_predictor(folder: NnUNetFolder, device: str = "cpu", tta: bool = True, tile_step_size: float = 0.5):
    """nnU-Net's predictor for the folder, as ``initialize_from_trained_model_folder`` builds it,
    but with the checkpoints read as weights only."""
    import inspect

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoints = [load_checkpoint(folder.path / f"fold_{f}" / folder.checkpoint) for f in folder.folds]
    first = checkpoints[0]
    configuration = first["init_args"]["configuration"]
    plans_manager = PlansManager(folder.plans)
    config = plans_manager.get_configuration(configuration)
    if len(config.patch_size) != 3:
        raise ValueError(f"{folder.name}: configuration {configuration} is 2-D; kneebatch runs 3-D models")
    if config.previous_stage_name is not None:
        raise ValueError(f"{folder.name}: configuration {configuration} is a cascade stage (after "
                         f"{config.previous_stage_name}); cascades are not supported yet")
    n_in = determine_num_input_channels(plans_manager, config, folder.dataset)
    n_out = plans_manager.get_label_manager(folder.dataset).num_segmentation_heads
    trainer = recursive_find_trainer_class_by_name(first["trainer_name"])
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
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=device != "cpu", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, config, parameters, folder.dataset, first["trainer_name"],
                                    first.get("inference_allowed_mirroring_axes"))
    return predictor


class ModelSet:
    """One external model in the place of kneebatch's engine sets (what ``run`` asks of them):
    each study whose series have the model's roles goes to it; the model loads once per process."""

    net_batch = 1

    def __init__(self, path, roles: list[str] | None = None, label_map: str | None = None, device: str = "cpu",
                 threads: int | None = None, tta: bool = False, axis_order: str = "store", folds=None,
                 checkpoint: str = CHECKPOINT):
        import torch

        folder = NnUNetFolder.read(path, folds, checkpoint)
        roles = roles or [str(folder.dataset["channel_names"][str(i)]).upper()
                          for i in range(len(folder.dataset["channel_names"]))]
        self.model = NnUNetModel(folder, roles, label_lut(folder.dataset["labels"], label_map), device, tta,
                                 threads=threads, axis_order=axis_order)
        self.folders = {self.model.name: folder.path}
        self.device = torch.device(device)

    def choose(self, channels) -> tuple[str, list[int]]:
        from kneebatch.errors import StudyError

        absent = [r for r in self.model.roles if r not in channels]
        if absent:
            raise StudyError("missing_role", f"found {', '.join(channels) or 'no series'}; the model "
                                             f"{self.model.folder.name} takes {' + '.join(self.model.roles)}")
        return self.model.name, [list(channels).index(r) for r in self.model.roles]

    def get(self, name: str) -> NnUNetModel:
        return self.model

    def verify(self, backend: str = "", allow_low_accuracy: bool = False) -> None:
        """nnunetv2 importable and the model's network buildable, before anything is written."""
        import importlib.util

        if importlib.util.find_spec("nnunetv2") is None:
            raise ValueError("--model with an nnU-Net folder needs nnunetv2: pip install 'kneebatch[nnunet]' "
                             "torch==2.13.0 (or your own torch)")
        self.model.predictor()

    def settings(self) -> dict:
        """What changes the labels: the files, the roles, the label translation, the mirroring."""
        m = self.model
        return {"model": {"kind": m.kind, "name": m.folder.name, "files": m.hashes, "roles": m.roles,
                          "folds": m.folder.folds, "label_lut": m.lut.tolist(), "mirror_tta": m.tta,
                          "axis_order": m.axis_order}}
