"""Metal artifact reduction (MAR) on CT slices: pretrain -> teacher -> DGKD student, slice-based 3D.

After DGKD (A. Lin Cui, 2021; spec A): a 2D U-Net teacher pretrained on generic simulated pairs and
fine-tuned on realistic ones, then a narrower student trained on un-paired "clinical" slices from an L1
term to the frozen teacher's output plus a discriminator that sees artifact-free slices as real.
Deviations (docs/mar.md): HU in and out (inputs ``HU / 1000`` clipped to ``data.clip_hu``, no x20
scaling), the LI image and the metal mask as optional extra input channels, a global residual (the net
predicts a correction of the LI image, or of the artifact image without LI), plain mean L1 instead of
RRMSE and without DGKD's extra 1/B, a PatchGAN critic (LSGAN) updated every step and frozen during the
student's step instead of a 2-class VGG classifier updated every other epoch, and a shifted simulator
instead of clinical scans (:mod:`medistill.tasks.mar_data`).

Slice-based 3D prediction: axial slices from the affine; a slice goes through the network only if it
holds metal (HU above ``eval.metal_threshold_hu``); clean slices are copied unchanged; metal pixels keep
their input values; the correction is computed at ``data.size`` and added at the input resolution.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medistill.config import ExperimentConfig, ModelSpec, StrictModel
from medistill.engine.data import KeyedDataset
from medistill.errors import MedistillError
from medistill.physics.attenuation import mu_to_hu
from medistill.registry import TASKS
from medistill.tasks import mar_data
from medistill.tasks.base import Task
from medistill.tasks.lung2d import slab_split

INPUTS = ("artifact", "li", "mask")
CRITICS = ("patchgan",)


class MARData(StrictModel):
    sources: list[str] = Field(
        ["chest-ct", "chest-ct-2", "head-ct", "brain-ct"], min_length=1, description="clean CT sources"
    )
    domain: Literal["pretrain", "sim", "clinical"] = Field("sim", description="which simulator trains")
    size: int = Field(128, ge=32, description="slices are resampled to size^2 (multiple of the net's 2^k)")
    inputs: list[Literal["artifact", "li", "mask"]] = Field(
        ["artifact", "li", "mask"], min_length=1, description="input channels; the first is 'artifact'"
    )
    clip_hu: tuple[float, float] = Field((-1024.0, 3071.0), description="input HU range (then / 1000)")
    slab: int = Field(6, ge=2, description="slices per slab of the slab split of each source")
    slice_step: int = Field(1, ge=1, description="use every k-th slice of a source")
    max_train_slices: int = Field(400, ge=2, description="per source and split, evenly spaced")
    max_eval_slices: int = Field(40, ge=1, description="val/test slices per source, evenly spaced")
    min_body_fraction: float = Field(0.05, ge=0, lt=1, description="skip slices with less body (HU>-500)")
    masks_per_slice: int = Field(2, ge=1)
    pretrain_phantoms: bool = Field(True, description="the pretrain domain adds the phantom slices")
    cache: bool = Field(True, description="cache simulated sets in <data_root>/mar_sets")


class MAREval(StrictModel):
    window_hu: tuple[float, float] = Field((-1000.0, 2000.0), description="PSNR/SSIM window = data range")
    band_mm: float = Field(15.0, gt=0, description="band around the metal for the near-metal metrics")
    figure_window_hu: tuple[float, float] = (-400.0, 600.0)
    metal_threshold_hu: float = Field(2500.0, description="predict: a pixel above this is metal")
    min_metal_px: int = Field(3, ge=1, description="predict: a slice with fewer metal pixels is clean")
    bench_size: int = Field(416, ge=32, description="bench: one test slice resampled to this size")


class MARConfig(ExperimentConfig):
    task: str = "mar"
    data: MARData = MARData()
    eval: MAREval = MAREval()


class ResidualMAR(nn.Module):
    """``x[:, base] + net(x)``: the wrapped network predicts the correction of the LI (or artifact) channel.

    The output convolution starts at zero, so an untrained model returns the LI image exactly: a
    randomly initialised head adds a correction of ~100 HU that training first has to unlearn (with it
    the quick preset's students ended below LI).

    ``x``: ``B C H W`` in ``HU / 1000``; output ``B 1 H W`` in the same unit."""

    def __init__(self, net: nn.Module, base_channel: int) -> None:
        super().__init__()
        self.net, self.base = net, base_channel
        self.divisor = getattr(net, "divisor", 1)
        convs = [m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        for head in getattr(net, "heads", convs[-1:]):
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.base : self.base + 1] + self.net(x)


@functools.cache
def usable_slices(source: str, min_body_fraction: float, step: int) -> tuple[int, ...]:
    """Indices of a source's axial slices with enough body, every ``step``-th."""
    volume, _ = mar_data.load_source(source)
    keep = np.flatnonzero(mar_data.body_fraction(volume) >= min_body_fraction)
    return tuple(int(z) for z in keep[::step])


def _even(items: list[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


class MARSlices(KeyedDataset):
    """Slices ``image`` (``C H W``, HU/1000), ``metal`` (``1 H W``), and ``target`` (``1 H W``) or an
    un-paired artifact-free ``real`` slice (``1 H W``) drawn from another set; flips when training."""

    def __init__(
        self, image: np.ndarray, metal: np.ndarray, target: np.ndarray | None, real: np.ndarray | None
    ) -> None:
        self.image, self.metal, self.target, self.real = image, metal, target, real

    def __len__(self) -> int:
        return len(self.image)

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        flip = rng is not None and rng.random() < 0.5
        items = {"image": self.image[index], "metal": self.metal[index, None].astype(np.float32)}
        if self.target is not None:
            items["target"] = self.target[index, None]
        if self.real is not None:
            j = int(rng.integers(len(self.real))) if rng is not None else index % len(self.real)
            items["real"] = self.real[j, None]
        return {
            k: torch.from_numpy(np.ascontiguousarray(v[..., ::-1] if flip else v, dtype=np.float32))
            for k, v in items.items()
        }


@TASKS.register("mar")
class MARTask(Task):
    """CT metal artifact reduction with 2D U-Nets on simulated slices (see the module docstring)."""

    Config = MARConfig
    val_metric = "rmse_hu"
    val_mode = "min"

    def __init__(self, cfg: MARConfig, run_dir: str | Path) -> None:
        super().__init__(cfg, run_dir)
        self.cfg: MARConfig = cfg
        d = cfg.data
        if d.inputs[0] != "artifact" or len(set(d.inputs)) != len(d.inputs):
            raise MedistillError(f"data.inputs: must start with 'artifact' and not repeat, got {d.inputs}")
        bad = [s for s in d.sources if s not in mar_data.SOURCES]
        if bad:
            raise MedistillError(f"data.sources: unknown {bad}; choose from {list(mar_data.SOURCES)}")

    # --- data ------------------------------------------------------------------------------------
    def slice_split(self) -> dict[str, list[tuple[str, int]]]:
        """``(source, slice)`` of each split: a slab split of each source's usable slices."""
        d = self.cfg.data
        out: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
        for src in d.sources:
            zs = usable_slices(src, d.min_body_fraction, d.slice_step)
            for split, idx in slab_split(len(zs), d.slab).items():
                chosen = [(src, zs[i]) for i in idx]
                out[split] += _even(chosen, d.max_train_slices if split == "train" else d.max_eval_slices)
        return out

    def splits(self) -> dict[str, list[str]]:
        return {k: [f"{s}:z{z:04d}" for s, z in v] for k, v in self.slice_split().items()}

    def sim_set(self, domain: str, split: str, nmar: bool = False) -> dict[str, np.ndarray]:
        """The simulated arrays of ``domain`` on the slices of ``split`` (cached on disk)."""
        from medistill.io.examples import data_root

        d = self.cfg.data
        slices = self.slice_split()[split]
        if domain == "pretrain" and split == "train" and d.pretrain_phantoms and "phantom" not in d.sources:
            slices = slices + [("phantom", z) for z in range(mar_data.PHANTOM_SLICES)]
        masks = d.masks_per_slice if split == "train" else 1
        spec = mar_data.SetSpec(domain, tuple(slices), d.size, masks, self.cfg.seed, nmar)
        cache = data_root() / "mar_sets" if d.cache else None
        return mar_data.simulated_set(spec, cache, progress=self.cfg.train.progress)

    def net_input(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """``M C H W`` network input (HU/1000 clipped to ``data.clip_hu``; mask 0/1) of simulated arrays."""
        lo, hi = self.cfg.data.clip_hu
        chans = [
            arrays["mask"].astype(np.float32) if k == "mask" else np.clip(arrays[k], lo, hi) / 1000.0
            for k in self.cfg.data.inputs
        ]
        return np.stack(chans, 1).astype(np.float32)

    def build_data(self) -> tuple[MARSlices, MARSlices]:
        domain = self.cfg.data.domain
        train, val = self.sim_set(domain, "train"), self.sim_set(domain, "val")
        if domain != "clinical":
            return (
                MARSlices(self.net_input(train), train["mask"], train["free"] / 1000.0, None),
                MARSlices(self.net_input(val), val["mask"], val["free"] / 1000.0, None),
            )
        # clinical: inputs from half of the training samples, "real" clean slices from the other half
        # (by slice, so a slice's own ground truth never reaches training); validation has no target
        n = len(train["artifact"])
        k = self.cfg.data.masks_per_slice
        first = (np.arange(n) // k) % 2 == 0
        real = train["free"][~first] / 1000.0
        inputs = {key: v[first] for key, v in train.items()}
        return (
            MARSlices(self.net_input(inputs), inputs["mask"], None, real),
            MARSlices(self.net_input(val), val["mask"], None, real),
        )

    # --- models ----------------------------------------------------------------------------------
    def net_args(self, key: str, spec: ModelSpec, probe: bool = False) -> dict[str, Any]:
        if spec.name in CRITICS:
            return {"in_channels": 1}
        return {"spatial_dims": 2, "in_channels": len(self.cfg.data.inputs), "out_channels": 1}

    def build_model(self, key: str, spec: ModelSpec, probe: bool = False) -> nn.Module:
        net = super().build_model(key, spec, probe)
        if spec.name in CRITICS:
            return net
        div = int(np.max(getattr(net, "divisor", 1)))
        if self.cfg.data.size % div:
            raise MedistillError(
                f"data.size={self.cfg.data.size} must be a multiple of {div} for {spec.name}"
            )
        base = self.cfg.data.inputs.index("li") if "li" in self.cfg.data.inputs else 0
        return ResidualMAR(net, base)

    # --- steps -----------------------------------------------------------------------------------
    @staticmethod
    def critic_view(x: torch.Tensor) -> torch.Tensor:
        """What the critic sees: an image in HU/1000 clipped to [-1, 2] (air .. dense bone)."""
        return x.clamp(-1.0, 2.0)

    def training_step(self, batch: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        x, net = batch["image"], ctx.models["net"]
        if not ctx.distillers:  # supervised (pretrain, teacher)
            out = net(x)
            loss, parts = ctx.total(ctx.losses, out, batch["target"])
            ctx.optimize(next(iter(ctx.optimizers)), loss)
            return {"loss": float(loss.detach())} | {f"loss_{k}": v for k, v in parts.items()}
        teacher = ctx.frozen[next(iter(ctx.distillers.values())).spec.teacher]
        t = teacher(x)
        s = net(x)
        kd, parts = ctx.total(ctx.distillers, s, t)
        logs = {f"loss_{k}": v for k, v in parts.items()}
        if "critic" not in ctx.models:
            ctx.optimize(next(iter(ctx.optimizers)), kd)
            return {"loss": float(kd.detach())} | logs
        if set(ctx.optimizers) != {"net", "critic"}:
            raise MedistillError(
                f"stage {ctx.stage!r}: a stage with a critic needs optimizers 'net' and 'critic', "
                f"has {list(ctx.optimizers)}"
            )
        adv = ctx.losses["adv"]
        with ctx.frozen_params("critic") as critic:
            g_adv = adv.fn.generator(critic(self.critic_view(s)))
            ctx.optimize("net", kd + adv.weight * g_adv)
        d_critic = ctx.models["critic"]
        d_loss = adv.fn.critic(
            d_critic(self.critic_view(batch["real"])), d_critic(self.critic_view(s.detach()))
        )
        ctx.optimize("critic", d_loss)
        return {
            "loss": float(kd.detach()),
            "loss_g_adv": float(g_adv.detach()),
            "loss_d": float(d_loss.detach()),
        } | logs

    def validate(self, ctx: Any, loader: Any) -> dict[str, float]:
        """``rmse_hu`` outside the metal against the target; ``kd_l1_hu`` (mean |student - teacher| in HU)
        where the stage has a teacher. The clinical domain has no target: only ``kd_l1_hu``."""
        sq, n, kd, m = 0.0, 0, 0.0, 0
        teacher = next(iter(ctx.frozen.values()), None)
        for batch in loader:
            x = batch["image"].to(ctx.device)
            out = ctx.models["net"](x) * 1000.0
            if "target" in batch:
                keep = batch["metal"].to(ctx.device) < 0.5
                sq += float(((out - batch["target"].to(ctx.device) * 1000.0)[keep] ** 2).sum())
                n += int(keep.sum())
            if teacher is not None:
                kd += float((out - teacher(x) * 1000.0).abs().sum())
                m += out.numel()
        logs = {}
        if n:
            logs["rmse_hu"] = (sq / n) ** 0.5
        if m:
            logs["kd_l1_hu"] = kd / m
        return logs

    # --- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def run_net(self, net: nn.Module, inputs: np.ndarray, batch: int = 8) -> np.ndarray:
        """``M C H W`` network inputs -> ``M H W`` corrected slices (HU)."""
        net.eval()
        device = next(net.parameters()).device
        out = [
            net(torch.from_numpy(inputs[i : i + batch]).to(device))[:, 0].cpu().numpy() * 1000.0
            for i in range(0, len(inputs), batch)
        ]
        return np.concatenate(out)

    def evaluate(self, out_dir: Path) -> dict[str, Any]:
        """PSNR/SSIM/RMSE outside the metal (in the FOV) and in a band around it, on the held-out test
        slices of the realistic (``sim``) and the shifted (``clinical``) domain, for artifact, LI, NMAR
        and every trained stage; mean and SD over n slices. Writes ``mar_tables.md`` and figures."""
        from medistill.metrics.image_quality import band_around, image_quality

        stages = self.stage_names()
        if not stages:
            raise MedistillError(f"{self.run_dir}: no trained stage (run `medistill train` first)")
        nets = {st: self.stage_model(st) for st in stages}
        e = self.cfg.eval
        cases: dict[str, dict[str, Any]] = {}
        figures, tables = [], []
        for domain in ("sim", "clinical"):
            arrays = self.sim_set(domain, "test", nmar=True)
            methods = self._methods(arrays, nets)
            target, masks = arrays["free"], arrays["mask"]
            n_img = target.shape[-1]
            axis = np.arange(n_img) - (n_img - 1) / 2
            fov = np.hypot(axis[:, None], axis[None, :]) <= n_img / 2 - 1
            per: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
            for i in range(len(target)):
                px = float(arrays["pixel_mm"][i])
                regions = {
                    "": fov & ~masks[i],
                    "band_": band_around(masks[i], e.band_mm, (px, px)) & fov,
                }
                for name, img in methods.items():
                    for prefix, region in regions.items():
                        q = image_quality(img[i], target[i], e.window_hu, region)
                        for k in ("psnr_db", "ssim", "rmse_hu"):
                            per[name].setdefault(prefix + k, []).append(q[k])
            for name, vals in per.items():
                row: dict[str, Any] = {"n_slices": len(target)}
                for k, v in vals.items():
                    row[k] = round(float(np.mean(v)), 3)
                    row[k + "_sd"] = round(float(np.std(v)), 3)
                cases[f"{domain}/{name}"] = row
            tables.append(self._table(domain, cases, list(methods), len(target)))
            figures.append(str(self._figure(domain, arrays, methods, Path(out_dir) / f"mar_{domain}.png")))
        (Path(out_dir) / "mar_tables.md").write_text("\n\n".join(tables) + "\n")
        real = self._real_slice_figure(nets, Path(out_dir) / "mar_real_693.png")
        if real is not None:
            figures.append(str(real))
        note = (
            f"held-out test slices (slab split per source); target = the metal-free scan through the same "
            f"chain; PSNR/SSIM in the window {list(e.window_hu)} HU (data range "
            f"{e.window_hu[1] - e.window_hu[0]:g} HU), RMSE on raw HU; whole image = FOV minus metal, "
            f"band = within {e.band_mm:g} mm of the metal; 'clinical' = the shifted simulator, whose ground "
            "truth is used here only and never in training"
        )
        return {"cases": cases, "note": note, "figures": figures}

    def _methods(self, arrays: dict[str, np.ndarray], nets: dict[str, nn.Module]) -> dict[str, np.ndarray]:
        """``M H W`` images (HU) of the classical baselines and of every trained stage."""
        inputs = self.net_input(arrays)
        methods = {"artifact": arrays["artifact"], "LI": arrays["li"], "NMAR": arrays["nmar"]}
        return methods | {st: self.run_net(net, inputs) for st, net in nets.items()}

    def _real_slice_figure(self, nets: dict[str, nn.Module], path: Path) -> Path | None:
        """The real head CT slice of the ``radiographs`` set (pydicom's 693_UNCR.dcm) with metal inserted
        by the in-domain simulator, through every method (skipped when that set is not fetched)."""
        from medistill.io.checks import read_ct
        from medistill.io.examples import example_file, is_cached
        from medistill.physics import mar_classical, metal

        if not is_cached("radiographs"):
            return None
        image = read_ct(example_file("radiographs", "693_UNCR.dcm"))
        hu = np.clip(np.asarray(image.array, np.float32), -1024.0, 3071.0)
        size = self.cfg.data.size
        pixel_mm = float(image.spacing[-1]) * hu.shape[-1] / size
        small = mar_data.resample(hu[None], size)
        rng = np.random.default_rng([self.cfg.seed, 693])
        mask = mar_data.place_metal(small[0], pixel_mm, "head-ct", rng, realistic=True)[None]
        geometry = mar_data.mar_geometry(size, pixel_mm)
        scan = metal.MetalScan(metal="titanium", photons=1e6)
        sim = mar_data.simulate_domain(
            torch.from_numpy(small),
            torch.from_numpy(mask),
            geometry,
            scan,
            0.0,
            torch.Generator().manual_seed(0),
        )
        li = mar_classical.li_mar(sim["sino_metal"], sim["metal_trace"], geometry)
        nm = mar_classical.nmar(sim["sino_metal"], sim["metal_trace"], geometry, li_mu=li)
        arrays = {
            "artifact": sim["artifact_hu"].numpy(),
            "li": mu_to_hu(li).numpy(),
            "nmar": mu_to_hu(nm).numpy(),
            "free": sim["free_hu"].numpy(),
            "mask": mask,
        }
        return self._figure(
            "real head slice 693_UNCR + simulated metal", arrays, self._methods(arrays, nets), path
        )

    def _table(self, domain: str, cases: dict[str, Any], methods: list[str], n: int) -> str:
        head = f"### {domain} domain, n = {n} test slices (mean +- SD over slices)\n\n"
        head += "| method | PSNR dB | SSIM | RMSE HU | band PSNR dB | band SSIM | band RMSE HU |\n"
        head += "|---|---|---|---|---|---|---|\n"
        rows = []
        for m in methods:
            c = cases[f"{domain}/{m}"]
            cells = [
                f"{c[k]:.2f} +- {c[k + '_sd']:.2f}"
                if "ssim" not in k
                else f"{c[k]:.3f} +- {c[k + '_sd']:.3f}"
                for k in ("psnr_db", "ssim", "rmse_hu", "band_psnr_db", "band_ssim", "band_rmse_hu")
            ]
            rows.append(f"| {m} | " + " | ".join(cells) + " |")
        return head + "\n".join(rows)

    def _figure(
        self, domain: str, arrays: dict[str, np.ndarray], methods: dict[str, np.ndarray], path: Path
    ) -> Path:
        """Rows: the two test slices with the most metal; panels: each method and the target, then the
        absolute error maps (0-300 HU)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from medistill.io.atomic import atomic_path

        order = np.argsort(-arrays["mask"].reshape(len(arrays["mask"]), -1).sum(1))[:2]
        names = [*methods, "target"]
        lo, hi = self.cfg.eval.figure_window_hu
        fig, axes = plt.subplots(2 * len(order), len(names), figsize=(2.4 * len(names), 5.0 * len(order)))
        axes = np.atleast_2d(axes)
        for r, i in enumerate(order):
            target, keep = arrays["free"][i], ~arrays["mask"][i]
            for c, name in enumerate(names):
                img = target if name == "target" else methods[name][i]
                ax, ax_err = axes[2 * r, c], axes[2 * r + 1, c]
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
                rmse = float(np.sqrt(np.mean((img - target)[keep] ** 2)))
                ax.set_title(name if name == "target" else f"{name}\n{rmse:.0f} HU", fontsize=8)
                ax_err.imshow(np.abs(img - target) * keep, cmap="magma", vmin=0, vmax=300)
                for a in (ax, ax_err):
                    a.axis("off")
        fig.suptitle(
            f"{domain}: test slices, window [{lo:g}, {hi:g}] HU; error rows |x - target| 0-300 HU; "
            "RMSE outside metal",
            fontsize=9,
        )
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        return path

    # --- predict / deploy ------------------------------------------------------------------------
    def correct_slices(self, net: nn.Module, slices: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, int]:
        """Slice-based 3D MAR of ``S H W`` axial slices (HU, square): metal slices corrected, clean slices
        and metal pixels unchanged. Returns the slices and how many were corrected."""
        from rich.progress import track

        d, e = self.cfg.data, self.cfg.eval
        out = slices.astype(np.float32).copy()
        h = slices.shape[-1]
        geometry = mar_data.mar_geometry(d.size, pixel_mm * h / d.size)
        axis = np.arange(h) - (h - 1) / 2
        fov = np.hypot(axis[:, None], axis[None, :]) <= h / 2 - 2
        metal_slices = [
            z
            for z in range(len(slices))
            if ((slices[z] > e.metal_threshold_hu) & fov).sum() >= e.min_metal_px
        ]
        for z in track(metal_slices, description="MAR slices", disable=not metal_slices):
            full = slices[z].astype(np.float32)
            metal = (full > e.metal_threshold_hu) & fov
            small = mar_data.resample(full[None], d.size)
            mask = mar_data.resample(metal[None].astype(np.float32), d.size) > 0.3
            mask &= mar_data.resample(fov[None].astype(np.float32), d.size) > 0.99
            arrays = {"artifact": small, "mask": mask}
            if "li" in d.inputs:
                arrays["li"] = mar_data.reprojected_li(
                    torch.from_numpy(small), torch.from_numpy(mask), geometry
                )
                arrays["li"] = arrays["li"].numpy()
            corrected = self.run_net(net, self.net_input(arrays))
            delta = torch.from_numpy(corrected - small)[:, None]
            delta = F.interpolate(delta, size=full.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
            out[z] = np.where(metal, full, full + delta)
        return out, len(metal_slices)

    def predict_file(self, src: Path, dst: Path) -> Path:
        """Correct a CT volume (NIfTI/MHA/NRRD/DICOM series) or one 2D slice and write it in HU in the
        input's geometry (same grid, affine and orientation)."""
        from medistill.io.axial import axial_slices
        from medistill.io.checks import read_ct
        from medistill.io.images import write_image

        image = read_ct(src)
        array = np.asarray(image.array, dtype=np.float32)
        net = self.predict_model()
        if array.ndim == 2:
            if array.shape[0] != array.shape[1]:
                raise MedistillError(f"{src}: the slice must be square, got {array.shape}")
            out, n = self.correct_slices(net, array[None], float(image.spacing[-1]))
            result = out[0]
        elif array.ndim == 3:
            axial = axial_slices(array, image.affine)
            _, row_mm, col_mm = axial.spacing_mm
            s = axial.slices
            if s.shape[1] != s.shape[2] or abs(row_mm - col_mm) > 0.01 * col_mm:
                raise MedistillError(
                    f"{src}: axial slices must be square with square pixels, got {s.shape[1:]}"
                )
            out, n = self.correct_slices(net, s, col_mm)
            index = tuple(slice(None, None, -1) if f else slice(None) for f in axial.flipped)
            result = np.transpose(out[index], np.argsort(axial.source_axes))
        else:
            raise MedistillError(f"{src}: expected a 2D slice or a 3D CT volume, got shape {array.shape}")
        write_image(image.with_array(result.astype(np.float32)), dst)
        self.corrected_slices = n
        return dst

    def deploy_inputs(self, stage: str, model: str) -> dict[str, torch.Tensor]:
        """A real validation slice of the realistic domain at the training size."""
        val = self.sim_set("sim", "val")
        i = int(np.argmax(val["mask"].reshape(len(val["mask"]), -1).sum(1)))
        return {"image": torch.from_numpy(self.net_input({k: v[i : i + 1] for k, v in val.items()}))}

    def whole_input(self, stage: str, model: str) -> tuple[str, dict[str, torch.Tensor]]:
        """One test slice of the realistic domain, resampled (bilinear) to ``eval.bench_size``: the
        network's cost per clinical-size slice (the content only needs to be a real slice)."""
        test = self.sim_set("sim", "test")
        x = torch.from_numpy(self.net_input({k: v[:1] for k, v in test.items()}))
        size = self.cfg.eval.bench_size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return f"one test slice resampled to {size}^2 ({x.shape[1]} channels)", {"image": x}
