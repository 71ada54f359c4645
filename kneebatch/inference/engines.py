"""Inference backends behind one interface: ``engine(x) -> logits``.

``x`` is a float32 torch tensor ``[N, C, Z, Y, X]`` on ``engine.device``; the logits come
back as a torch tensor on the same device, so the pipeline around an engine is the
same for every backend. Engines are built once per worker (see
:mod:`kneebatch.distributed.plugin`) and checked against their recorded hashes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from kneebatch.models.checkpoints import load_weights, sha256_file
from kneebatch.models.config import build_network


class EngineHashMismatch(RuntimeError):
    pass


def verify_hash(path, expected: str | None) -> str:
    actual = sha256_file(path)
    if expected and actual != expected:
        raise EngineHashMismatch(f"{Path(path).name}: sha256 {actual[:12]}… does not match the recorded {expected[:12]}…")
    return actual


# A compiled engine sees each fine crop padded up to one of these sizes per axis (in units
# of the net's divisor): steps of at most 25 %, so a cohort's crops share a few dozen
# static shapes, each compiled (and on a GPU, CUDA-graph captured) once per worker and
# batch size (--net-batch).
BUCKET_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128)


def bucket_shape(shape, divisor) -> tuple[int, ...]:
    """The smallest bucket holding ``shape`` (each axis a multiple of its ``divisor``)."""
    out = []
    for n, d in zip(shape, divisor):
        units = -(-int(n) // int(d))
        step = next((b for b in BUCKET_STEPS if b >= units), None)
        out.append(d * (step if step is not None else -(-units // 32) * 32))
    return tuple(out)


def compile_model(model: torch.nn.Module, device: torch.device):
    """``torch.compile`` (Inductor) for inference on ``device``, one static graph per bucket.

    On a GPU, CUDA graphs (``reduce-overhead``). On the CPU, Inductor's ``freezing``:
    batch norm folded into the convolutions and the weights pre-packed for oneDNN; the
    fine net then ran 1.15-1.3x ONNX Runtime's speed on a 2-core EPYC at bucket shapes
    (benchmarks/README.md), after ~20 s of compiling per bucket. (Dynamic shapes were
    faster still but failed to compile for some crop sizes in torch 2.13.) ``freezing`` is
    an Inductor setting of the whole process: kneebatch compiles only for inference.
    """
    import torch._dynamo.config as dynamo

    dynamo.recompile_limit = max(dynamo.recompile_limit, 256)
    if device.type == "cuda":
        return torch.compile(model, dynamic=False, mode="reduce-overhead")
    import torch._inductor.config as inductor

    inductor.freezing = True
    return torch.compile(model, dynamic=False)


class TorchEngine:
    """Eager (or ``torch.compile``d) MONAI network from safetensors weights."""

    name = "torch"

    def __init__(self, net_cfg, in_channels: int, n_classes: int, weights, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool = False, expected_sha256: str | None = None):
        self.sha256 = verify_hash(weights, expected_sha256)
        self.device = torch.device(device)
        self.dtype = dtype
        model = build_network(net_cfg, in_channels, n_classes)
        state, _ = load_weights(weights)
        model.load_state_dict(state)
        self.model = model.to(self.device, dtype).eval()
        self.forward = compile_model(self.model, self.device) if compile else self.model
        self.buckets = compile  # static shapes: a compiled graph per bucket
        # a compiled engine's first call of each input shape compiles (and captures) its graph:
        # a one-off cost that a run reports apart from the per-study work
        self.compile_seconds = 0.0
        self._shapes_seen = set()

    @classmethod
    def from_module(cls, model: torch.nn.Module, device: str = "cpu") -> TorchEngine:
        self = cls.__new__(cls)
        self.sha256, self.device, self.dtype = "in-memory", torch.device(device), torch.float32
        self.model = self.forward = model.eval()
        self.buckets = False
        self.compile_seconds, self._shapes_seen = 0.0, set()
        return self

    def input_shape(self, shape, divisor) -> tuple[int, ...]:
        """The spatial shape a crop of ``shape`` (padded to ``divisor``) is run at."""
        return bucket_shape(shape, divisor) if self.buckets else tuple(shape)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        first = self.buckets and tuple(x.shape) not in self._shapes_seen
        t = time.perf_counter()
        out = self.forward(x.to(self.device, self.dtype))
        if self.buckets and self.device.type == "cuda" and out.dtype == torch.float32:
            out = out.clone()  # a CUDA graph's output buffer is overwritten by its next replay
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._shapes_seen.add(tuple(x.shape))
            self.compile_seconds += time.perf_counter() - t
        return out.float()


class OnnxRuntimeEngine:
    """ONNX Runtime session (CPU by default; CUDA provider when asked and available)."""

    name = "onnxruntime"

    def __init__(self, path, expected_sha256: str | None = None, threads: int | None = None, device: str = "cpu"):
        import onnxruntime as ort

        self.sha256 = verify_hash(path, expected_sha256)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.device = torch.device(device)
        self.device_id = self.device.index or 0
        if self.device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self.device_id})]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        if self.device.type == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ONNX Runtime falls back to the CPU quietly; a run recorded as cuda must not
            raise ValueError("--device cuda: ONNX Runtime could not start its CUDA provider (onnxruntime-gpu and a "
                             "matching CUDA are needed); use --backend torch-compile")
        self.input_name = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return self._on_device(x)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)})[0]
        return torch.from_numpy(out)

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        """Input and logits stay in GPU memory (I/O binding on torch's buffers): no host copy."""
        x = x.detach().to(self.device, torch.float32).contiguous()
        out = torch.empty((x.shape[0], self.output.shape[1], *x.shape[2:]), device=self.device, dtype=torch.float32)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", self.device_id, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output.name, "cuda", self.device_id, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # x is written before ONNX Runtime reads it
        self.session.run_with_iobinding(binding)
        return out
