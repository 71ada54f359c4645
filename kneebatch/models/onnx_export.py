"""A network -> an ONNX file (what ONNX Runtime and TensorRT load)."""

from __future__ import annotations

import torch

from kneebatch.models.checkpoints import sha256_file


def export_onnx(model: torch.nn.Module, path, example_shape, opset: int = 17) -> str:
    """Legacy (TorchScript) exporter: needs no onnxscript; batch and spatial axes dynamic.

    Transposed convolutions go out as sub-pixel convolutions (same output; ONNX
    Runtime's 3-D ``ConvTranspose`` is slow on the CPU, see :mod:`kneebatch.models.subpixel`).
    """
    import warnings

    from kneebatch.models.subpixel import without_transposed_convs

    model = without_transposed_convs(model.eval().cpu())
    example = torch.zeros(example_shape)
    dyn = {0: "batch", 2: "z", 3: "y", 4: "x"}
    with warnings.catch_warnings():
        # instance norm always normalises with the input's own statistics: "train=True" is right
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": dyn, "logits": dyn}, opset_version=opset, dynamo=False)
    return sha256_file(path)
