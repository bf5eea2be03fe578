"""Networks: shapes, deep supervision, parameter counts from the specs, ONNX round trip."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from medistill.errors import MedistillError
from medistill.nets import DynUNetTeacher, LCOVNet, UNet, count_parameters
from medistill.registry import NETS

torch.manual_seed(0)


@pytest.mark.parametrize(
    ("spatial_dims", "size", "features", "upsample"),
    [
        (2, 32, (8, 16, 32, 64), "transpose"),
        (2, 16, (4, 8), "nearest"),
        (2, 16, (4, 8, 16), "nearest_conv"),
        (3, 16, (4, 8, 16), "transpose"),
        (3, 8, (4, 8), "nearest"),
    ],
)
def test_unet_shapes_and_deep_supervision(
    spatial_dims: int, size: int, features: tuple, upsample: str
) -> None:
    net = UNet(spatial_dims, 2, 5, features=features, deep_supervision=True, upsample=upsample)
    x = torch.randn(2, 2, *([size] * spatial_dims))
    outs = net.eval()(x, scales=True)  # asked for explicitly, in eval mode too
    assert isinstance(outs, list) and len(outs) == len(features) - 1 == net.n_scales
    for s, out in enumerate(outs):  # [full, 1/2, 1/4, ...], each at its own resolution
        assert out.shape == (2, 5, *([size // 2**s] * spatial_dims))
    y = net.train()(x)  # training mode alone never changes what forward returns
    assert isinstance(y, torch.Tensor) and y.shape == (2, 5, *([size] * spatial_dims))


def test_unet_without_deep_supervision_returns_a_tensor_in_training() -> None:
    net = UNet(2, 1, 3).train()
    assert net(torch.randn(1, 1, 16, 16)).shape == (1, 3, 16, 16)
    assert len(net.heads) == 1 == net.n_scales  # no unused deep-supervision heads
    assert [o.shape for o in net(torch.randn(1, 1, 16, 16), scales=True)] == [(1, 3, 16, 16)]


def test_unet_rejects_indivisible_input_naming_the_multiple() -> None:
    net = UNet(3, 1, 2, features=(4, 8, 16, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.randn(1, 1, 16, 16, 12))


def test_unet_feature_names_are_real_submodules() -> None:
    net = UNet(2, 1, 2, features=(4, 8, 16))
    modules = dict(net.named_modules())
    assert net.feature_names == ("decoders.0", "decoders.1")
    assert all(name in modules for name in net.feature_names)


def test_registry_builds_unet_and_suggests_close_names() -> None:
    assert isinstance(NETS.build("unet", spatial_dims=2, in_channels=1, out_channels=2), UNet)
    with pytest.raises(MedistillError, match="unet"):
        NETS.build("unte")


def test_unet_reproduces_seed_a21_parameter_counts() -> None:
    """Seeds A2.1: 2D U-Nets with IN (no affine) + ELU, nearest up-sampling, 3x3 head, conv bias."""

    def a21(init: int) -> UNet:
        return UNet(
            2, 1, 1, features=[init * 2**i for i in range(5)], norm=("instance", {}), act="elu",
            upsample="nearest", head_kernel_size=3, bias=True,
        )  # fmt: skip

    assert count_parameters(a21(36)) == 9_930_025
    assert count_parameters(a21(24)) == 4_414_225


def test_unet_matches_seed_d_size() -> None:
    """Seed D: widths 64..1024, BN + LeakyReLU(0.3), nearest + 2x2 conv up-path: 31.04 M (spec D.4)."""
    net = UNet(
        2, 1, 11, features=(64, 128, 256, 512, 1024), norm="batch",
        act=("leakyrelu", {"negative_slope": 0.3}), upsample="nearest_conv", bias=True,
    )  # fmt: skip
    assert abs(count_parameters(net) - 31.04e6) < 0.01e6


def test_lcovnet_released_widths_have_spec_parameter_count() -> None:
    """Spec C.3.3: 2.79 M (repo widths), 3.25 M (PyMIC default), 0.82 M (cfg widths), BN affine included."""
    widths = {(32, 64, 128, 256, 256): 2.79, (32, 64, 128, 256, 512): 3.25, (16, 32, 64, 128, 256): 0.82}
    for features, millions in widths.items():
        assert abs(count_parameters(LCOVNet(features=features)) / 1e6 - millions) < 0.005


def test_lcovnet_3d_shapes_with_deep_supervision() -> None:
    net = LCOVNet(3, 1, 17, features=(4, 4, 8, 8, 8))
    x = torch.randn(1, 1, 32, 32, 48)
    outs = net(x, scales=True)
    assert [tuple(o.shape) for o in outs] == [(1, 17, 32 // 2**s, 32 // 2**s, 48 // 2**s) for s in range(4)]
    assert net.n_scales == 4
    y = net.train()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 17, 32, 32, 48)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 1, 32, 32, 40))


def test_lcovnet_kernel_orientation_and_2d() -> None:
    paper, code = (
        LCOVNet(features=(4, 4, 4, 4, 4)),
        LCOVNet(features=(4, 4, 4, 4, 4), kernel_orientation="code"),
    )
    assert paper.encoders[0].pre.conv.kernel_size == (3, 1, 1)  # through-plane (D) first
    assert paper.encoders[0].spatial.conv.kernel_size == (1, 3, 3)
    assert code.encoders[0].pre.conv.kernel_size == (1, 1, 3)  # as released: along W, then D x H
    assert code.bottleneck.spatial.conv.groups == 4  # LACB-L plane conv is depthwise
    assert count_parameters(paper) == count_parameters(code)
    net2d = LCOVNet(2, 1, 3, features=(4, 4, 4, 4, 4), exact=True).eval()
    assert net2d(torch.randn(1, 1, 32, 48)).shape == (1, 3, 32, 48)


def test_lacb_l_gate_can_suppress_only_without_the_released_relu6() -> None:
    """The released LACB-L gate is sigmoid(ReLU6(.)) >= 0.5; ours may go below 0.5."""
    x = torch.randn(2, 4, 4, 4, 4)
    for exact in (True, False):
        block = LCOVNet(features=(4, 4, 4, 4, 4), exact=exact).eval().bottleneck
        gate = torch.sigmoid(block.gate(block.pre(x)))
        assert (gate.min() >= 0.5) == exact


def test_dynunet_teacher_returns_native_resolution_deep_supervision() -> None:
    net = DynUNetTeacher(3, 1, 5, features=(4, 8, 8, 8), strides=(1, (1, 2, 2), 2, 2), deep_supr_num=2)
    x = torch.randn(1, 1, 8, 16, 16)
    outs = net.eval()(x, scales=True)
    assert net.n_scales == 3
    assert [tuple(o.shape[2:]) for o in outs] == [
        (8, 16, 16),
        (8, 8, 8),
        (4, 4, 4),
    ]  # anisotropic first stride
    assert net.train()(x).shape == (1, 5, 8, 16, 16)
    assert all(name in dict(net.named_modules()) for name in net.feature_names)
    with pytest.raises(ValueError, match=r"divisible by \(4, 8, 8\)"):
        net(torch.randn(1, 1, 8, 16, 12))
    assert 30e6 < count_parameters(DynUNetTeacher()) < 32e6  # nnU-Net 3D full-res size


@pytest.mark.parametrize(
    ("net", "shape"),
    [
        (UNet(2, 1, 3, features=(4, 8, 16), deep_supervision=True), (1, 1, 32, 32)),
        (LCOVNet(3, 1, 4, features=(4, 4, 8, 8, 8)), (1, 1, 32, 32, 32)),
    ],
    ids=["unet2d", "lcovnet3d"],
)
def test_onnx_export_matches_pytorch(net: torch.nn.Module, shape: tuple[int, ...]) -> None:
    ort = pytest.importorskip("onnxruntime")
    net.eval()
    x = torch.randn(*shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and instance-norm notes
        torch.onnx.export(net, (x,), buffer, dynamo=False, input_names=["image"], output_names=["logits"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"image": x.numpy()})
    assert len(outputs) == 1  # eval mode exports one tensor even with deep supervision on
    with torch.no_grad():
        np.testing.assert_allclose(outputs[0], net(x).numpy(), atol=1e-4, rtol=1e-4)
