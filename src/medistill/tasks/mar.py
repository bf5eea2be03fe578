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

Optional 2.5D input (``data.neighbours = k``, spec A7-6, a deviation from DGKD's pure 2D model): the
artifact and LI images of the ``k`` slices on each side become extra channels (the mask and the target
stay the centre slice's). Simulated neighbours go through the centre's scan with the cross-section of a
3D metal object there (:func:`neighbour_mask`); they are cached beside, not inside, the 2D sets, whose
keys (``medistill.tasks.mar_data``'s source is part of them) are thereby left as they were.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import dataclass
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
from medistill.io.atomic import atomic_path
from medistill.physics import mar_classical, metal
from medistill.physics.attenuation import mu_to_hu
from medistill.registry import TASKS
from medistill.tasks import mar_data
from medistill.tasks.base import Task
from medistill.tasks.lung2d import slab_split
from medistill.tasks.mar_shards import ShardColumn, ShardFolders, ShardSample

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
    neighbours: int = Field(
        0, ge=0, le=8, description="2.5D: k slices on each side as extra channels of each image input"
    )
    pretrain_phantoms: bool = Field(True, description="the pretrain domain adds the phantom slices")
    student_sim_inputs: bool = Field(
        False,
        description="a clinical-domain (DGKD) stage also distils on the realistic simulator's training "
        "inputs (the teacher's own training images; their ground truth is never read)",
    )
    shards: list[str] = Field(
        [],
        description="folders of `medistill simulate metal --baselines` whose samples, read lazily, replace "
        "the built-in simulation of the training and validation sets; their held-out test slabs are "
        "evaluated as the 'shards' domain",
    )
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


# ------------------------------------------------------------------------------ 2.5D neighbour slices

#: half-length (mm) of the straight part along z of a simulated metal object, drawn uniformly per sample:
#: 0 is an object as deep as it is wide (a filling, a clip, a screw lying in the slice), 5 mm a pin or a
#: stem running through the neighbouring slices
HALF_LENGTH_MM = (0.0, 5.0)
#: what a neighbour set stores per sample: ``M 2k H W`` in the channel order of :func:`offsets`
NEIGHBOUR_ARRAYS = ("artifact_nb", "li_nb", "mask_nb")


def offsets(neighbours: int) -> list[int]:
    """Slice offsets of the neighbour channels, in channel order: ``-k .. -1, +1 .. +k``."""
    return [*range(-neighbours, 0), *range(1, neighbours + 1)]


def neighbour_index(z: int, neighbours: int, n_slices: int) -> list[int]:
    """The slices of the ``2k`` neighbours of slice ``z`` (order of :func:`offsets`), clamped to the volume:
    beyond an edge the edge slice is replicated (the usual padding of 2.5D inputs)."""
    return [min(max(z + o, 0), n_slices - 1) for o in offsets(neighbours)]


def neighbour_mask(mask: np.ndarray, offset_mm: float, half_length_mm: float, pixel_mm: float) -> np.ndarray:
    """Cross-section ``N N`` (bool), ``offset_mm`` from the centre slice, of a metal object whose centre
    cross-section is ``mask``: the same mask along its straight part (``|offset| <= half_length_mm``),
    then a rounded end per connected piece whose radius ``R`` is the piece's in-plane half-thickness (the
    depth of its deepest pixel; a pixel's depth is its centre's distance to the mask's edge, half a pixel
    for an edge pixel): a pixel ``e`` mm deep stays metal while ``e >= R - sqrt(R^2 - t^2)``,
    ``t = |offset| - half_length``, so a screw lying in the slice ends as a cylinder, a filling as a ball,
    and nothing is left once ``t >= R``.

    Why: metal is 3D, so the slices next to a metal slice hold a slightly smaller (or no) cross-section of
    the same object; inserting the centre mask unchanged everywhere would teach that metal never ends."""
    t = abs(offset_mm) - half_length_mm
    if t <= 0 or not mask.any():
        return mask.copy()
    from scipy import ndimage

    depth = (ndimage.distance_transform_edt(mask) - 0.5) * pixel_mm
    labels, n = ndimage.label(mask)
    radius = np.concatenate([[0.0], ndimage.maximum(depth, labels, np.arange(1, n + 1))])[labels]
    return mask & (radius > t) & (depth >= radius - np.sqrt(np.clip(radius**2 - t**2, 0.0, None)))


@functools.cache
def slice_mm(source: str) -> float:
    """Slice spacing (mm) of a source. The phantom's slices are independent 2D phantoms: each is taken as
    a prism along z (neighbours hold the same anatomy) sampled at the phantom's pixel size."""
    if source == "phantom":
        return mar_data.PHANTOM_PIXEL_MM
    from medistill.io.axial import axial_axis
    from medistill.io.examples import example_file
    from medistill.io.images import read_image

    affine = np.asarray(read_image(example_file(*mar_data.SOURCE_FILES[source])).affine, np.float64)
    return float(np.linalg.norm(affine[:3, axial_axis(affine)]))


def _replay_scan(
    spec: mar_data.SetSpec, source: str, z: int, hu: np.ndarray, pixel_mm: float
) -> tuple[np.ndarray, metal.MetalScan]:
    """The masks ``k N N`` and the scan that :func:`medistill.tasks.mar_data.simulated_set` drew for slice
    ``z`` of ``source`` (the same generator, draw for draw), so the neighbours are scanned like their centre
    (same metal, tube and dose; a scan's slices share them)."""
    scan_d = mar_data.SCANS[spec.domain]
    rng = np.random.default_rng(
        [spec.seed, mar_data.SOURCES.index(source), z, mar_data.DOMAINS.index(spec.domain)]
    )
    masks = np.stack(
        [
            mar_data.place_metal(hu, pixel_mm, source, rng, scan_d.kinds == "realistic")
            for _ in range(spec.masks_per_slice)
        ]
    )
    photons = float(np.exp(rng.uniform(*np.log(scan_d.photons))))
    scan = metal.MetalScan(
        metal=scan_d.metals[int(rng.integers(len(scan_d.metals)))],
        kvp=scan_d.kvp,
        photons=photons,
        scatter_photons=scan_d.scatter_photons,
        filter_name=scan_d.filter_name,
    )
    return masks, scan


@dataclass(frozen=True)
class NeighbourSpec:
    """The ``neighbours`` slices on each side of every sample of the 2D set ``centre``."""

    centre: mar_data.SetSpec
    neighbours: int

    def key(self) -> str:
        """``<centre key>_nb<k>_<hash>``: the centre set's key (every setting and ``mar_data``'s source),
        ``k``, the object lengths and the source of the functions that simulate neighbours."""
        text = json.dumps([self.centre.key(), self.neighbours, HALF_LENGTH_MM, _NEIGHBOUR_CODE])
        return f"{self.centre.key()}_nb{self.neighbours}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _simulate_neighbours(
    spec: NeighbourSpec, centre: dict[str, np.ndarray], progress: bool
) -> dict[str, np.ndarray]:
    """Neighbour arrays (:data:`NEIGHBOUR_ARRAYS`) of the samples of ``centre`` (the cached 2D set of
    ``spec.centre``, same sample order): each neighbour slice of the source volume through the centre's
    scan (fresh noise) with :func:`neighbour_mask` of the sample's mask (half-length drawn in
    :data:`HALF_LENGTH_MM`), LI from its own trace, its image as LI where no metal is left; an offset
    clamped onto the centre (volume edge) repeats the centre's own images."""
    from rich.progress import track

    c, k = spec.centre, spec.centre.masks_per_slice
    blur = mar_data.SCANS[c.domain].blur_bins
    by_source: dict[str, list[int]] = {}
    for src, z in c.slices:
        by_source.setdefault(src, []).append(z)
    items = [(src, z) for src, zs in by_source.items() for z in zs]
    out: dict[str, list[np.ndarray]] = {name: [] for name in NEIGHBOUR_ARRAYS}
    loaded: dict[str, tuple[np.ndarray, float]] = {}
    row = 0
    for src, z in track(items, description=f"simulating {c.domain} neighbour slices", disable=not progress):
        if src not in loaded:
            loaded.clear()
            volume, px = mar_data.load_source(src)
            loaded[src] = (volume, px * volume.shape[-1] / c.size)
        volume, pixel_mm = loaded[src]
        geometry = mar_data.mar_geometry(c.size, pixel_mm)
        hu = mar_data.resample(volume[z : z + 1], c.size)
        masks, scan = _replay_scan(c, src, z, hu[0], pixel_mm)
        if not np.array_equal(masks, centre["mask"][row : row + k]):
            raise MedistillError(f"MAR {c.domain} set: the neighbour replay of {src}:z{z} drew other masks")
        rng = np.random.default_rng(
            [c.seed, mar_data.SOURCES.index(src), z, mar_data.DOMAINS.index(c.domain), spec.neighbours, 25]
        )
        half = rng.uniform(*HALF_LENGTH_MM, size=k)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        prism = src == "phantom"
        targets = (
            [z + o for o in offsets(spec.neighbours)]
            if prism
            else neighbour_index(z, spec.neighbours, len(volume))
        )
        unique = sorted({t for t in targets if t != z})
        sims: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        if unique:
            anatomy = mar_data.resample(volume[[z if prism else t for t in unique]], c.size)
            nb_masks = np.stack(
                [
                    neighbour_mask(masks[j], abs(t - z) * slice_mm(src), half[j], pixel_mm)
                    for t in unique
                    for j in range(k)
                ]
            )
            sim = mar_data.simulate_domain(
                torch.from_numpy(anatomy).repeat_interleave(k, 0),
                torch.from_numpy(nb_masks),
                geometry,
                scan,
                blur,
                gen,
            )
            artifact = sim["artifact_hu"].numpy()
            li = mu_to_hu(
                mar_classical.li_mar(sim["sino_metal"], sim["metal_trace"], geometry, scan.filter_name)
            ).numpy()
            empty = ~nb_masks.reshape(len(nb_masks), -1).any(1)
            li[empty] = artifact[empty]
            for u, t in enumerate(unique):
                for j in range(k):
                    sims[t, j] = (artifact[u * k + j], li[u * k + j], nb_masks[u * k + j])
        for j in range(k):
            own = (centre["artifact"][row + j], centre["li"][row + j], centre["mask"][row + j])
            chans = [own if t == z else sims[t, j] for t in targets]
            for a, name in enumerate(NEIGHBOUR_ARRAYS):
                out[name].append(np.stack([ch[a] for ch in chans]))
        row += k
    arrays = {name: np.stack(v).astype(np.float32) for name, v in out.items()}
    arrays["mask_nb"] = arrays["mask_nb"].astype(bool)
    return arrays


#: hash of the source of the functions that simulate neighbours, taken when the module is imported: the
#: code that runs, even if the file is edited while a long run simulates
_NEIGHBOUR_CODE = hashlib.sha256(
    "".join(
        inspect.getsource(f)
        for f in (offsets, neighbour_index, neighbour_mask, slice_mm, _replay_scan, _simulate_neighbours)
    ).encode()
).hexdigest()[:12]


def neighbour_set(
    spec: NeighbourSpec, centre: dict[str, np.ndarray], cache_dir: Path | None, progress: bool = True
) -> dict[str, np.ndarray]:
    """The neighbour arrays of ``spec`` (:func:`_simulate_neighbours`), from ``cache_dir`` if simulated
    before, else simulated and stored there atomically beside the centre set (``None``: no cache)."""
    path = None if cache_dir is None else Path(cache_dir) / f"{spec.key()}.npz"
    if path is not None and path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = _simulate_neighbours(spec, centre, progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return arrays


class MARSlices(KeyedDataset):
    """Slices ``image`` (``C H W``, HU/1000), ``metal`` (``1 H W``), and ``target`` (``1 H W``) or an
    un-paired artifact-free ``real`` slice (``1 H W``) drawn from another set; flips when training. The
    fields are in-memory arrays or lazily read :class:`~medistill.tasks.mar_shards.ShardColumn` s."""

    def __init__(
        self, image: np.ndarray, metal: np.ndarray, target: np.ndarray | None, real: np.ndarray | None
    ) -> None:
        self.image, self.metal, self.target, self.real = image, metal, target, real

    def __len__(self) -> int:
        return len(self.image)

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        flip = rng is not None and rng.random() < 0.5
        items = {"image": self.image[index], "metal": self.metal[index][None].astype(np.float32)}
        if self.target is not None:
            items["target"] = self.target[index][None]
        if self.real is not None:
            j = int(rng.integers(len(self.real))) if rng is not None else index % len(self.real)
            items["real"] = self.real[j][None]
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
        self.shards: ShardFolders | None = None
        if d.shards:
            if d.neighbours:
                raise MedistillError(
                    f"data.shards: `simulate metal` writes 2D slices; data.neighbours={d.neighbours} needs "
                    "the built-in sources"
                )
            if d.student_sim_inputs:
                raise MedistillError("data.student_sim_inputs: not available with data.shards")
            self.shards = ShardFolders(d.shards, d.size)

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
        out = {k: [f"{s}:z{z:04d}" for s, z in v] for k, v in self.slice_split().items()}
        if self.shards is not None:
            for k, samples in self.shard_split().items():
                out[k] += [self.shards.key(s) for s in samples]
        return out

    def shard_split(self) -> dict[str, list[ShardSample]]:
        """The ``data.shards`` samples of each split (slab split per folder)."""
        assert self.shards is not None
        d = self.cfg.data
        return self.shards.split(d.slab, d.max_train_slices, d.max_eval_slices)

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
        arrays = mar_data.simulated_set(spec, cache, progress=self.cfg.train.progress)
        if d.neighbours:
            nb = NeighbourSpec(spec, d.neighbours)
            arrays = arrays | neighbour_set(nb, arrays, cache, progress=self.cfg.train.progress)
        return arrays

    def channels(self) -> list[tuple[str, int]]:
        """``(input, slice offset)`` of each network input channel: per entry of ``data.inputs`` its slices
        ``-k .. +k`` (2.5D), the mask only at the centre (offset 0)."""
        k = self.cfg.data.neighbours
        return [
            (name, o) for name in self.cfg.data.inputs for o in ((0,) if name == "mask" else range(-k, k + 1))
        ]

    def net_input(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """``M C H W`` network input (HU/1000 clipped to ``data.clip_hu``; mask 0/1) of simulated arrays, in
        the order of :meth:`channels`; with neighbours, ``<input>_nb`` (``M 2k H W``) holds them."""
        lo, hi = self.cfg.data.clip_hu
        k = self.cfg.data.neighbours
        chans = []
        for name, o in self.channels():
            if name == "mask":
                chans.append(arrays["mask"].astype(np.float32))
                continue
            if o and f"{name}_nb" not in arrays:
                raise MedistillError(f"data.neighbours={k}: the arrays hold no neighbour slices of {name!r}")
            img = arrays[name] if o == 0 else arrays[f"{name}_nb"][:, o + k if o < 0 else o + k - 1]
            chans.append(np.clip(img, lo, hi) / 1000.0)
        return np.stack(chans, 1).astype(np.float32)

    def replicate_neighbours(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``arrays`` of lone slices (no volume around them) with the slice itself as every neighbour: how
        a 2.5D model sees a 2D input, as at a volume's edge."""
        n = 2 * self.cfg.data.neighbours
        return arrays | {
            f"{k}_nb": np.repeat(arrays[k][:, None], n, 1) for k in ("artifact", "li") if k in arrays
        }

    def build_data(self) -> tuple[MARSlices, MARSlices]:
        if self.shards is not None:
            return self._shard_data()
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
        images, masks = self.net_input(inputs), inputs["mask"]
        if self.cfg.data.student_sim_inputs:  # KD on both domains' inputs; sim targets stay unread
            sim = self.sim_set("sim", "train")
            images = np.concatenate([images, self.net_input(sim)])
            masks = np.concatenate([masks, sim["mask"]])
        return (
            MARSlices(images, masks, None, real),
            MARSlices(self.net_input(val), val["mask"], None, real),
        )

    def _shard_data(self) -> tuple[MARSlices, MARSlices]:
        """``build_data`` from ``data.shards``, read lazily: paired (target = the metal-free scan) unless
        the domain is ``clinical``, where, as with the built-in sets, inputs come from every other slice
        of the training slabs and the artifact-free "real" slices from the rest (no target is read)."""
        assert self.shards is not None
        split = self.shard_split()
        train, val = split["train"], split["val"]
        if not train or not val:
            raise MedistillError(
                f"data.shards: {len(train)} training and {len(val)} validation samples; the slab split "
                f"(data.slab={self.cfg.data.slab}) needs more slices per folder"
            )

        fields = {
            "image": lambda a: self.net_input(a)[0],  # C H W
            "mask": lambda a: a["mask"][0],
            "free": lambda a: a["free"][0] / 1000.0,
        }

        def column(samples: list[ShardSample], field: str) -> ShardColumn:
            return ShardColumn(self.shards, samples, fields[field])  # type: ignore[arg-type]

        if self.cfg.data.domain != "clinical":
            return tuple(  # type: ignore[return-value]
                MARSlices(column(s, "image"), column(s, "mask"), column(s, "free"), None)
                for s in (train, val)
            )
        rank = {key: i for i, key in enumerate(dict.fromkeys((s.folder, s.slice) for s in train))}
        first = [s for s in train if rank[(s.folder, s.slice)] % 2 == 0]
        real = column([s for s in train if rank[(s.folder, s.slice)] % 2 == 1], "free")
        return (
            MARSlices(column(first, "image"), column(first, "mask"), None, real),
            MARSlices(column(val, "image"), column(val, "mask"), None, real),
        )

    # --- models ----------------------------------------------------------------------------------
    def net_args(self, key: str, spec: ModelSpec, probe: bool = False) -> dict[str, Any]:
        if spec.name in CRITICS:
            return {"in_channels": 1}
        return {"spatial_dims": 2, "in_channels": len(self.channels()), "out_channels": 1}

    def build_model(self, key: str, spec: ModelSpec, probe: bool = False) -> nn.Module:
        net = super().build_model(key, spec, probe)
        if spec.name in CRITICS:
            return net
        div = int(np.max(getattr(net, "divisor", 1)))
        if self.cfg.data.size % div:
            raise MedistillError(
                f"data.size={self.cfg.data.size} must be a multiple of {div} for {spec.name}"
            )
        base = self.channels().index(("li" if "li" in self.cfg.data.inputs else "artifact", 0))
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
        domains = ("sim", "clinical") + (("shards",) if self.shards is not None else ())
        for domain in domains:
            if domain == "shards":
                arrays = self.shards.arrays(self.shard_split()["test"])  # type: ignore[union-attr]
            else:
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
            + ("; 'shards' = the held-out test slabs of data.shards" if self.shards is not None else "")
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
        title = "real head slice 693_UNCR + simulated metal"
        if self.cfg.data.neighbours:
            arrays = self.replicate_neighbours(arrays)
            title += " (one slice: neighbours replicated)"
        return self._figure(title, arrays, self._methods(arrays, nets), path)

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
        and metal pixels unchanged. Returns the slices and how many were corrected.

        2.5D (``data.neighbours = k``): the network also sees slices ``z-k .. z+k`` of the volume, each
        resampled like the centre, with the LI from its own metal mask (its image where it holds no metal);
        beyond the volume's edge the edge slice is replicated, so one lone slice is its own neighbours."""
        from rich.progress import track

        d, e = self.cfg.data, self.cfg.eval
        out = slices.astype(np.float32).copy()
        h = slices.shape[-1]
        geometry = mar_data.mar_geometry(d.size, pixel_mm * h / d.size)
        axis = np.arange(h) - (h - 1) / 2
        fov = np.hypot(axis[:, None], axis[None, :]) <= h / 2 - 2
        fov_small = mar_data.resample(fov[None].astype(np.float32), d.size) > 0.99
        metal_slices = [
            z
            for z in range(len(slices))
            if ((slices[z] > e.metal_threshold_hu) & fov).sum() >= e.min_metal_px
        ]
        with_metal = set(metal_slices)
        prepared: dict[int, dict[str, np.ndarray]] = {}

        def prepare(z: int) -> dict[str, np.ndarray]:
            """Slice ``z`` at ``data.size`` (``1 H W``): image, metal mask and, if an input, its LI (computed
            once per slice: a slice is the centre of one input and the neighbour of up to 2k)."""
            if z not in prepared:
                full = slices[z].astype(np.float32)
                small = mar_data.resample(full[None], d.size)
                found = (full > e.metal_threshold_hu) & fov
                mask = (mar_data.resample(found[None].astype(np.float32), d.size) > 0.3) & fov_small
                prepared[z] = {"artifact": small, "mask": mask}
                if "li" in d.inputs:
                    li = small
                    if z in with_metal or mask.any():
                        li = mar_data.reprojected_li(
                            torch.from_numpy(small), torch.from_numpy(mask), geometry
                        )
                        li = li.numpy()
                    prepared[z]["li"] = li
            return prepared[z]

        for z in track(metal_slices, description="MAR slices", disable=not metal_slices):
            for done in [t for t in prepared if t < z - d.neighbours]:
                del prepared[done]
            arrays = dict(prepare(z))
            if d.neighbours:
                around = [prepare(t) for t in neighbour_index(z, d.neighbours, len(slices))]
                arrays |= {
                    f"{k}_nb": np.stack([a[k] for a in around], 1) for k in ("artifact", "li") if k in arrays
                }
            corrected = self.run_net(net, self.net_input(arrays))
            full = slices[z].astype(np.float32)
            found = (full > e.metal_threshold_hu) & fov
            delta = torch.from_numpy(corrected - arrays["artifact"])[:, None]
            delta = F.interpolate(delta, size=full.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
            out[z] = np.where(found, full, full + delta)
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
