"""TensorRT backend (optional; needs ``tensorrt`` >= 10 and a CUDA GPU).

Builds a plan from the shipped ONNX file with a dynamic-shape optimization profile,
caches it per (GPU, TensorRT version, ONNX sha256, profile, precision) in the user's cache
folder (``$KNEEBATCH_CACHE``, else ``$XDG_CACHE_HOME/kneebatch``, else ``~/.cache/kneebatch``;
never the installed package, which may be read-only or shared), written atomically,
and runs it with ``execute_async_v3`` on torch CUDA tensors, so the pipeline around it
is the same as for the other engines. TensorRT cannot be installed in the project's
own build machines; this backend is written against the TensorRT 10 Python API and
is not exercised by CI.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from kneebatch.inference.engines import verify_hash
from kneebatch.outputs import write_bytes_atomic

# optimization profile over [N, C, Z, Y, X]: min / opt (a typical fine crop on the working
# grid) / max (above segment.WHOLE_CROP_VOXELS the crop goes in windows anyway); C is the
# ONNX file's own channel count. The max batch bounds how many inputs share a call.
PROFILE = ((1, 2, 4, 16, 16), (1, 2, 40, 208, 208), (4, 2, 96, 512, 512))


def cache_dir() -> Path:
    """kneebatch's cache folder for built artefacts (TensorRT plans)."""
    env = os.environ.get("KNEEBATCH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kneebatch"


def plan_path(onnx_path, sha: str, gpu: str, trt_version: str, profile, fp16: bool) -> Path:
    """Where the plan of an ONNX file for this GPU, TensorRT, profile and precision is cached."""
    shape_tag = hashlib.sha256(repr(profile).encode()).hexdigest()[:8]  # another profile, another plan
    return cache_dir() / "tensorrt" / (f"{Path(onnx_path).stem}.{gpu.replace(' ', '_')}.trt{trt_version}.{sha[:12]}"
                                       f".{shape_tag}{'.fp16' if fp16 else ''}.plan")


class TensorRTEngine:
    name = "tensorrt"

    def __init__(self, plan_bytes: bytes, sha256: str):
        import tensorrt as trt

        self.sha256 = sha256
        self.device = torch.device("cuda")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan_bytes)
        self.context = self.engine.create_execution_context()
        self.input_name = self.engine.get_tensor_name(0)
        self.output_name = self.engine.get_tensor_name(1)
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.stream = torch.cuda.Stream()

    @classmethod
    def from_onnx(cls, onnx_path, expected_sha256: str | None = None, fp16: bool = True,
                  profile=PROFILE) -> TensorRTEngine:
        import tensorrt as trt

        sha = verify_hash(onnx_path, expected_sha256)
        cache = plan_path(onnx_path, sha, torch.cuda.get_device_name(), trt.__version__, profile, fp16)
        if cache.exists():
            return cls(cache.read_bytes(), sha)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(Path(onnx_path).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {Path(onnx_path).name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        opt_profile = builder.create_optimization_profile()
        channels = int(network.get_input(0).shape[1])  # static in kneebatch's export
        opt_profile.set_shape(network.get_input(0).name, *((p[0], channels, *p[2:]) for p in profile))
        config.add_optimization_profile(opt_profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError("TensorRT engine build failed")
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache, bytes(plan))  # workers building the same plan each rename a whole file
        return cls(bytes(plan), sha)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, device=self.device, dtype=torch.float32)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        torch.cuda.current_stream().wait_stream(self.stream)
        return out
