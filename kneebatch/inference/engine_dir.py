"""The engines folder: weights, ONNX exports and the manifest that names their hashes.

``engines/engines.json``::

    {"config": "model_config.json",
     "coarse": {"safetensors": "coarse.safetensors", "onnx": "coarse.onnx", "sha256": {...}},
     "fine":   {...},
     "training": {...}}

Every file is checked against its recorded sha256 before it is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kneebatch.models.config import ModelConfig


def shipped_engines() -> Path:
    """The engines that come with kneebatch: a wheel carries them as package data
    (``kneebatch/engines``); a checkout (editable install) has their source, the top-level
    ``engines/``."""
    packaged = Path(str(resources.files("kneebatch").joinpath("engines")))
    return packaged if (packaged / "engines.json").exists() else Path(__file__).resolve().parents[2] / "engines"


# $KNEEBATCH_ENGINES points elsewhere
DEFAULT_ENGINES = Path(os.environ.get("KNEEBATCH_ENGINES") or shipped_engines())
BACKENDS = ("onnxruntime", "torch", "torch-compile", "tensorrt")
# same-shape inputs per engine call (and studies taken at a time) by default. CPU: 1 (two-core
# VM, 2026-11-30: 2 or 4 gained nothing; benchmarks/README.md). GPU: 4, so the small coarse
# volumes (32 x 64 x 64) fill more of the device per launch; chosen, not yet measured on a GPU.
NET_BATCH = {"cpu": 1, "cuda": 4}


@dataclass
class Engines:
    coarse: object
    fine: object
    config: ModelConfig
    backend: str
    hashes: dict  # stage -> sha256 of the file actually loaded
    half: bool = False
    net_batch: int = 1  # same-shape inputs per engine call; studies are taken this many at a time

    @property
    def device(self):
        """The torch device the engines take their input on (where a study's arrays live)."""
        return self.fine.device

    @property
    def model_hash(self) -> str:
        return f"{self.hashes['coarse'][:12]}+{self.hashes['fine'][:12]}"

    @property
    def label_name(self) -> str:
        """The store's name for this engines' label maps: the model, and the settings that change
        its output (mirror TTA, half precision), so no setting overwrites another's maps."""
        from kneebatch.ingest.store import segmentation_name

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

    def check(self, device_here: bool = True) -> None:
        """Refuse what cannot run. ``device_here=False``: the engines run in other processes
        (a dask-cuda cluster's workers), which check the device themselves; this process must
        not start CUDA."""
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        self.effective_net_batch()
        check_backend(self.backend, self.device if device_here else "cpu")

    def load(self) -> Engines:
        return load_engines(self.engines, self.backend, self.device, self.threads, self.half, self.tta,
                            self.effective_net_batch())

    def effective_net_batch(self) -> int:
        """Inputs per engine call (and studies taken at a time): the option, or the device's default."""
        if self.net_batch is not None:
            if self.net_batch < 1:
                raise ValueError(f"--net-batch {self.net_batch}: give 1 or more inputs per engine call")
            return self.net_batch
        return NET_BATCH["cuda" if self.device.startswith("cuda") else "cpu"]

    def settings(self) -> dict:
        """What changes the output (recorded with it; a rerun with other settings is refused)."""
        manifest = read_manifest(self.engines)
        return {"engines": {stage: manifest[stage]["sha256"] for stage in ("coarse", "fine")},
                "backend": self.backend, "device": self.device, "half_precision": self.half, "mirror_tta": self.tta}


def engines_dir(path=None) -> Path:
    p = Path(path) if path else DEFAULT_ENGINES
    if not (p / "engines.json").exists():
        raise FileNotFoundError(f"no engines.json in {p}: train with 'kneebatch train' and 'kneebatch export-engines'")
    return p


def read_manifest(path=None) -> dict:
    return json.loads((engines_dir(path) / "engines.json").read_text())


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
    cfg.mirror_tta = cfg.mirror_tta or tta
    built, hashes = {}, {}
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
    return Engines(built["coarse"], built["fine"], cfg, backend, hashes, half, net_batch)


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
