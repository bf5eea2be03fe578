"""Distillation: a frozen teacher never trains; every KD loss is zero for equal outputs and has a gradient
to the student (none to the teacher) otherwise; CAKD for any batch size; MSKD really back-propagates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medistill.distill import CAKD, MSKD, DistillLoss, FeatureHooks, FeatureKD, FrozenTeacher, LogitKD
from medistill.distill.cakd import cakd_divergence, class_affinity
from medistill.distill.kd import default_scale_weights, kd_divergence
from medistill.errors import MedistillError
from medistill.nets import UNet
from medistill.registry import DISTILLERS

torch.manual_seed(0)
CONFIG = {
    "kd": {"weight": 1.0, "temperature": 4.0},
    "cakd": {"weight": 0.5},
    "mskd": {"weight": 0.5, "temperature": 2.0},
}


def small_unet(width: int = 4, norm: str = "batch") -> UNet:
    """A 2D net keeps these tests fast; the distillers are dimension-generic (3D tensors are used below)."""
    return UNet(
        2, 1, 4, features=(width, 2 * width, 4 * width), norm=norm, deep_supervision=True, dropout=0.2
    )


def multiscale_logits(batch: int = 2, classes: int = 4) -> list[torch.Tensor]:
    return [torch.randn(batch, classes, 16 // 2**s, 16 // 2**s, 8 // 2**s) for s in range(4)]


def test_registry_holds_the_distillers() -> None:
    assert {"kd", "feature_kd", "cakd", "mskd"} <= set(DISTILLERS.names())


def test_frozen_teacher_stays_in_eval_and_never_needs_grad() -> None:
    model = small_unet()
    teacher = FrozenTeacher(model, model.feature_names)
    holder = torch.nn.ModuleDict({"teacher": teacher}).train()  # a parent's train() must not reach it
    assert not teacher.training and not any(m.training for m in model.modules())
    assert holder["teacher"] is teacher
    bn = model.encoders[0][0].norm
    before = bn.running_mean.clone()
    out = teacher(torch.randn(2, 1, 32, 32))
    assert not out.requires_grad and all(not p.requires_grad for p in model.parameters())
    assert torch.equal(bn.running_mean, before)  # eval BN: statistics untouched (bug C.9.3 of the original)
    assert list(teacher.features) == ["decoders.0", "decoders.1"]  # names order, not execution order
    assert teacher.features["decoders.1"].shape == (2, 8, 16, 16)


def test_frozen_teacher_multiscale_outputs_are_the_eval_logits() -> None:
    model = small_unet()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        reference = model.eval()(x)
    teacher = FrozenTeacher(model, multiscale=True).train()
    outs = teacher(x)
    assert isinstance(outs, list) and len(outs) == 2
    assert torch.allclose(outs[0], reference)  # dropout and BN stayed in eval mode
    assert torch.equal(outs[0], teacher(x)[0])  # deterministic


def test_frozen_teacher_loads_weights_strictly(tmp_path: Path) -> None:
    trained = small_unet()
    path = tmp_path / "teacher.pt"
    torch.save({"model": trained.state_dict(), "epoch": 3}, path)
    teacher = FrozenTeacher.from_checkpoint(small_unet(), path)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), trained.eval()(x))
    with pytest.raises(MedistillError, match="does not fit"):
        FrozenTeacher.from_checkpoint(small_unet(width=2), path)
    with pytest.raises(MedistillError, match="does not exist"):
        FrozenTeacher.from_checkpoint(small_unet(), tmp_path / "missing.pt")
    with pytest.raises(MedistillError, match="no submodule"):
        FrozenTeacher(small_unet(), ["decoder.9"])


@pytest.mark.parametrize(
    "loss",
    [LogitKD(4.0), LogitKD(2.0, mode="sigmoid"), CAKD(), MSKD(temperature=2.0), MSKD(mode="sigmoid")],
    ids=["kd", "kd_sigmoid", "cakd", "mskd", "mskd_sigmoid"],
)
def test_kd_losses_vanish_when_student_equals_teacher(loss: torch.nn.Module) -> None:
    outs = multiscale_logits()
    assert loss(outs, [o.clone() for o in outs]).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(outs, multiscale_logits()).item() > 1e-4


def test_feature_kd_vanishes_for_matching_features_through_identity_adapters() -> None:
    loss = FeatureKD([4, 8], [4, 8], spatial_dims=3)
    for adapter in loss.adapters:
        torch.nn.init.dirac_(adapter.weight)
        torch.nn.init.zeros_(adapter.bias)
    feats = [torch.randn(2, 4, 8, 8, 4), torch.randn(2, 8, 4, 4, 2)]
    assert loss(student_features=feats, teacher_features=feats).item() == pytest.approx(0.0, abs=1e-10)
    wider = FeatureKD([4], [16], spatial_dims=3)  # adapters map student width to teacher width
    assert wider(student_features=feats[:1], teacher_features=[torch.randn(2, 16, 8, 8, 4)]).item() > 0


def test_kd_temperature_scaling_and_sigmoid_divergence() -> None:
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    p_t, log_p_s = t.softmax(1), s.log_softmax(1)
    manual = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    assert kd_divergence(s, t, 1.0).item() == pytest.approx(manual.item(), rel=1e-5)
    q_t, q_s = torch.sigmoid(t), torch.sigmoid(s)
    bernoulli = q_t * (q_t / q_s).log() + (1 - q_t) * ((1 - q_t) / (1 - q_s)).log()
    assert kd_divergence(s, t, 1.0, "sigmoid").item() == pytest.approx(
        bernoulli.sum(1).mean().item(), rel=1e-5
    )
    # T^2 keeps the scale: at high T, T^2 KL -> sum_k (centred logit gap)^2 / 2K (Hinton's logit matching)
    big_t = kd_divergence(s, t, 100.0)
    centred = (s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))
    assert big_t.item() == pytest.approx((centred.pow(2).sum(1) / (2 * 3)).mean().item(), rel=0.05)


def test_cakd_handles_any_batch_size_and_averages_samples() -> None:
    for batch in (1, 3):
        s, t = torch.randn(batch, 5, 8, 8, 8), torch.randn(batch, 5, 8, 8, 8)
        value = cakd_divergence(s, t)
        assert value.shape == () and 0 < value.item() <= 1
        per_sample = torch.stack([cakd_divergence(s[b : b + 1], t[b : b + 1]) for b in range(batch)])
        assert value.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)


def test_class_affinity_rows_sum_to_soft_class_volumes() -> None:
    logits = torch.randn(2, 4, 6, 6, 6)
    m = class_affinity(logits)
    assert m.shape == (2, 4, 4) and torch.allclose(m, m.transpose(1, 2))
    volumes = logits.softmax(1).flatten(2).sum(-1)  # sum_j q_i q_j = q_i because sum_j q_j = 1
    assert torch.allclose(m.sum(-1), volumes, rtol=1e-5)


def test_scale_weights_follow_the_spec() -> None:
    assert default_scale_weights(4) == pytest.approx([0.4, 0.2, 0.2, 0.2])
    outs, other = multiscale_logits(), multiscale_logits()
    per_scale = [kd_divergence(s, t) for s, t in zip(outs, other, strict=True)]
    expected = sum(w * v for w, v in zip([0.4, 0.2, 0.2, 0.2], per_scale, strict=True))
    assert MSKD()(outs, other).item() == pytest.approx(expected.item(), rel=1e-6)


def test_distill_loss_gives_gradient_to_student_and_none_to_teacher() -> None:
    teacher_net, student = small_unet(8), small_unet(4).train()
    teacher = FrozenTeacher(teacher_net, teacher_net.feature_names, multiscale=True)
    feature_kd = {"weight": 0.1, "student_channels": [4, 8], "teacher_channels": [8, 16], "spatial_dims": 2}
    config = CONFIG | {"feature_kd": feature_kd}
    distill = DistillLoss(config)
    x = torch.randn(2, 1, 16, 16)

    def losses() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with FeatureHooks(student, student.feature_names) as taps:
            student_out = student(x, scales=True)
        teacher_out = teacher(x)
        extra = {"student_features": taps.features, "teacher_features": teacher.features}
        total, parts = distill(student_out, teacher_out, **extra)
        live = {key: loss(student_out, teacher_out, **extra) for key, loss in distill.parts.items()}
        return total, parts, live

    total, parts, live = losses()
    assert set(parts) == set(config) and not any(p.requires_grad for p in parts.values())
    expected = sum(config[k]["weight"] * parts[k] for k in parts)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward(retain_graph=True)
    assert all(p.grad is None for p in teacher_net.parameters())
    assert all(p.grad is not None for p in distill.parameters())  # adapters train with the student
    for key, part in live.items():  # every part back-propagates into the student on its own
        student.zero_grad()
        part.backward(retain_graph=True)
        grad = sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None)
        assert grad > 0, f"{key} gives no gradient to the student"
    assert all(p.grad is None for p in teacher_net.parameters())


def test_soft_dice_kd_is_zero_for_a_confident_match_and_weighs_classes_equally() -> None:
    from medistill.distill.kd import SoftDiceKD

    kd = SoftDiceKD()
    assert "soft_dice_kd" in DISTILLERS.names()
    # a confident teacher (|logit| = 30): the same student scores ~0, an inverted one ~1
    hard = (torch.rand(2, 3, 16, 16) > 0.5).float() * 60 - 30
    assert kd([hard], [hard.clone()]).item() == pytest.approx(0.0, abs=2e-3)
    assert kd([-hard], [hard]).item() == pytest.approx(1.0, abs=1e-2)  # eps = 1 smoothing
    # class balance: missing half of a 4-pixel class costs as much as missing half of a 128-pixel class
    teacher = torch.full((1, 2, 16, 16), -30.0)
    teacher[0, 0, :2, :2] = 30  # 4 pixels
    teacher[0, 1, :8] = 30  # 128 pixels
    small, large = teacher.clone(), teacher.clone()
    small[0, 0, :1, :2] = -30
    large[0, 1, :4] = -30
    per_class = 1 - 2 * 2 / (2 + 4)  # soft Dice of half a class (eps aside)
    assert kd([small], [teacher]).item() == pytest.approx(per_class / 2, abs=0.03)
    assert kd([large], [teacher]).item() == pytest.approx(per_class / 2, abs=0.01)
