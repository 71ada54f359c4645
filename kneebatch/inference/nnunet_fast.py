"""nnU-Net's predictor with a faster network: its tiles in batches, through ONNX Runtime or a
compiled torch network.

Everything else is nnU-Net's own code: preprocessing (transpose, crop, normalisation,
resampling), the sliding-window tiles and their Gaussian weights, the mirroring, the fp16
accumulation of the logits in nnU-Net's order, and the export back to the source grid. Only the
network's arithmetic differs (another library's kernels, several tiles per call), so the labels
differ from nnU-Net's only where two classes are within rounding of a tie
(``benchmarks/nnunet_model.py`` measures the agreement and the speed).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import warnings

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

FAST_BACKENDS = ("onnxruntime", "torch-compile")


class BatchedPredictor(nnUNetPredictor):
    """An ``nnUNetPredictor`` whose network calls take ``tiles_per_call`` inputs (tiles and their
    mirrored copies) and run on ``backend``: one runner per fold, built once."""

    def __init__(self, backend: str, tiles_per_call: int = 8, threads: int | None = None, **kwargs):
        if backend not in FAST_BACKENDS:
            raise ValueError(f"unknown fast backend {backend!r}; choose from {', '.join(FAST_BACKENDS)}")
        super().__init__(**kwargs)
        self.backend, self.tiles_per_call, self.threads = backend, max(1, tiles_per_call), threads
        self._runners, self._run = [], None

    def manual_initialization(self, network, plans_manager, configuration_manager, parameters, dataset_json,
                              trainer_name, inference_allowed_mirroring_axes):
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)
        shape = (self.tiles_per_call, network_inputs(network), *configuration_manager.patch_size)
        self._runners = [self._runner(network, params, shape) for params in parameters]

    def _runner(self, network, params: dict, shape: tuple):
        """``[N, C, *patch] float32 -> [N, heads, *patch] float32`` for one fold's weights."""
        network.load_state_dict(params)
        network = network.to(self.device).eval()
        if self.backend == "onnxruntime":
            return onnx_runner(network, shape, self.device, self.threads)
        compiled = torch.compile(copy.deepcopy(network), dynamic=False)  # one shape: every call is full

        def run(x):
            with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else contextlib.nullcontext():
                return compiled(x).float()

        return run

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's: each fold's logits over the image, averaged."""
        prediction = None
        for run in self._runners:
            self._run = run
            logits = self.predict_sliding_window_return_logits(data).to("cpu")
            prediction = logits if prediction is None else prediction + logits
        if len(self._runners) > 1:
            prediction /= len(self._runners)
        return prediction

    def _mirror_variants(self) -> list[tuple[int, ...]]:
        """``()`` (the tile itself), then the flips nnU-Net adds, in its order."""
        if not self.use_mirroring or not self.allowed_mirroring_axes:
            return [()]
        axes = [m + 2 for m in self.allowed_mirroring_axes]
        return [(), *(c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1))]

    def _predict_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """nnU-Net's ``_internal_maybe_mirror_and_predict`` for a batch of tiles ``[B, C, *patch]``:
        every flipped copy goes through the network in full calls, then each tile's sum is taken in
        nnU-Net's order and divided as it divides."""
        variants = self._mirror_variants()
        inputs = torch.cat([torch.flip(tiles, a) if a else tiles for a in variants])
        n = self.tiles_per_call
        outputs = []
        for start in range(0, len(inputs), n):
            chunk = inputs[start:start + n]
            short = n - len(chunk)
            if short:  # a full call: the compiled network keeps its one shape
                chunk = torch.cat([chunk, chunk.new_zeros((short, *chunk.shape[1:]))])
            outputs.append(self._run(chunk)[:n - short])
        outputs = torch.cat(outputs).split(len(tiles))
        prediction = outputs[0].clone()
        for axes, out in zip(variants[1:], outputs[1:]):
            prediction += torch.flip(out, axes)
        if len(variants) > 1:
            prediction /= len(variants)
        return prediction

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        """nnU-Net's accumulation (fp16 sums, Gaussian weights, the same order), with the network
        called on batches of tiles."""
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        heads = self.label_manager.num_segmentation_heads
        logits = torch.zeros((heads, *data.shape[1:]), dtype=torch.half, device=results_device)
        counts = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
        gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                    value_scaling_factor=10, device=results_device) if self.use_gaussian else 1
        per_call = max(1, self.tiles_per_call // len(self._mirror_variants()))
        for start in range(0, len(slicers), per_call):
            chunk = slicers[start:start + per_call]
            tiles = torch.stack([data[s] for s in chunk]).to(self.device, torch.float32)
            for s, prediction in zip(chunk, self._predict_tiles(tiles).to(results_device)):
                if self.use_gaussian:
                    prediction *= gaussian
                logits[s] += prediction
                counts[s[1:]] += gaussian
        torch.div(logits, counts, out=logits)
        if torch.any(torch.isinf(logits)):
            raise RuntimeError("inf in the predicted logits (as nnU-Net: its fp16 sums overflowed)")
        return logits


def network_inputs(network) -> int:
    """The input channels of nnU-Net's network (its first convolution's)."""
    first = next(m for m in network.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)))
    return first.in_channels


def onnx_runner(network, shape: tuple, device, threads: int | None):
    """The network as an ONNX Runtime session (exported in memory, batch dimension free)."""
    import onnxruntime as ort

    buffer = io.BytesIO()
    example = torch.zeros(shape, device=device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on instance norm's training mode: inference only here
        torch.onnx.export(network, example, buffer, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(buffer.getvalue(), options, providers=providers)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {"image": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(out).to(x.device)

    return run
