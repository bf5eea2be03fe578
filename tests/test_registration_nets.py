"""Registration networks, warps, losses and ALDK: analytic answers and gradient bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medistill.distill.aldk import ALDK
from medistill.losses.regularization import AffineRegulariser, BendingEnergy, GradientSmoothness
from medistill.losses.similarity import LocalNCCLoss, PearsonLoss
from medistill.metrics.registration import jacobian_determinant
from medistill.nets.registration import (
    AffineStem,
    FlowCritic,
    affine_flow,
    compose,
    integrate_velocity,
    ldr,
    vtn_cascade,
    warp,
)
from medistill.tasks.registration_data import bspline_basis, invert_field, smooth_field


def ramp(shape=(12, 10, 8)) -> torch.Tensor:
    """A volume linear in its coordinates: trilinear warps of it are exact (away from the border)."""
    x, y, z = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    return (x + 2 * y + 3 * z)[None, None]


def test_zero_flow_is_identity_and_translation_is_exact() -> None:
    img = torch.rand(1, 2, 9, 8, 7)
    torch.testing.assert_close(warp(img, torch.zeros(1, 3, 9, 8, 7)), img, atol=1e-6, rtol=0)
    vol = ramp()
    t = torch.tensor([1.5, -0.25, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, 12, 10, 8)
    out = warp(vol, t)
    inner = (slice(None), slice(None), slice(1, 10), slice(1, 9), slice(1, 5))  # x + t stays inside
    expect = vol + (1.5 + 2 * -0.25 + 3 * 2.0)
    torch.testing.assert_close(out[inner], expect[inner], atol=1e-4, rtol=0)
    # border replication outside: a shift of +20 voxels along x reads the last x slice
    far = torch.zeros(1, 3, 12, 10, 8)
    far[:, 0] = 20
    torch.testing.assert_close(warp(vol, far), vol[:, :, -1:].expand_as(vol), atol=1e-4, rtol=0)


def test_composition_of_translations_adds_and_warps_the_original_once() -> None:
    shape = (10, 10, 10)
    a = torch.tensor([1.0, 0.5, -1.0]).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    b = torch.tensor([-0.25, 1.0, 0.75]).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    torch.testing.assert_close(compose(a, b), a + b, atol=1e-6, rtol=0)
    # a non-uniform first field: compose(U, f)(x) = f(x) + U(x + f(x)); U linear in x -> analytic
    u = 0.1 * ramp(shape).expand(1, 3, *shape)
    c = compose(u, b)
    x = (3, 4, 5)
    shifted = 0.1 * ((3 - 0.25) + 2 * (4 + 1.0) + 3 * (5 + 0.75))
    torch.testing.assert_close(c[0, :, x[0], x[1], x[2]], b[0, :, 0, 0, 0] + shifted, atol=1e-4, rtol=0)


def test_scaling_and_squaring_is_diffeomorphic_and_inverse_is_close() -> None:
    g = np.random.default_rng(0)
    v = smooth_field((24, 24, 24), g, amplitude=6.0, power=1.0)[None]
    u = integrate_velocity(v)
    det = jacobian_determinant(u)
    assert float(det.min()) > 0
    # exp(v) o exp(-v) = id up to interpolation error
    back = compose(integrate_velocity(-v), u)
    assert float(back.abs().max()) < 0.15 * float(u.abs().max())
    # the fixed-point inverse of the synthetic cohort, for gradients like the cohort's (|grad u| < 1)
    u = smooth_field((24, 24, 24), g, amplitude=1.2, power=1.0)[None]
    w = invert_field(u)
    residual = compose(w, u).abs()  # trilinear interpolation error only (the iteration has converged)
    assert float(residual.mean()) < 0.01 and float(residual.max()) < 0.1


def test_bspline_basis_is_partition_of_unity_inside_and_zero_at_border_knots() -> None:
    basis = bspline_basis(64, 5)
    h = 63 / 6
    inner = basis[int(2 * h) : int(4 * h)]  # covered by 4 knots on each side
    torch.testing.assert_close(inner.sum(1), torch.ones(len(inner)), atol=1e-5, rtol=0)
    assert float(basis[0].sum()) < 0.2  # the field fades towards the border


def test_affine_flow_and_exact_cascade_composition() -> None:
    shape = (8, 8, 8)
    m = torch.tensor([[0.1, 0.0, 0.0], [0.0, -0.05, 0.02], [0.0, 0.0, 0.0]])[None]
    b = torch.tensor([1.0, 0.0, -2.0])[None]
    u = affine_flow(m, b, shape)
    # at the centre (3.5, 3.5, 3.5) the field is b; one voxel along x adds the first column
    centre = u[0, :, 3, 3, 3] + 0.5 * m[0].sum(1)  # x~ = -0.5 at index 3
    torch.testing.assert_close(centre, b[0], atol=1e-5, rtol=0)
    net = vtn_cascade(cascades=2, channels=4, levels=3, affine_channels=4, affine_levels=3).eval()
    f, mv = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    out = net(f, mv, stages=True)
    assert len(out["flows"]) == 2 and out["affine"][0].shape == (1, 3, 3)
    total = out["displacement"]
    torch.testing.assert_close(out["warped"], warp(mv, total))  # the original moving image, warped once


@pytest.mark.parametrize("variant", ["paper", "compact"])
def test_ldr_shapes_and_near_identity_start(variant: str) -> None:
    net = ldr(variant=variant, cascades=2).eval()
    f = torch.rand(1, 1, 32, 32, 32)
    u = net(f, f)
    assert u.shape == (1, 3, 32, 32, 32)
    assert float(u.abs().max()) < 1e-2  # flow heads start at ~zero displacement


def test_parameter_counts_match_the_spec() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(vtn_cascade(cascades=1, affine=False)) == 28_252_203  # one VTN stem, c = 16
    assert count(ldr(variant="compact")) == 280_659  # the released LDR
    assert 1.5e6 < count(ldr()) < 1.6e6  # the paper's 16..128 student


def test_student_with_warp_exports_to_onnx(tmp_path) -> None:
    from medistill.deploy.export import export_with_parity

    net = ldr(features=[4, 8, 8, 8], cascades=2).eval()
    with torch.no_grad():  # a non-trivial flow, so the warp inside is exercised
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = {"fixed": torch.rand(1, 1, 32, 32, 32), "moving": torch.rand(1, 1, 32, 32, 32)}
    assert float(net(*inputs.values()).abs().max()) > 0.1
    diff = export_with_parity(net.with_warp(), inputs, tmp_path / "s.onnx", tolerance=1e-4, opset=20)
    assert diff < 1e-4


def test_similarity_losses() -> None:
    a = torch.rand(2, 1, 12, 12, 12)
    assert float(PearsonLoss()(a, 3 * a + 1)) < 1e-5  # r = 1 under affine intensity changes
    assert abs(float(PearsonLoss()(a, -a)) - 2) < 1e-4
    assert float(LocalNCCLoss(5)(a, 2 * a)) < 1e-3
    assert float(LocalNCCLoss(5)(a, torch.rand_like(a))) > 0.5


def test_smoothness_losses_on_analytic_fields() -> None:
    shape = (6, 6, 6)
    t = torch.ones(1, 3, *shape)
    assert float(GradientSmoothness()(t)) == 0 and float(BendingEnergy()(t)) == 0
    lin = ramp(shape).expand(1, 3, *shape)  # du/dx = 1, 2, 3 along the axes (each channel)
    expect = 0.5 * 3 * (5 * 6 * 6) * (1 + 4 + 9) / (3 * 216)
    assert abs(float(GradientSmoothness()(lin)) - expect) < 1e-4
    assert float(BendingEnergy()(lin)) < 1e-8  # a linear field does not bend


def test_affine_regulariser_zero_for_rotation_positive_otherwise() -> None:
    c, s = math.cos(0.3), math.sin(0.3)
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])[None]
    assert abs(float(AffineRegulariser()(rot))) < 1e-4
    shear = rot.clone()
    shear[0, 0, 2] = 0.4
    assert float(AffineRegulariser()(shear)) > 1e-3
    assert float(AffineRegulariser()(torch.eye(2)[None] * 1.2)) > 1e-3


def test_aldk_adversarial_term_reaches_the_student_not_the_teacher_and_trains_the_critic() -> None:
    torch.manual_seed(0)
    student = ldr(features=[4, 8, 8, 8])
    teacher = ldr(features=[4, 8, 8, 8]).eval().requires_grad_(False)
    critic = FlowCritic(features=[4, 8])
    aldk = ALDK(gamma=0.3)
    f, m = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        t_flow = teacher(f, m) + 0.5  # a teacher field different from the student's
    s_flow = student(f, m)
    reg = PearsonLoss()(f, warp(m, s_flow))
    grad_reg = torch.autograd.grad(aldk.gamma * reg, list(student.parameters()), retain_graph=True)
    critic.requires_grad_(False)  # the student's step: the critic is frozen (ctx.frozen_params)
    teacher.requires_grad_(True)  # even if the teacher's weights could take gradients, none reach them
    adv = aldk.adversarial(critic, t_flow, s_flow)
    loss = aldk.student_loss(reg, adv)
    loss.backward()
    grads = [p.grad for p in student.parameters()]
    changed = sum(float((a - b).abs().sum()) for a, b in zip(grads, grad_reg, strict=True))
    assert changed > 0  # the adversarial term changes the student's gradient
    assert all(p.grad is None for p in [*teacher.parameters(), *critic.parameters()])
    student.zero_grad(set_to_none=True)
    critic.requires_grad_(True)
    before = [p.detach().clone() for p in critic.parameters()]
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    d_loss = aldk.critic_loss(critic, t_flow, s_flow)
    d_loss.backward()
    assert all(p.grad is None for p in student.parameters())  # the student's field is detached for D
    opt.step()
    assert any(float((a - b).abs().max()) > 0 for a, b in zip(before, critic.parameters(), strict=True))


def test_affine_stem_starts_at_identity() -> None:
    stem = AffineStem(channels=4, levels=3)
    w, b = stem(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16))
    assert float(w.abs().max()) < 1e-3 and float(b.abs().max()) < 1e-3


def test_ldr_flow_scale_multiplies_the_field_of_the_same_weights() -> None:
    torch.manual_seed(0)
    plain = ldr(features=[4, 8, 8])
    scaled = ldr(features=[4, 8, 8], flow_scale=10.0)
    scaled.load_state_dict(plain.state_dict())  # the scale is no parameter: same weights
    f, m = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    torch.testing.assert_close(scaled(f, m), 10 * plain(f, m))
    with pytest.raises(ValueError, match="flow_scale"):
        ldr(flow_scale=0)


def blob(shape=(16, 16, 16), centre=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """A smooth anisotropic Gaussian body (sigma 3, 4, 2.5 voxels) with a ripple, so every axis is seen."""
    x, y, z = (
        torch.arange(n, dtype=torch.float32) - (n - 1) / 2 - c for n, c in zip(shape, centre, strict=True)
    )
    x, y, z = torch.meshgrid(x, y, z, indexing="ij")
    body = torch.exp(-((x / 3) ** 2 + (y / 4) ** 2 + (z / 2.5) ** 2) / 2)
    return (body * (1 + 0.3 * torch.sin(x + 0.5 * y)))[None, None]


def test_trained_ldr_recovers_a_known_translation_with_the_warp_convention() -> None:
    # moving = fixed moved by +t, so warped(x) = moving(x + u(x)) matches fixed for u = +t (voxels, channel
    # k along axis k): training on the similarity loss must find that sign, axis order and magnitude
    torch.manual_seed(0)
    t = torch.tensor([1.5, -1.0, 0.75])
    fixed, moving = blob(), blob(centre=tuple(float(v) for v in t))
    net = ldr(features=[8, 8, 8], flow_scale=10.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sim, smooth = PearsonLoss(), GradientSmoothness()
    for _ in range(120):
        out = net(fixed, moving, stages=True)
        loss = sim(fixed, out["warped"]) + smooth(out["flows"][0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        u = net(fixed, moving)
    inside = fixed[0, 0] > 0.3
    mean_u = torch.stack([u[0, k][inside].mean() for k in range(3)])
    assert float((mean_u - t).abs().max()) < 0.3, mean_u


def test_pooled_critic_scores_the_block_mean_of_the_field() -> None:
    torch.manual_seed(0)
    pooled, plain = FlowCritic(features=[4, 8], pool=2), FlowCritic(features=[4, 8])
    plain.load_state_dict(pooled.state_dict())
    u = torch.randn(2, 3, 16, 16, 16)
    block_mean = u.reshape(2, 3, 8, 2, 8, 2, 8, 2).mean((3, 5, 7))
    torch.testing.assert_close(pooled(u), plain(block_mean))
    smooth = torch.ones(1, 3, 16, 16, 16)  # a constant field is its own block mean
    torch.testing.assert_close(pooled(smooth), plain(smooth[..., ::2, ::2, ::2]))


class _MeanCritic(torch.nn.Module):
    """``D(phi) = mean(phi)``: gradient 1 / n everywhere, L2 norm 1 / sqrt(n), RMS-Lipschitz constant 1."""

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        return flow.flatten(1).mean(1)


def test_aldk_gradient_penalty_in_l2_or_rms_units() -> None:
    teacher, student = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    n = 3 * 4**3
    gap = ALDK().distilled(teacher, student).mean() - teacher.mean()  # D(phi_hat) - D(phi_t)
    rms = ALDK(gp_weight=10.0, lipschitz="rms").critic_loss(_MeanCritic(), teacher, student)
    l2 = ALDK(gp_weight=10.0, lipschitz="l2").critic_loss(_MeanCritic(), teacher, student)
    torch.testing.assert_close(rms, gap)  # exactly RMS-1-Lipschitz: no penalty
    torch.testing.assert_close(l2, gap + 10.0 * (1 / math.sqrt(n) - 1) ** 2)
