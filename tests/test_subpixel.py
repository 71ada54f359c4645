"""Transposed convolutions exported as sub-pixel convolutions give the same output."""

import numpy as np
import pytest
import torch
from torch import nn

from kneebatch.models.config import ModelConfig, build_network
from kneebatch.models.subpixel import SubPixelConvTranspose3d, rewritable, without_transposed_convs


@pytest.mark.parametrize("kernel,stride,padding", [
    (3, (1, 2, 2), 1), (3, (2, 2, 2), 1), (3, (2, 1, 2), 1), (3, (1, 1, 1), 1), (2, (2, 2, 2), 0), (5, (2, 2, 1), 2)])
def test_same_output_as_the_transposed_convolution(kernel, stride, padding):
    torch.manual_seed(0)
    deconv = nn.ConvTranspose3d(5, 7, kernel, stride=stride, padding=padding,
                                output_padding=tuple(s + 2 * padding - kernel for s in stride))
    x = torch.randn(2, 5, 3, 6, 7)
    with torch.no_grad():
        want = deconv(x)
        got = SubPixelConvTranspose3d(deconv)(x)
    assert got.shape == want.shape == (2, 7, 3 * stride[0], 6 * stride[1], 7 * stride[2])
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_layers_that_do_not_multiply_the_size_are_left_alone():
    odd = nn.ConvTranspose3d(4, 4, 3, stride=2, padding=1)  # output 2n - 1
    grouped = nn.ConvTranspose3d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
    assert not rewritable(odd) and not rewritable(grouped)
    model = without_transposed_convs(nn.Sequential(odd, grouped))
    assert model[0] is not odd and isinstance(model[0], nn.ConvTranspose3d)  # a copy, unchanged
    with pytest.raises(ValueError):
        SubPixelConvTranspose3d(odd)


def test_the_fine_unet_rewritten_computes_the_same_logits():
    cfg = ModelConfig()
    torch.manual_seed(1)
    net = build_network(cfg.fine, cfg.in_channels, cfg.n_classes).eval()
    for m in net.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    rewritten = without_transposed_convs(net)
    n_deconv = sum(isinstance(m, nn.ConvTranspose3d) for m in net.modules())
    assert n_deconv == len(cfg.fine.strides)  # the original keeps its layers
    assert not any(isinstance(m, nn.ConvTranspose3d) for m in rewritten.modules())
    assert sum(isinstance(m, SubPixelConvTranspose3d) for m in rewritten.modules()) == n_deconv
    x = torch.randn(1, cfg.in_channels, 8, 48, 32)
    with torch.inference_mode():
        want, got = net(x), rewritten(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), float((got - want).abs().max())


def test_exported_onnx_has_no_transposed_convolution(tmp_path):
    import onnx
    import onnxruntime as ort

    from kneebatch.models.onnx_export import export_onnx

    cfg = ModelConfig()
    torch.manual_seed(2)
    net = build_network(cfg.fine, cfg.in_channels, cfg.n_classes).eval()
    export_onnx(net, tmp_path / "fine.onnx", [1, cfg.in_channels, 16, 64, 64])
    ops = {node.op_type for node in onnx.load(str(tmp_path / "fine.onnx")).graph.node}
    assert "ConvTranspose" not in ops and "Conv" in ops
    x = np.random.default_rng(0).standard_normal((2, cfg.in_channels, 8, 48, 80)).astype(np.float32)  # other shape
    got = ort.InferenceSession(str(tmp_path / "fine.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_instance_normed_nets_export_with_the_layers_they_need(tmp_path):
    import onnx
    import onnxruntime as ort

    from kneebatch.models.onnx_export import export_onnx

    cfg = ModelConfig()  # the coarse net: instance norm after each transposed convolution
    torch.manual_seed(3)
    net = build_network(cfg.coarse, cfg.in_channels, cfg.n_classes).eval()
    rewritten = without_transposed_convs(net)
    kept = sum(isinstance(m, nn.ConvTranspose3d) for m in rewritten.modules())
    assert kept == len(cfg.coarse.strides)  # every up layer here feeds an instance norm
    export_onnx(net, tmp_path / "coarse.onnx", [1, cfg.in_channels, *cfg.coarse_shape])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "coarse.onnx")).graph.node]
    assert ops.count("ConvTranspose") == kept
    x = np.random.default_rng(1).standard_normal((1, cfg.in_channels, 16, 32, 48)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "coarse.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
