"""Deformable registration networks: spatial transformer, VTN and affine stems, the LDR student, cascades.

Teacher: Recursive Cascaded Networks (Zhao et al., ICCV 2019), an affine stem followed by ``n`` VTN
deformable stems. Student: LDR (Tran et al., "Light-weight deformable registration using adversarial
learning with distilling knowledge", IEEE TMI 2022), in the paper's variant (4^k stride-2 convolutions
16 -> 128, transposed-convolution decoder) and the released code's compact VoxelMorph-like variant.

Convention (the one of :mod:`medistill.metrics.registration` and MONAI's ``Warp``): a network takes
``fixed`` and ``moving`` images ``B 1 *spatial`` and returns the displacement ``u`` ``B N *spatial`` in
voxels, channel ``k`` along spatial axis ``k``, such that ``warped(x) = moving(x + u(x))``. Warping is
trilinear with border replication (``grid_sample(align_corners=True, padding_mode="border")`` through
MONAI's ``Warp``, which exports to ONNX at opset >= 20: 5-D GridSample).

Cascades always warp the **original** moving image: stem ``k`` sees ``moving(x + U_{k-1}(x))`` and its
flow ``f_k`` is composed as ``U_k = f_k + U_{k-1}(x + f_k(x))``, so no image is resampled twice. With
``diffeomorphic=True`` each deformable stem's output is a stationary velocity field integrated by scaling
and squaring (Arsigny et al., 2006), so each stem's map is invertible up to interpolation error.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from medistill.registry import NETS


class SpatialTransformer(nn.Module):
    """``image(x + u(x))`` for ``image`` ``B C *spatial`` and ``u`` ``B N *spatial`` in voxels.

    MONAI's ``Warp`` (torch ``grid_sample`` underneath, exportable); ``mode`` "bilinear" is trilinear in
    3D, "nearest" is for label maps; ``padding`` "border" replicates the edge voxels as the original's
    clamped sampling does.
    """

    def __init__(self, mode: str = "bilinear", padding: str = "border") -> None:
        super().__init__()
        from monai.networks.blocks import Warp

        with warnings.catch_warnings():  # MONAI notes that it falls back to grid_sample: that is intended
            warnings.simplefilter("ignore")
            self.warp = Warp(mode=mode, padding_mode=padding)

    def forward(self, image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        return self.warp(image, displacement)


_WARP = SpatialTransformer()


def warp(image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Trilinear, border-padded ``image(x + u(x))`` (see :class:`SpatialTransformer`)."""
    return _WARP(image, displacement)


def compose(previous: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> x + f(x) -> (x + f(x)) + U(x + f(x))``: ``f + U o (id + f)``.

    ``previous`` ``U`` is the aggregate so far, ``flow`` ``f`` the newest stem's output (``B N *spatial``).
    """
    return flow + warp(previous, flow)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: the displacement of ``exp(v)`` for a stationary velocity ``v`` (voxels).

    ``u = v / 2^steps`` then ``steps`` times ``u <- u + u o (id + u)``.
    """
    u = velocity / (2**steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def identity_grid(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates centred on the volume: ``N *spatial`` with ``x - (L - 1) / 2`` per axis."""
    axes = [torch.arange(n, dtype=like.dtype, device=like.device) - (n - 1) / 2 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def affine_flow(matrix: torch.Tensor, shift: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Dense displacement ``W x~ + b`` (``W`` ``B N N``, ``b`` ``B N``) on centred voxel coordinates."""
    grid = identity_grid(shape, matrix).flatten(1)  # N V
    u = torch.einsum("bij,jv->biv", matrix, grid) + shift[..., None]
    return u.reshape(matrix.shape[0], len(shape), *shape)


def _conv(dims: int, cin: int, cout: int, k: int, s: int = 1, act: float | None = 0.1, bias: bool = True):
    """Conv with 'same'-like padding and an optional LeakyReLU (slope ``act``; 0 is ReLU)."""
    layers: list[nn.Module] = [
        Conv[Conv.CONV, dims](cin, cout, k, stride=s, padding=(k - s + 1) // 2, bias=bias)
    ]
    if act is not None:
        layers.append(nn.LeakyReLU(act) if act > 0 else nn.ReLU())
    return nn.Sequential(*layers)


def _deconv(dims: int, cin: int, cout: int, act: float | None = 0.1, bias: bool = False) -> nn.Sequential:
    """Transposed conv, kernel 4, stride 2 (doubles the size exactly), optional LeakyReLU/ReLU."""
    layers: list[nn.Module] = [Conv[Conv.CONVTRANS, dims](cin, cout, 4, stride=2, padding=1, bias=bias)]
    if act is not None:
        layers.append(nn.LeakyReLU(act) if act > 0 else nn.ReLU())
    return nn.Sequential(*layers)


def _small_init(layer: nn.Module, std: float = 1e-5) -> None:
    """Flow heads start near zero displacement (identity) as in the original code."""
    for p in layer.parameters():
        nn.init.normal_(p, std=std) if p.ndim > 1 else nn.init.zeros_(p)


class VTNStem(nn.Module):
    """VTN deformable subnetwork: stride-2 encoder ``c, 2c, 4c, 8c, 16c, 32c`` (with stride-1 refinements
    from level 3), and a decoder that predicts a flow at every level, up-samples it and concatenates it
    with the skip and the deconvolved features. Output ``20 * out * flow_multiplier`` (as in VTN).

    ``levels`` (<= 6) cuts the encoder for small inputs (64^3 needs <= 5 levels for a 2^3 bottleneck);
    the input size must be divisible by ``2**levels``.
    """

    def __init__(
        self, spatial_dims: int = 3, channels: int = 16, levels: int = 6, flow_multiplier: float = 1.0
    ):
        super().__init__()
        if not 2 <= levels <= 6:
            raise ValueError(f"VTN levels must be 2..6, got {levels}")
        d, c = spatial_dims, channels
        widths = [c * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = 2
        for i, w in enumerate(widths):
            block = [_conv(d, cin, w, 3, 2)]
            if i >= 2:
                block.append(_conv(d, w, w, 3, 1))
            self.down.append(nn.Sequential(*block))
            cin = w
        self.pred = nn.ModuleList()
        self.up_flow = nn.ModuleList()
        self.up_feat = nn.ModuleList()
        cin = widths[-1]
        for w in reversed(widths[:-1]):
            self.pred.append(Conv[Conv.CONV, d](cin, d, 3, padding=1))
            self.up_flow.append(_deconv(d, d, d, act=None))
            self.up_feat.append(_deconv(d, cin, w))
            cin = 2 * w + d
        self.head = _deconv(d, cin, d, act=None)
        self.scale = 20.0 * flow_multiplier
        self.divisor = 2**levels

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        skips, x = [], torch.cat([fixed, moving], 1)
        for block in self.down:
            x = block(x)
            skips.append(x)
        for pred, up_flow, up_feat, skip in zip(
            self.pred, self.up_flow, self.up_feat, reversed(skips[:-1]), strict=True
        ):
            x = torch.cat([skip, up_feat(x), up_flow(pred(x))], 1)
        return self.head(x) * self.scale


class AffineStem(nn.Module):
    """Affine stem: a stride-2 encoder (VTN-style, or LDR's light ``util`` stem) to a small bottleneck,
    global average pooling, and two linear heads for ``W`` (``N x N``) and ``b`` (``N``), ``A = I + W``.

    Deviation: the original's full-extent convolutions need a fixed input size; global pooling gives
    the same heads for any size (a full-extent conv is a linear map of the bottleneck, pooling its mean).
    """

    def __init__(self, spatial_dims: int = 3, channels: int = 16, levels: int = 5) -> None:
        super().__init__()
        d, widths = spatial_dims, [channels * 2**i for i in range(levels)]
        blocks, cin = [], 2
        for i, w in enumerate(widths):
            blocks.append(_conv(d, cin, w, 3, 2))
            if i >= 2:
                blocks.append(_conv(d, w, w, 3, 1))
            cin = w
        self.encoder = nn.Sequential(*blocks)
        self.matrix = nn.Linear(cin, d * d, bias=False)
        self.shift = nn.Linear(cin, d, bias=False)
        _small_init(self.matrix)
        _small_init(self.shift)
        self.spatial_dims = d
        self.divisor = 2**levels

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``W`` ``B N N`` and ``b`` ``B N`` (voxels, on centred coordinates)."""
        z = self.encoder(torch.cat([fixed, moving], 1)).flatten(2).mean(-1)
        d = self.spatial_dims
        return self.matrix(z).view(-1, d, d), self.shift(z)


class LDRStem(nn.Module):
    """The LDR student as the paper describes it: ``4^k`` stride-2 convs ``2 -> f1 .. f4`` with ReLU, then
    transposed convs back up, each after concatenating the encoder's skip, the last one to a 3-channel
    flow at the input size (linear, near-zero init). Default ``features`` 16, 32, 64, 128.

    ``flow_multiplier`` scales the head's output (voxels per unit of the head): with the head's near-zero
    start, Adam moves its weights by about the learning rate per step, so without a scale the field grows
    by a fraction of a voxel in hundreds of steps (VTN multiplies by 20 for the same reason)."""

    def __init__(
        self, spatial_dims: int = 3, features: Sequence[int] = (16, 32, 64, 128), flow_multiplier: float = 1.0
    ):
        super().__init__()
        d, f = spatial_dims, list(features)
        self.down = nn.ModuleList()
        cin = 2
        for w in f:
            self.down.append(_conv(d, cin, w, 4, 2, act=0.0))
            cin = w
        self.up = nn.ModuleList()
        for i in range(len(f) - 1, 0, -1):  # 8^3 -> 16^3 ... -> 64^3 (for a 128^3 input)
            cin_i = f[i] if i == len(f) - 1 else 2 * f[i]
            self.up.append(_deconv(d, cin_i, f[i - 1], act=0.0, bias=True))
        self.head = Conv[Conv.CONVTRANS, d](2 * f[0], d, 4, stride=2, padding=1)
        _small_init(self.head)
        self.flow_multiplier = flow_multiplier
        self.divisor = 2 ** len(f)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        skips, x = [], torch.cat([fixed, moving], 1)
        for block in self.down:
            x = block(x)
            skips.append(x)
        for up, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = torch.cat([up(x), skip], 1)
        return self.head(x) * self.flow_multiplier


class LDRCompactStem(nn.Module):
    """The LDR stem of the released code (VoxelMorph-1-like): kernel-3 stride-2 encoder ``enc``, then at
    each level a conv, nearest x2 up-sampling and concatenation with the skip; two convs at the two finest
    levels, a linear 3-channel flow head (near-zero init), no x20 factor."""

    def __init__(
        self,
        spatial_dims: int = 3,
        enc: Sequence[int] = (32, 32, 32, 16),
        dec: Sequence[int] = (32, 32, 32, 32, 16, 16, 16),
        flow_multiplier: float = 1.0,
    ):
        super().__init__()
        d, enc, dec = spatial_dims, list(enc), list(dec)
        if len(enc) != 4 or len(dec) != 7:
            raise ValueError("the compact LDR stem has 4 encoder and 7 decoder widths")
        chans = [2, *enc]
        self.down = nn.ModuleList(_conv(d, chans[i], chans[i + 1], 3, 2) for i in range(4))
        # decoder: conv at 8^3; up + skip conv3 -> conv; up + skip conv2 -> conv; up + skip conv1 -> 2 convs;
        # up + input -> 2 convs (as in the original's decode4 .. decode0_1)
        self.dec = nn.ModuleList(
            [
                _conv(d, enc[3], dec[0], 3),
                _conv(d, dec[0] + enc[2], dec[1], 3),
                _conv(d, dec[1] + enc[1], dec[2], 3),
                nn.Sequential(_conv(d, dec[2] + enc[0], dec[3], 3), _conv(d, dec[3], dec[4], 3)),
                nn.Sequential(_conv(d, dec[4] + 2, dec[5], 3), _conv(d, dec[5], dec[6], 3)),
            ]
        )
        self.head = Conv[Conv.CONV, d](dec[6], d, 3, padding=1)
        _small_init(self.head)
        self.flow_multiplier = flow_multiplier
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.divisor = 16

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fixed, moving], 1)
        skips = [x]
        for block in self.down:
            skips.append(block(skips[-1]))
        y = self.dec[0](skips[4])
        for level, skip in zip(self.dec[1:], reversed(skips[:4]), strict=True):
            y = level(torch.cat([self.up(y), skip], 1))
        return self.head(y) * self.flow_multiplier


class CascadeRegistration(nn.Module):
    """An optional affine stem, then deformable stems, composed on the original moving image.

    ``forward(fixed, moving)`` -> the aggregate displacement ``B N *spatial`` (voxels).
    :meth:`stages` returns everything the losses need: each deformable stem's own flow, the affine
    parameters, the aggregate field and the warped moving image.
    """

    def __init__(
        self, stems: Sequence[nn.Module], affine: AffineStem | None = None, diffeomorphic: bool = False
    ):
        super().__init__()
        self.affine = affine
        self.stems = nn.ModuleList(stems)
        self.diffeomorphic = diffeomorphic
        divs = [getattr(m, "divisor", 1) for m in [*self.stems, *([affine] if affine is not None else [])]]
        self.divisor = max(divs)

    def stages(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, object]:
        shape = fixed.shape[2:]
        total: torch.Tensor | None = None
        out: dict[str, object] = {"flows": []}
        if self.affine is not None:
            matrix, shift = self.affine(fixed, moving)
            out["affine"] = (matrix, shift)
            total = affine_flow(matrix, shift, shape)
        for stem in self.stems:
            current = moving if total is None else warp(moving, total)
            flow = stem(fixed, current)
            if self.diffeomorphic:
                flow = integrate_velocity(flow)
            out["flows"].append(flow)  # type: ignore[union-attr]
            if total is None:
                total = flow
            elif self.affine is not None and len(out["flows"]) == 1:  # type: ignore[arg-type]
                # exact: the affine field is linear, A(x + f) = W f + A(x)
                total = flow + torch.einsum("bij,bj...->bi...", matrix, flow) + total
            else:
                total = compose(total, flow)
        if total is None:
            raise ValueError("a cascade needs at least one stem")
        out["displacement"] = total
        out["warped"] = warp(moving, total)
        return out

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, stages: bool = False) -> torch.Tensor | dict:
        """The aggregate displacement, or with ``stages=True`` everything :meth:`stages` returns (through
        ``forward`` so that a DDP wrapper sees the call)."""
        out = self.stages(fixed, moving)
        return out if stages else out["displacement"]  # type: ignore[return-value]

    def with_warp(self) -> WarpedOutput:
        """This network followed by the warp of the moving image, as one module (for deployment)."""
        return WarpedOutput(self)


class WarpedOutput(nn.Module):
    """``(fixed, moving)`` -> ``B (1 + N) *spatial``: the warped moving image, then the displacement.

    One output tensor so that one ONNX graph holds the network and its warp(s)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        u = self.net(fixed, moving)
        return torch.cat([warp(moving, u), u], 1)


@NETS.register("vtn_cascade")
def vtn_cascade(
    spatial_dims: int = 3,
    cascades: int = 3,
    channels: int = 16,
    levels: int = 6,
    affine: bool = True,
    affine_channels: int = 16,
    affine_levels: int = 5,
    diffeomorphic: bool = False,
) -> CascadeRegistration:
    """The RCN teacher: an affine stem, then ``cascades`` VTN stems with flow multiplier ``1/cascades``."""
    stems = [VTNStem(spatial_dims, channels, levels, 1.0 / cascades) for _ in range(cascades)]
    aff = AffineStem(spatial_dims, affine_channels, affine_levels) if affine else None
    return CascadeRegistration(stems, aff, diffeomorphic)


@NETS.register("ldr")
def ldr(
    spatial_dims: int = 3,
    variant: Literal["paper", "compact"] = "paper",
    cascades: int = 1,
    features: list[int] = [16, 32, 64, 128],  # noqa: B006 (read only)
    affine: bool = False,
    affine_channels: int = 16,
    affine_levels: int = 4,
    diffeomorphic: bool = False,
    flow_scale: float = 1.0,
) -> CascadeRegistration:
    """The LDR student: ``cascades`` LDR stems (``variant`` "paper": 4^k stride-2 convs with ``features``;
    "compact": the released code's stem), optionally after a light affine stem, each stem's output
    multiplied by ``flow_scale / cascades`` (the original: ``flow_scale`` 1, no VTN-like x20; a larger scale
    lets a near-zero head reach fields of several voxels in a few hundred steps)."""
    if flow_scale <= 0:
        raise ValueError(f"ldr: flow_scale must be > 0, got {flow_scale}")
    mult = flow_scale / cascades
    if variant == "paper":
        stems: list[nn.Module] = [LDRStem(spatial_dims, features, mult) for _ in range(cascades)]
    else:
        stems = [LDRCompactStem(spatial_dims, flow_multiplier=mult) for _ in range(cascades)]
    aff = AffineStem(spatial_dims, affine_channels, affine_levels) if affine else None
    return CascadeRegistration(stems, aff, diffeomorphic)


class FlowCritic(nn.Module):
    """ALDK critic on displacement fields ``B N *spatial``: stride-2 ``4^k`` convs ``16 .. 16*2^(L-1)``
    with LeakyReLU(0.2), no normalisation (a gradient penalty forbids batch norm), then a linear 1x1
    conv averaged over space: one unbounded score per sample (a Wasserstein critic is never squashed).

    Deviation: the original flattens into a fixed-size linear layer; spatial averaging of a linear map
    keeps the critic linear in its last layer and independent of the input size.

    ``pool`` > 1 first averages the field over ``pool^N`` blocks, so the critic judges a coarser field:
    registration fields are smooth (a block mean keeps their shape), and the critic step's double
    backward (gradient penalty) costs about ``pool^N`` times less."""

    def __init__(
        self,
        spatial_dims: int = 3,
        features: list[int] = [16, 32, 64, 128, 256],  # noqa: B006 (read only)
        pool: int = 1,
    ) -> None:
        super().__init__()
        if pool < 1:
            raise ValueError(f"flow_critic: pool must be >= 1, got {pool}")
        self.pool = Pool[Pool.AVG, spatial_dims](pool) if pool > 1 else nn.Identity()
        layers, cin = [], spatial_dims
        for w in features:
            layers.append(_conv(spatial_dims, cin, w, 4, 2, act=0.2))
            cin = w
        self.body = nn.Sequential(*layers)
        self.score = Conv[Conv.CONV, spatial_dims](cin, 1, 1)

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        return self.score(self.body(self.pool(flow))).flatten(1).mean(1)


NETS.register("flow_critic")(FlowCritic)
