"""Dimension-generic building blocks shared by every network in :mod:`medistill.nets`.

One code path serves 2D and 3D: layers come from MONAI's factories (``Conv[Conv.CONV, spatial_dims]``,
``Pool[...]``, ``get_norm_layer``, ``get_act_layer``), so no module here branches on the dimension.

Norm and activation are named as MONAI names them: a string (``"instance"``, ``"batch"``,
``"leakyrelu"``) or a ``(name, kwargs)`` tuple such as ``("leakyrelu", {"negative_slope": 0.3})``.
``"instance"`` means *affine* instance norm (as nnU-Net uses it); ``"none"`` means no norm layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Conv, Dropout, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn
from torch.nn import functional as F

NormSpec = str | tuple[str, dict[str, Any]]
ActSpec = str | tuple[str, dict[str, Any]]

__all__ = [
    "ActSpec",
    "ConvNormAct",
    "DoubleConv",
    "NormSpec",
    "SamePad",
    "UpSample",
    "check_divisible",
    "count_parameters",
    "make_act",
    "make_norm",
    "max_pool",
]


def make_norm(norm: NormSpec, spatial_dims: int, channels: int) -> nn.Module:
    """A norm layer for ``channels`` features; ``"none"`` gives identity, ``"instance"`` is affine."""
    name = norm if isinstance(norm, str) else norm[0]
    if name.lower() == "none":
        return nn.Identity()
    if isinstance(norm, str) and name.lower() == "instance":
        norm = ("instance", {"affine": True})
    return get_norm_layer(norm, spatial_dims=spatial_dims, channels=channels)


def make_act(act: ActSpec) -> nn.Module:
    """An activation from a MONAI name (``"relu6"``, ``"elu"``, ...) or ``(name, kwargs)``."""
    name = act if isinstance(act, str) else act[0]
    if name.lower() == "none":
        return nn.Identity()
    if isinstance(act, str) and name.lower() in {"relu", "relu6", "leakyrelu", "elu"}:
        act = (name, {"inplace": True})
    return get_act_layer(act)


def max_pool(spatial_dims: int, factor: int = 2) -> nn.Module:
    """Max pooling by ``factor`` along every spatial axis."""
    return Pool[Pool.MAX, spatial_dims](kernel_size=factor, stride=factor)


class SamePad(nn.Module):
    """Zero padding that keeps the size under a stride-1 conv of any (even or odd) kernel.

    Even kernels (Keras' 2x2 up-conv of seed D) pad one more voxel at the end, as TF's ``"same"``.
    ``B C *S -> B C *(S + k - 1)``.
    """

    def __init__(self, spatial_dims: int, kernel_size: int | Sequence[int]) -> None:
        super().__init__()
        ks = [kernel_size] * spatial_dims if isinstance(kernel_size, int) else list(kernel_size)
        # F.pad wants (last-axis before, last-axis after, ...), i.e. axes reversed
        self.pad = tuple(p for k in reversed(ks) for p in ((k - 1) // 2, k // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad)


class ConvNormAct(nn.Sequential):
    """(Pad) -> conv (same padding) -> norm -> activation -> optional channel dropout.

    ``B C_in *S -> B C_out *S'`` with ``S' = S / stride``. Submodules are named ``conv``, ``norm``,
    ``act`` and (when ``dropout > 0``) ``drop``. The conv has a bias only when there is no norm to
    absorb it, unless ``bias`` says otherwise.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        norm: NormSpec = "instance",
        act: ActSpec = "leakyrelu",
        dropout: float = 0.0,
        bias: bool | None = None,
    ) -> None:
        super().__init__()
        has_norm = (norm if isinstance(norm, str) else norm[0]).lower() != "none"
        kernels = [kernel_size] * spatial_dims if isinstance(kernel_size, int) else list(kernel_size)
        odd = all(k % 2 == 1 for k in kernels)
        if not odd:
            if stride != 1:
                raise ValueError(f"even kernel {kernel_size} needs stride 1 for same padding")
            self.pad = SamePad(spatial_dims, kernel_size)
        self.conv = Conv[Conv.CONV, spatial_dims](
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=tuple(k // 2 for k in kernels) if odd else 0,
            groups=groups,
            bias=(not has_norm) if bias is None else bias,
        )
        self.norm = make_norm(norm, spatial_dims, out_channels)
        self.act = make_act(act)
        if dropout > 0:
            self.drop = Dropout[Dropout.DROPOUT, spatial_dims](dropout)


class DoubleConv(nn.Sequential):
    """Two :class:`ConvNormAct` (3^d kernels): the U-Net level block. ``B C_in *S -> B C_out *S``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        norm: NormSpec = "instance",
        act: ActSpec = "leakyrelu",
        dropout: float = 0.0,
        bias: bool | None = None,
    ) -> None:
        kw: dict[str, Any] = {"norm": norm, "act": act, "dropout": dropout, "bias": bias}
        super().__init__(
            ConvNormAct(spatial_dims, in_channels, out_channels, 3, **kw),
            ConvNormAct(spatial_dims, out_channels, out_channels, 3, **kw),
        )


class UpSample(nn.Module):
    """Doubles the spatial size: ``B C_in *S -> B C_out 2*S``.

    Modes:
      * ``"transpose"``: transposed conv, kernel 2, stride 2 (nnU-Net); ``C_out`` as given.
      * ``"nearest"``: nearest-neighbour x2 without a conv, so ``C_out == C_in`` (seeds A2.1).
      * ``"nearest_conv"``: nearest x2 then a 2^d conv-norm-act to ``C_out`` (the Keras U-Net of seed D).
    """

    MODES = ("transpose", "nearest", "nearest_conv")

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        mode: str = "transpose",
        *,
        norm: NormSpec = "instance",
        act: ActSpec = "leakyrelu",
    ) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"upsample mode {mode!r} is not one of {self.MODES}")
        if mode == "nearest" and out_channels != in_channels:
            raise ValueError(
                "upsample mode 'nearest' keeps the channel count; out_channels must equal in_channels"
            )
        self.up: nn.Module
        if mode == "transpose":
            self.up = Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, kernel_size=2, stride=2)
        else:
            layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest")]
            if mode == "nearest_conv":
                layers.append(ConvNormAct(spatial_dims, in_channels, out_channels, 2, norm=norm, act=act))
            self.up = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


def check_divisible(x: torch.Tensor, multiple: int | Sequence[int], net: str, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless every spatial size of ``x`` (``B C *S``) is a multiple of ``multiple``
    (one per axis, or one for all) and at least ``minimum``. Skipped while tracing for ONNX export, where
    sizes are fixed by the example input."""
    if torch.jit.is_tracing():
        return
    spatial = tuple(int(s) for s in x.shape[2:])
    mult = (multiple,) * len(spatial) if isinstance(multiple, int) else tuple(multiple)
    if any(s % m for s, m in zip(spatial, mult, strict=True)):
        need = mult[0] if len(set(mult)) == 1 else mult
        raise ValueError(
            f"{net}: spatial size {spatial} must be divisible by {need} on every axis; "
            f"pad or crop the input to a multiple of {need}"
        )
    if any(s < minimum for s in spatial):
        raise ValueError(f"{net}: spatial size {spatial} must be at least {minimum} on every axis")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (every one, or only those with ``requires_grad``); buffers are not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
