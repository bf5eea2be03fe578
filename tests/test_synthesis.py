"""MR -> CT synthesis pieces with hand-computed answers: generator/discriminator shapes and sizes, LSGAN
through the ``gan`` loss, the per-sample correlation loss, soft HU masks, the canvas geometry and the
axial inverse, and the one-line refusals of inputs that are not an MR volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medistill.errors import MedistillError
from medistill.io.axial import axial_slices
from medistill.io.images import Image
from medistill.losses.adversarial import GANLoss
from medistill.losses.synthesis import CorrelationLoss, MaskConsistency, pearson_r, soft_threshold, to_hu
from medistill.nets import count_parameters
from medistill.nets.gan import PatchGAN, ResnetGenerator, diff_augment
from medistill.registry import LOSSES, NETS
from medistill.tasks.synthesis import check_mr, invert_axial
from medistill.tasks.synthesis_data import canvas_of, ct_to_unit, from_canvas, to_canvas, unit_to_hu


@pytest.mark.parametrize(("ngf", "blocks", "n_down", "size"), [(4, 1, 2, 32), (8, 3, 2, 64), (4, 2, 3, 48)])
def test_generator_keeps_the_image_shape_in_tanh_range(ngf: int, blocks: int, n_down: int, size: int) -> None:
    net = NETS.build("resnet_generator", ngf=ngf, n_blocks=blocks, n_down=n_down)
    y = net(torch.randn(2, 1, size, size))
    assert y.shape == (2, 1, size, size) and y.abs().max() <= 1
    assert net.divisor == 2**n_down


def test_cyclegan_sizes_match_the_original() -> None:
    """ResNet-9 ngf 64 and the 70x70 PatchGAN: 11.37 M and 2.76 M parameters, a 30x30 map at 256^2."""
    assert count_parameters(ResnetGenerator(ngf=64, n_blocks=9)) == 11_365_633
    d = PatchGAN(in_channels=1, ndf=64, n_layers=3)
    assert count_parameters(d) == 2_762_689
    assert d(torch.zeros(1, 1, 256, 256)).shape == (1, 1, 30, 30)
    assert PatchGAN(in_channels=2, ndf=8)(torch.zeros(3, 2, 64, 64)).shape == (3, 1, 6, 6)


@pytest.mark.parametrize("size", [32, 48])
def test_resize_upsampling_generator_has_no_transposed_conv(size: int) -> None:
    net = ResnetGenerator(ngf=4, n_blocks=1, upsample="resize")
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    assert net(torch.randn(2, 1, size, size)).shape == (2, 1, size, size)
    with pytest.raises(ValueError, match="upsample"):
        ResnetGenerator(ngf=4, n_blocks=1, upsample="bicubic")


def test_diff_augment_moves_pixels_without_changing_intensities() -> None:
    """Translation only permutes / replicates existing values (a constant image stays constant, the shift
    is at most 1/8 of a side); cutout sets exactly a half-side square to the image's minimum; gradients
    reach the input; a discriminator augments in training mode only."""
    g = torch.Generator().manual_seed(0)
    flat = torch.full((3, 1, 32, 32), 0.25)
    assert torch.equal(diff_augment(flat, ("translation",), g), flat)
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 16, 16] = 1.0
    moved = diff_augment(x, ("translation",), g)
    peaks = [divmod(int(m.argmax()), 32) for m in moved[:, 0]]
    assert all(abs(r - 16) <= 4 and abs(c - 16) <= 4 for r, c in peaks) and moved.sum() == 4
    img = torch.rand(2, 1, 32, 32, requires_grad=True)
    cut = diff_augment(img, ("cutout",), g)
    for i in range(2):
        changed = cut[i, 0] != img[i, 0]
        assert (cut[i, 0] == img[i].min()).sum() >= 16 * 16 and changed.sum() <= 16 * 16
    cut.sum().backward()
    assert img.grad is not None and img.grad.sum() > 0
    d = PatchGAN(ndf=4, augment=("translation", "cutout"))
    probe = torch.randn(2, 1, 64, 64)
    d.eval()
    assert torch.equal(d(probe), d.net(probe))
    d.train()
    assert not torch.equal(d(probe), d.net(probe))
    with pytest.raises(ValueError, match="augment"):
        PatchGAN(ndf=4, augment=("colour",))


def test_lsgan_losses_through_the_gan_loss() -> None:
    adv = GANLoss("lsgan")
    ones, zeros = torch.ones(2, 1, 6, 6), torch.zeros(2, 1, 6, 6)
    assert adv.critic(ones, zeros) == 0 and adv.generator(ones) == 0  # the optimum of each player
    assert adv.critic(zeros, ones) == pytest.approx(1.0)  # 0.5 * (1 + 1)
    assert adv.generator(zeros) == pytest.approx(1.0)


def test_correlation_loss_is_per_sample_not_pooled() -> None:
    """A batch of one sample with r = 1 and one with r = 0 scores mean(0, 1) = 0.5."""
    g = torch.Generator().manual_seed(0)
    a0 = torch.randn(1, 1, 8, 8, generator=g)
    b0 = 3 * a0 + 2  # r = 1
    a1 = torch.tensor([1.0, -1.0, 1.0, -1.0]).repeat(16).reshape(1, 1, 8, 8)
    b1 = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(16).reshape(1, 1, 8, 8)  # orthogonal: r = 0
    a, b = torch.cat([a0, a1]), torch.cat([b0, b1])
    torch.testing.assert_close(pearson_r(a, b), torch.tensor([1.0, 0.0]), atol=1e-5, rtol=0)
    loss = LOSSES.build("correlation")
    assert float(loss(a, b)) == pytest.approx(0.5, abs=1e-5)
    pooled = float(pearson_r(a.reshape(1, -1), b.reshape(1, -1))[0])
    assert abs((1 - pooled**2) - 0.5) > 0.05  # the batch-pooled value is something else
    assert float(loss(a0, -a0)) == pytest.approx(0.0, abs=1e-6)  # r^2: anti-correlation is allowed
    assert float(CorrelationLoss(squared=False)(a0, -a0)) == pytest.approx(2.0, abs=1e-6)
    assert float(CorrelationLoss(sign="positive")(a0, -a0)) == pytest.approx(2.0, abs=1e-6)
    negative = CorrelationLoss(sign="negative")
    assert float(negative(a0, -a0)) == pytest.approx(0.0, abs=1e-6)  # a T1's dark bone is bright in CT
    assert float(negative(a0, a0)) == pytest.approx(2.0, abs=1e-6)  # the MR-like mode costs most
    with pytest.raises(ValueError, match="sign"):
        CorrelationLoss(sign="both")


def test_correlation_inside_a_mask_ignores_the_background() -> None:
    a = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    b = a.clone()
    mask = torch.zeros_like(a)
    mask[..., :4, :] = 1
    b[..., 4:, :] = torch.randn(1, 1, 4, 8)  # outside the mask: unrelated
    assert float(pearson_r(a, b, mask)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(pearson_r(a, b)[0]) < 0.99
    x = a.clone().requires_grad_(True)
    CorrelationLoss()(x, torch.randn_like(a)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_soft_ct_mask_thresholds_hu_differentiably() -> None:
    window = (-1000.0, 2000.0)
    hu = torch.tensor([-1000.0, -500.0, -490.0, 40.0, 1000.0])
    m = soft_threshold(hu, -500.0, 10.0)
    assert m[1] == pytest.approx(0.5) and m[2] == pytest.approx(1 / (1 + np.exp(-1)), abs=1e-6)
    assert m[0] < 1e-6 and m[3] > 1 - 1e-6
    unit = torch.from_numpy(ct_to_unit(hu.numpy(), window))
    torch.testing.assert_close(to_hu(unit, window), hu)
    mc = MaskConsistency(window, -500.0, 10.0)
    body = torch.tensor([[0.0, 1.0, 1.0, 1.0]])  # the truth for [-1000, 40, 40, 1000] HU
    fake = torch.from_numpy(ct_to_unit(np.array([[-1000.0, 40.0, 40.0, 1000.0]]), window)).requires_grad_(
        True
    )
    assert float(mc(fake, body).detach()) < 1e-6
    worse = torch.from_numpy(ct_to_unit(np.array([[40.0, -1000.0, 40.0, 1000.0]]), window))
    assert float(mc(worse, body)) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize(
    ("native", "spacing"), [((30, 22), (1.0, 1.0)), ((90, 70), (0.5, 0.8)), ((12, 40), (3.0, 1.0))]
)
def test_canvas_round_trip(native: tuple[int, int], spacing: tuple[float, float]) -> None:
    """Native slice -> canvas -> native is the identity up to resampling blur, pads or crops alike."""
    rows, cols = np.meshgrid(np.linspace(0, 1, native[0]), np.linspace(0, 1, native[1]), indexing="ij")
    img = np.sin(3 * rows) * np.cos(2 * cols)
    canvas = canvas_of(native, spacing, pixel_mm=1.0, size=32)
    on = to_canvas(img[None], canvas, fill=-1.0)
    assert on.shape == (1, 32, 32) and on.dtype == np.float32
    back = from_canvas(on, canvas, fill=-1.0)[0]
    assert back.shape == native
    h, w = canvas.resized
    if h <= 32 and w <= 32:  # nothing cropped: the content survives
        assert np.abs(back - img)[2:-2, 2:-2].max() < 0.15
        assert (on == -1).sum() == 32 * 32 - h * w  # the pad is exactly the fill


def test_hu_scaling_is_float_and_inverts() -> None:
    hu = np.array([-1024.0, -1000.0, 0.0, 1234.5, 2000.0, 2990.0])
    unit = ct_to_unit(hu, (-1000.0, 2000.0))
    assert unit.dtype == np.float32 and unit.min() == -1 and unit.max() == 1
    np.testing.assert_allclose(
        unit_to_hu(unit, (-1000.0, 2000.0)), [-1000, -1000, 0, 1234.5, 2000, 2000], atol=1e-3
    )


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([1.0, 1.0, 1.0, 1.0]),
        np.diag([-0.9, 0.9, 2.0, 1.0]),
        np.array([[0, 0, -1.5, 0], [1.0, 0, 0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]]),
    ],
)
def test_invert_axial_restores_the_array_order(affine: np.ndarray) -> None:
    arr = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    ax = axial_slices(arr, affine)
    np.testing.assert_array_equal(invert_axial(ax.slices, ax), arr)


def test_inputs_that_are_not_an_mr_volume_fail_in_one_line() -> None:
    with pytest.raises(MedistillError, match=r"x\.nii\.gz: a 2D image .* predict takes a 3D MR volume"):
        check_mr(Image(np.ones((8, 8), np.float32), np.eye(4)), "x.nii.gz")
    with pytest.raises(MedistillError, match="the volume is empty"):
        check_mr(Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), "x.nii.gz")
    ct = np.full((8, 8, 8), -1000.0, np.float32)
    ct[2:6, 2:6, 2:6] = 40
    with pytest.raises(MedistillError, match=r"looks like a CT in HU \(1st percentile -1000\)") as exc:
        check_mr(Image(ct, np.eye(4)), "ct.nii.gz")
    assert "\n" not in str(exc.value)
    check_mr(Image(np.abs(ct) / 10, np.eye(4)), "mr.nii.gz")  # non-negative MR intensities pass


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "stages.cc_cyclegan.losses.cc.args.sign=both",
            "stages.cc_cyclegan.losses.cc.args.sign: Input should be",
        ),
        ("stages.cc_cyclegan.models.net.args.upsample=bicubic", "models.net.args.upsample: Input should be"),
        (
            "stages.cc_cyclegan.models.d_ct.args.augment=[colour]",
            "models.d_ct.args.augment.0: Input should be",
        ),
        ("stages.cc_cyclegan.ema.d_zz=0.9", "ema.d_zz: not a trainable model of the stage"),
    ],
)
def test_bad_synthesis_settings_fail_in_one_line_naming_the_field(
    tmp_path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    from medistill.cli import main

    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["run", "configs/mr2ct_quick.yaml", "--out", str(run), "--set", setting])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not any(run.glob("*/*.pt"))  # nothing trained
