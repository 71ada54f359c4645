"""The engines folder: engine sets, their weights, ONNX exports and the manifests that name their hashes.

The shipped engines folder holds named **sets** (``engines/<set>/``), one coarse + fine pair per
protocol family; ``engines/sets.json`` lists them in order of preference. Each set folder is
a complete engines folder of its own (and a user's folder with an ``engines.json`` is one set)::

    {"config": "model_config.json",
     "coarse": {"safetensors": "coarse.safetensors", "onnx": "coarse.onnx", "sha256": {...}},
     "fine":   {...},
     "set": {"name": ..., "status": "ready" | "preview", "test_dice": {...}},
     "training": {...}}

``run`` takes for each study the set whose ``input_roles`` its series have, preferring more
inputs (:class:`EngineSets`). Every file is checked against its recorded sha256 before it is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from kneebatch.models.config import ModelConfig

SETS_INDEX = "sets.json"


def shipped_engines() -> Path:
    """The engine sets that come with kneebatch: a wheel carries them as package data
    (``kneebatch/engines``); a checkout (editable install) has their source, the top-level
    ``engines/``."""
    packaged = Path(str(resources.files("kneebatch").joinpath("engines")))
    return packaged if (packaged / SETS_INDEX).exists() else Path(__file__).resolve().parents[2] / "engines"


# $KNEEBATCH_ENGINES points elsewhere
DEFAULT_ENGINES = Path(os.environ.get("KNEEBATCH_ENGINES") or shipped_engines())
BACKENDS = ("onnxruntime", "torch", "torch-compile", "tensorrt")
# same-shape inputs per engine call (and studies taken at a time) by default. CPU: 1 (two-core
# VM, 2026-11-30: 2 or 4 gained nothing; benchmarks/README.md). GPU: 4, so the small coarse
# volumes (32 x 64 x 64) fill more of the device per launch; chosen, not yet measured on a GPU.
NET_BATCH = {"cpu": 1, "cuda": 4}
# engines whose recorded validation Dice (either net's, from export-engines) is below this are refused
# unless allowed: a run with them would fill the store and the tables with useless label maps
MIN_VAL_DICE = 0.5
ALLOW_LOW_ACCURACY_ENV = "KNEEBATCH_ALLOW_LOW_ACCURACY"  # "1": as --allow-low-accuracy (test fixtures)


def _low_accuracy_allowed() -> bool:
    return os.environ.get(ALLOW_LOW_ACCURACY_ENV, "") == "1"


@dataclass
class Engines:
    coarse: object
    fine: object
    config: ModelConfig
    backend: str
    hashes: dict  # stage -> sha256 of the file actually loaded
    half: bool = False
    net_batch: int = 1  # same-shape inputs per engine call; studies are taken this many at a time
    name: str = ""  # the engine set's name (its folder's)
    # per tissue: median and MAD of its confidence on held-out studies like those the set was
    # rated on (engines.json, set.confidence; benchmarks/confidence_reference.py); None: not recorded
    confidence_reference: dict | None = None

    @property
    def device(self):
        """The torch device the engines take their input on (where a study's arrays live)."""
        return self.fine.device

    @property
    def model_hash(self) -> str:
        """Weights and config: each changes the label maps (a config sets the crop margins, the
        patch, the input roles), so each is in the hash the rows and label maps carry."""
        return model_hash(self.hashes["coarse"], self.hashes["fine"], self.hashes.get("config"))

    @property
    def label_name(self) -> str:
        """The store's name for this engines' label maps: the model, and the settings that change
        its output (mirror TTA, half precision), so no setting overwrites another's maps."""
        from kneebatch.labels import segmentation_name

        return segmentation_name(self.model_hash) + ("-tta" if self.config.mirror_tta else "") + (
            "-half" if self.half else "")


@dataclass(frozen=True)
class InferenceOptions:
    """How to run the engines: one object from the command line to every worker."""

    engines: str | None = None  # engines folder (None: the shipped engines)
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None  # CPU threads per worker (None: the cores shared between workers)
    half: bool = False  # float16 on GPUs, bfloat16 on CPUs
    tta: bool = False  # mirror test-time augmentation
    net_batch: int | None = None  # inputs per engine call (None: NET_BATCH's default for the device)
    allow_low_accuracy: bool = field(default_factory=_low_accuracy_allowed)  # engines below MIN_VAL_DICE
    model: str | None = None  # another tool's model folder (nnU-Net v2) in the place of the engine sets
    model_roles: tuple[str, ...] | None = None  # the store role of each of its input channels
    label_map: str | None = None  # its label ids -> kneebatch's (ID:LABEL,...), where its names do not say
    model_axis_order: str = "store"  # the voxel order it was trained in: the store's, or e.g. RAS
    model_backend: str = "torch"  # an nnU-Net model's network: its own predictor, or a fast backend

    @classmethod
    def resolve(cls, engines=None, backend: str | None = None, device: str | None = None, threads: int | None = None,
                half: bool | None = None, tta: bool = False, net_batch: int | None = None,
                gpus: str | None = None, allow_low_accuracy: bool = False) -> InferenceOptions:
        """The one place a request becomes options: ``gpus`` means CUDA; on a GPU the compiled
        float16 engines unless a backend is named (ONNX Runtime would need onnxruntime-gpu);
        ``half`` left unset means float16 exactly then. The result is checked and immutable."""
        if gpus is not None and device == "cpu":
            raise ValueError("--gpus runs a dask-cuda cluster on this node's GPUs: leave out --device cpu")
        device = "cuda" if gpus is not None else device or "cpu"
        chosen = backend or ("torch-compile" if device == "cuda" else "onnxruntime")
        half = bool(half) or (half is None and backend is None and device == "cuda")
        return cls(str(engines) if engines else None, chosen, device, threads, half, tta, net_batch,
                   allow_low_accuracy or _low_accuracy_allowed())

    @property
    def precision(self) -> str:
        """What the engines compute in (recorded with the output, as it ran)."""
        if not self.half:
            return "fp32"
        return "fp16" if self.backend == "tensorrt" or self.device.startswith("cuda") else "bf16"

    def check(self, device_here: bool = True) -> None:
        """Refuse what cannot run. ``device_here=False``: the engines run in other processes
        (a dask-cuda cluster's workers), which check the device themselves; this process must
        not start CUDA."""
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.half and self.backend == "onnxruntime":  # it would run, and be recorded as half, in float32
            raise ValueError("--half: ONNX Runtime runs the float32 ONNX files; for half precision use --backend "
                             "torch, torch-compile or tensorrt")
        self.effective_net_batch()
        check_backend(self.backend, self.device if device_here else "cpu")

    def effective_net_batch(self) -> int:
        """Inputs per engine call (and studies taken at a time): the option, or the device's default."""
        if self.net_batch is not None:
            if self.net_batch < 1:
                raise ValueError(f"--net-batch {self.net_batch}: give 1 or more inputs per engine call")
            return self.net_batch
        return NET_BATCH["cuda" if self.device.startswith("cuda") else "cpu"]

    def load_sets(self) -> EngineSets:
        """Every set these options name (each loaded when a study first needs it), or the one
        external model they name (:class:`kneebatch.inference.nnunet.ModelSet`)."""
        if self.model:
            from kneebatch.inference.model_set import ModelSet

            return ModelSet(self.model, list(self.model_roles) if self.model_roles else None, self.label_map,
                            self.device, self.threads, self.tta, self.model_axis_order, self.model_backend,
                            self.net_batch)
        return EngineSets(set_dirs(self.engines), lambda folder: load_engines(
            folder, self.backend, self.device, self.threads, self.half, self.tta, self.effective_net_batch()),
            self.device, self.effective_net_batch())

    def settings(self, sets: EngineSets | None = None) -> dict:
        """What changes the output (recorded with it; a rerun with other settings is refused).
        ``sets``: the sets these options loaded (their manifests and configs, read once)."""
        sets = sets or self.load_sets()
        if self.model:
            return {**sets.settings(), "device": self.device, "mirror_tta": self.tta}
        chosen = {}
        for name in sets.folders:
            manifest = sets.manifests[name]
            # what runs: a set's config may ask for mirror TTA whatever the option says
            chosen[name] = {**{stage: manifest[stage]["sha256"] for stage in ("coarse", "fine")},
                            "config": sets.config_hashes[name], "mirror_tta": self.tta or sets.configs[name].mirror_tta}
        return {"engines": chosen, "backend": self.backend, "device": self.device, "half_precision": self.half,
                "precision": self.precision, "mirror_tta": self.tta}

    def with_cpu_threads(self, cores: int) -> InferenceOptions:
        """The options for a CPU worker with ``cores`` to itself: ``threads`` as given, else those
        cores (explicit in every setting, as the thread count can change the last bits of the logits)."""
        if self.threads is not None or self.device != "cpu":
            return self
        return replace(self, threads=max(1, cores))


def model_hash(coarse: str, fine: str, config: str | None = None) -> str:
    return f"{coarse[:12]}+{fine[:12]}" + (f"+{config[:8]}" if config else "")


def config_hash(folder: Path, manifest: dict | None = None) -> str:
    """The sha256 of a set's ``model_config.json``, checked against the one its ``engines.json``
    records (sets exported before the record existed have none to check: their hash still
    enters the model hash and a run's settings)."""
    from kneebatch.outputs import sha256_file

    manifest = manifest or read_manifest(folder)
    actual = sha256_file(folder / manifest["config"])
    recorded = manifest.get("config_sha256")
    if recorded and actual != recorded:
        raise ValueError(f"engine set {folder.name}: {manifest['config']} does not match the sha256 in its "
                         f"engines.json (changed or damaged); reinstall kneebatch or re-export the engines")
    return actual


def set_dirs(path=None) -> dict[str, Path]:
    """The engine sets ``path`` names, in order of preference: a folder of sets (``sets.json``
    lists them), one set's folder (it has an ``engines.json``), or a shipped set's name."""
    p = Path(path) if path else DEFAULT_ENGINES
    if (p / "engines.json").exists():
        return {p.name: p}
    if (p / SETS_INDEX).exists():
        names = json.loads((p / SETS_INDEX).read_text())["sets"]
        missing = [n for n in names if not (p / n / "engines.json").exists()]
        if missing:
            raise FileNotFoundError(f"{p / SETS_INDEX} lists sets without an engines.json: {', '.join(missing)}")
        return {n: p / n for n in names}
    if path and "/" not in str(path) and (DEFAULT_ENGINES / str(path) / "engines.json").exists():
        return {str(path): DEFAULT_ENGINES / str(path)}
    shipped = ", ".join(json.loads((DEFAULT_ENGINES / SETS_INDEX).read_text())["sets"]) \
        if (DEFAULT_ENGINES / SETS_INDEX).exists() else "none"
    raise FileNotFoundError(f"no engines.json or {SETS_INDEX} in {p} and no shipped engine set of that name (shipped: "
                            f"{shipped}): train with 'kneebatch train' and 'kneebatch export-engines'")


def engines_dir(path=None, name: str | None = None) -> Path:
    """One set's folder: ``path`` itself when it is one, else its set ``name`` (default: the first)."""
    sets = set_dirs(path)
    if name is None:
        return next(iter(sets.values()))
    if name not in sets:
        raise FileNotFoundError(f"no engine set {name!r} in {path or DEFAULT_ENGINES} (sets: {', '.join(sets)})")
    return sets[name]


def read_manifest(path=None) -> dict:
    return json.loads((engines_dir(path) / "engines.json").read_text())


def set_status(manifest: dict) -> str:
    """``ready`` (meets its accuracy targets), ``preview`` (shipped below them, with its table), or
    ``unrated`` (a folder made by export-engines, not rated)."""
    return manifest.get("set", {}).get("status", "unrated")


def half_dtype(device: str):
    """The half precision the torch backends use: float16 on GPUs; bfloat16 on the CPU,
    whose float16 convolutions are slow but whose bfloat16 ones run on AMX / AVX-512 BF16
    units where the CPU has them (about 3x a float32 pass of the fine net on a Xeon with AMX)."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16


def load_engines(path=None, backend: str = "onnxruntime", device: str = "cpu", threads: int | None = None,
                 half: bool = False, tta: bool = False, net_batch: int = 1) -> Engines:
    from kneebatch.inference.engines import OnnxRuntimeEngine, TorchEngine

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    root = engines_dir(path)
    manifest = read_manifest(root)
    cfg = ModelConfig.load(root / manifest["config"])
    cfg = replace(cfg, mirror_tta=cfg.mirror_tta or tta)  # what runs: the set's own TTA, or the option's
    built, hashes = {}, {"config": config_hash(root, manifest)}
    for stage in ("coarse", "fine"):
        entry = manifest[stage]
        net = cfg.coarse if stage == "coarse" else cfg.fine
        if backend == "onnxruntime":
            eng = OnnxRuntimeEngine(root / entry["onnx"], expected_sha256=entry["sha256"][entry["onnx"]], threads=threads,
                                    device=device)
        elif backend == "tensorrt":
            from kneebatch.inference.tensorrt_engine import TensorRTEngine

            eng = TensorRTEngine.from_onnx(root / entry["onnx"], expected_sha256=entry["sha256"][entry["onnx"]],
                                           fp16=half)
        else:
            import torch

            eng = TorchEngine(net, cfg.in_channels, cfg.n_classes, root / entry["safetensors"], device=device,
                              dtype=half_dtype(device) if half else torch.float32, compile=backend == "torch-compile",
                              expected_sha256=entry["sha256"][entry["safetensors"]])
        built[stage], hashes[stage] = eng, eng.sha256
    return Engines(built["coarse"], built["fine"], cfg, backend, hashes, half, net_batch, root.name,
                   manifest.get("set", {}).get("confidence"))


def check_backend(backend: str, device: str) -> None:
    """Refuse, with one line that says what to do, a backend or device this machine cannot run
    (never a silent CPU run recorded as another device)."""
    import importlib.util

    import torch

    if backend == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            raise ValueError("the tensorrt backend needs NVIDIA TensorRT 10 and a CUDA GPU: "
                             "pip install tensorrt (from NVIDIA's package index), or use --backend torch-compile")
        if device != "cuda":
            raise ValueError("the tensorrt backend runs on a GPU only: add --device cuda")
    if backend == "onnxruntime" and device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("--device cuda with --backend onnxruntime needs onnxruntime-gpu (this onnxruntime has "
                             f"{', '.join(ort.get_available_providers())}); or use --backend torch-compile")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA device here; "
                         "use --device cpu, or install a CUDA build of torch on a machine with a GPU")


class EngineSets:
    """Several engine sets, chosen per study by the roles of its series; a set's engines are
    loaded once, when the first study that needs them comes (then kept, e.g. per worker)."""

    def __init__(self, folders: dict[str, Path], loader, device: str = "cpu", net_batch: int = 1,
                 configs: dict | None = None, loaded: dict | None = None):
        import threading

        import torch

        self.folders, self._loader = dict(folders), loader
        # each set's engines.json read once: the run's settings, provenance and checks use these
        self.manifests = {n: read_manifest(d) for n, d in self.folders.items() if d is not None}
        self.configs = configs or {n: ModelConfig.load(d / self.manifests[n]["config"]) for n, d in self.folders.items()}
        self.config_hashes = {n: config_hash(d, self.manifests[n]) for n, d in self.folders.items() if d is not None}
        self._loaded: dict[str, Engines] = dict(loaded or {})
        self._lock = threading.Lock()
        self.device, self.net_batch = torch.device(device), net_batch  # every set's: the options'

    @classmethod
    def of(cls, engines: Engines) -> EngineSets:
        """One set already loaded (what a caller holding a single :class:`Engines` passes)."""
        engines.name = name = engines.name or "engines"
        return cls({name: None}, None, str(engines.device), engines.net_batch, {name: engines.config}, {name: engines})

    def choose(self, channels) -> tuple[str, list[int]]:
        """The set for a study with these ``channels`` (roles) and its input channels: of the sets
        whose inputs the study has, the one with the most inputs (the first listed on a tie).
        Raises ``unsupported_contrast`` naming the study's roles and every set's needs."""
        from kneebatch.errors import StudyError

        fits = []
        for name, cfg in self.configs.items():
            try:
                fits.append((name, cfg.input_channels(channels)))
            except StudyError:
                continue
        if not fits:
            need = "; ".join(f"{n} needs {cfg.needs()}" for n, cfg in self.configs.items())
            raise StudyError("unsupported_contrast", f"found {', '.join(channels) or 'no series'}; engine sets: {need}")
        # a net over every series (per_series) takes whatever comes: a set made for the study's series wins
        return max(fits, key=lambda f: (not self.configs[f[0]].per_series, len(f[1])))  # the first of equals

    def get(self, name: str) -> Engines:
        """The set's engines, loaded on first use; a set that failed to load fails every study
        that needs it with the same error, without loading (hashing, building) it again."""
        with self._lock:
            if name not in self._loaded:
                try:
                    engines = self._loader(self.folders[name])
                    engines.name = name
                except Exception as e:  # noqa: BLE001 - each study that needs the set says why
                    engines = e
                self._loaded[name] = engines
            if isinstance(self._loaded[name], Exception):
                raise self._loaded[name]
            return self._loaded[name]

    def verify(self, backend: str, allow_low_accuracy: bool = False) -> None:
        """Every file ``backend`` loads, of every set, against its recorded sha256, and each set's
        recorded validation Dice against :data:`MIN_VAL_DICE` (unless ``allow_low_accuracy``): before
        a run starts, so a tampered, missing or useless engine stops it in one line, not study by study."""
        from kneebatch.outputs import sha256_file

        for name, manifest in self.manifests.items():
            scores = {stage: manifest[stage].get("val_score") for stage in ("coarse", "fine")}
            low = {stage: v for stage, v in scores.items() if v is not None and v < MIN_VAL_DICE}
            if low and not allow_low_accuracy:
                said = ", ".join(f"{stage} {v:.3f}" for stage, v in low.items())
                raise ValueError(f"engine set {name}: validation Dice {said} recorded at export is below "
                                 f"{MIN_VAL_DICE}; its label maps would be useless. Train it longer, or add "
                                 f"--allow-low-accuracy to run it anyway")

        kind = "onnx" if backend in ("onnxruntime", "tensorrt") else "safetensors"
        for name, folder in self.folders.items():
            if folder is None:
                continue
            manifest = self.manifests[name]
            config_hash(folder, manifest)
            for stage in ("coarse", "fine"):
                file = folder / manifest[stage][kind]
                if not file.exists():
                    raise FileNotFoundError(f"engine set {name}: {file.name} is missing from {folder}")
                if sha256_file(file) != manifest[stage]["sha256"][file.name]:
                    raise ValueError(f"engine set {name}: {file.name} does not match the sha256 in its engines.json "
                                     f"(changed or damaged); reinstall kneebatch or re-export the engines")


def describe_sets(path=None) -> list[dict]:
    """One line's worth per set (``kneebatch engines list``): what it takes and how good it is."""
    rows = []
    for name, folder in set_dirs(path).items():
        manifest = read_manifest(folder)
        block = manifest.get("set", {})
        cfg = ModelConfig.load(folder / manifest["config"])
        dice = block.get("test_dice") or {}
        rows.append({"name": name, "status": set_status(manifest), "needs": cfg.needs(), "what": block.get("what", ""),
                     "mean_dice": sum(dice.values()) / len(dice) if dice else None,
                     "evaluated_on": block.get("evaluated_on", ""), "test_dice": dice,
                     "model_hash": model_hash(manifest["coarse"]["sha256"][manifest["coarse"]["onnx"]],
                                              manifest["fine"]["sha256"][manifest["fine"]["onnx"]],
                                              config_hash(folder, manifest)),
                     "folder": str(folder)})
    return rows
