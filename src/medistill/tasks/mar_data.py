"""Simulated metal-artifact slice sets for MAR: sources, realistic metal placement, three scan domains.

Why: DGKD (Cui, "3D X-ray CT artifact reduction", 2021) trains on MAR-2D-PRE (generic pairs), MAR-2D-SIM
(realistic simulated pairs) and MAR-2D-CLINIC (clinical slices without ground truth), none released.
Here the three sets are simulated from the clean example CTs by :mod:`medistill.physics.metal`:

* ``pretrain``: phantom-like slices (random ellipses of fat/soft tissue/bone) and real slices, every
  metal shape anywhere in the body, titanium or iron, 120 kVp, 0.3-3 M photons;
* ``sim``: real slices (chest-ct, chest-ct-2, head-ct, brain-ct), metal where it occurs clinically
  (dental fillings at the teeth, screws in bone, clips in soft tissue, hip/port-like ellipses),
  titanium, 120 kVp, 0.5-2 M photons;
* ``clinical``: a **shifted simulator** standing in for real metal scans (none exist here): 100 kVp,
  iron, 0.1-0.4 M photons, 20 scatter photons per bin, Gaussian detector blur of 0.8 bins on the line
  integrals and a Shepp-Logan FBP filter. Its ground truth is stored for evaluation only; the
  training set of that domain hands out artifact slices and, from *other* slices, artifact-free
  reconstructions (the discriminator's "real" samples), never the input's own ground truth.

The target of every pair is the metal-free scan through the same noisy chain (``free_hu``, DGKD's
"ImgFreeRecon"), so noise and blur match and only the metal's effects differ. Sets are cached on disk
(``<data_root>/mar_sets/<domain>_<hash>.npz``; the key is every setting and this module's source), as
the simulation costs seconds per slice at clinical sizes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medistill.errors import MedistillError
from medistill.io.atomic import atomic_path
from medistill.physics import ct, mar_classical, metal
from medistill.physics.attenuation import hu_to_mu, mu_to_hu
from medistill.physics.materials import decompose_water_bone

SOURCES = ("chest-ct", "chest-ct-2", "head-ct", "brain-ct", "phantom")
DOMAINS = ("pretrain", "sim", "clinical")
#: (example set, file) of each real source
SOURCE_FILES = {
    "chest-ct": ("chest-ct", "cxr.nii.gz"),
    "chest-ct-2": ("chest-ct-2", "CTChest4.nrrd"),
    "head-ct": ("head-ct", "head_ct.nii.gz"),
    "brain-ct": ("brain-ct", "ct_brain_atlas_1mm.nii.gz"),
}
PHANTOM_SLICES, PHANTOM_PIXEL_MM = 40, 1.5  # the phantom "volume": 40 slices of 256 px at 1.5 mm


@dataclass(frozen=True)
class DomainScan:
    """The scan of one domain; per slice, photons are drawn log-uniformly in ``photons`` and the metal
    from ``metals``. ``blur_bins``: sigma (bins) of a Gaussian detector blur of the line integrals."""

    kvp: float
    photons: tuple[float, float]
    metals: tuple[str, ...]
    scatter_photons: float = 0.0
    blur_bins: float = 0.0
    filter_name: str = "ramp"
    kinds: str = "realistic"  # "realistic" placement by anatomy, or "any" shape anywhere in the body


SCANS = {
    "pretrain": DomainScan(120.0, (3e5, 3e6), ("titanium", "iron"), kinds="any"),
    "sim": DomainScan(120.0, (5e5, 2e6), ("titanium",)),
    "clinical": DomainScan(100.0, (1e5, 4e5), ("iron",), 20.0, 0.8, "shepp-logan"),
}


def mar_geometry(size: int, pixel_mm: float) -> ct.CTGeometry:
    """The ``deeplesion416`` fan-beam scanner (InDuDoNet/SynDeepLesion) in its pixel units at ``size`` px:
    views and bins scale with the image (views a multiple of 4 for the quarter-turn symmetry)."""
    if size == 416:
        return ct.geometry_preset("deeplesion416", pixel_mm)
    base = ct.geometry_preset("deeplesion416")
    s = size / 416
    bins = int(round(641 * s)) | 1
    views = max(8, 4 * int(round(640 * s / 4)))
    return ct.CTGeometry(
        image_size=size,
        pixel_mm=pixel_mm,
        n_views=views,
        n_bins=bins,
        bin_spacing=2 * math.sqrt(2) * size * pixel_mm / bins,
        beam="fan",
        detector="flat",
        sod_mm=base.sod_mm / base.pixel_mm * s * pixel_mm,
        sdd_mm=base.sdd_mm / base.pixel_mm * s * pixel_mm,
    )


# ---------------------------------------------------------------------------------------- sources


def phantom_slices(n: int = PHANTOM_SLICES, size: int = 256, seed: int = 0) -> np.ndarray:
    """``n`` phantom-like slices ``n size size`` (HU): an elliptic body (soft tissue, fat rim), organs,
    air pockets and bone ellipses, seeded (the generic half of the pretraining set)."""
    rng = np.random.default_rng([seed, 17])
    axis = (np.arange(size) - (size - 1) / 2) / (size / 2)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    out = np.full((n, size, size), -1000.0, np.float32)

    def ell(cx: float, cy: float, a: float, b: float, t: float) -> np.ndarray:
        c, s = math.cos(t), math.sin(t)
        u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
        return (u / a) ** 2 + (v / b) ** 2 <= 1

    for i in range(n):
        a, b = rng.uniform(0.55, 0.85), rng.uniform(0.4, 0.75)
        out[i][ell(0, 0, a, b, 0)] = -100.0  # fat rim
        out[i][ell(0, 0, a - 0.05, b - 0.05, 0)] = float(rng.uniform(20, 60))
        for _ in range(int(rng.integers(2, 6))):  # organs, air (lungs, bowel), bone
            hu = float(rng.choice([rng.uniform(-900, -700), rng.uniform(30, 90), rng.uniform(300, 1500)]))
            cx, cy = rng.uniform(-0.6, 0.6) * a, rng.uniform(-0.6, 0.6) * b
            m = ell(cx, cy, rng.uniform(0.04, 0.25), rng.uniform(0.04, 0.2), rng.uniform(0, math.pi))
            out[i][m & ell(0, 0, a - 0.08, b - 0.08, 0)] = hu
    return out + rng.normal(0, 5, out.shape).astype(np.float32)


def load_source(name: str) -> tuple[np.ndarray, float]:
    """Axial ``S N N`` slices (HU, canonical orientation of :mod:`medistill.io.axial`, padded with air to
    square) of a source and its pixel size (mm)."""
    if name == "phantom":
        return phantom_slices(), PHANTOM_PIXEL_MM
    if name not in SOURCE_FILES:
        raise MedistillError(f"data.sources: unknown source {name!r}; choose from {list(SOURCES)}")
    from medistill.io.axial import axial_slices
    from medistill.io.examples import example_file
    from medistill.io.images import read_image

    image = read_image(example_file(*SOURCE_FILES[name]))
    axial = axial_slices(np.asarray(image.array, np.float32), image.affine)
    _, row_mm, col_mm = axial.spacing_mm
    if abs(row_mm - col_mm) > 0.01 * col_mm:
        raise MedistillError(f"source {name}: in-plane spacing {row_mm:g} x {col_mm:g} mm is not square")
    slices = np.clip(axial.slices, -1024.0, 3071.0)
    h, w = slices.shape[1:]
    n = max(h, w)
    padded = np.full((len(slices), n, n), -1000.0, np.float32)
    padded[:, (n - h) // 2 : (n - h) // 2 + h, (n - w) // 2 : (n - w) // 2 + w] = slices
    return padded, float(col_mm)


def body_fraction(slices: np.ndarray) -> np.ndarray:
    """Fraction of each slice's pixels inside the body (HU > -500)."""
    return (slices > -500).reshape(len(slices), -1).mean(1)


def resample(slices: np.ndarray, size: int) -> np.ndarray:
    """``S N N`` -> ``S size size`` (area averaging down, bilinear up)."""
    t = torch.from_numpy(np.ascontiguousarray(slices, np.float32))[:, None]
    if t.shape[-1] == size:
        return t[:, 0].numpy()
    mode = "area" if t.shape[-1] > size else "bilinear"
    return F.interpolate(t, size=(size, size), mode=mode)[:, 0].numpy()


# ---------------------------------------------------------------------------------- metal placement


def _centre(candidates: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple:
    r, c = candidates[int(rng.integers(len(candidates)))]
    return float(x[r, c]), float(y[r, c])


def place_metal(
    hu: np.ndarray, pixel_mm: float, source: str, rng: np.random.Generator, realistic: bool
) -> np.ndarray:
    """One metal mask ``N N`` (bool) for the clean slice ``hu``, inside the body and the field of view.

    ``realistic``: dental fillings centred on teeth (HU > 1800 in the lower head) for head-ct, screws
    centred in bone (HU > 300; spine, pelvis), clips (bead clusters) in soft tissue, hip/port-like
    ellipses; otherwise (pretraining) any shape of :data:`medistill.physics.metal.MASK_KINDS` anywhere
    in the body (:func:`medistill.physics.metal.random_metal_masks`).
    """
    n = hu.shape[-1]
    if not realistic:
        return metal.random_metal_masks(hu, pixel_mm, 1, rng)[0]
    axis = (np.arange(n) - (n - 1) / 2) * pixel_mm
    y, x = np.meshgrid(axis, axis, indexing="ij")
    radius = np.hypot(x, y)
    inner = radius <= 0.75 * (n / 2) * pixel_mm
    allowed = (radius <= (n / 2 - 2) * pixel_mm) & (hu > -500)
    teeth = np.argwhere((hu > 1800) & inner)
    bone = np.argwhere((hu > 300) & inner)
    soft = np.argwhere((hu > -100) & (hu < 200) & inner)
    if source == "head-ct" and len(teeth) >= 3:
        options = [("dental", teeth)] * 3 + [("cluster", soft)]
    elif source in ("head-ct", "brain-ct"):
        options = [("cluster", soft), ("screw", bone)]  # aneurysm clips / coils, skull fixation screws
    else:
        options = [("screw", bone), ("screw", bone), ("cluster", soft), ("ellipse", bone)]
    options = [(k, c) for k, c in options if len(c)] or [("ellipse", np.argwhere(allowed & inner))]
    for _ in range(20):
        kind, cand = options[int(rng.integers(len(options)))]
        if kind == "dental":  # fillings on the tooth pixels nearest to blobs of the dental arch
            mask = np.zeros_like(allowed)
            for _ in range(int(rng.integers(2, 6))):
                cx, cy = _centre(cand, x, y, rng)
                a, b = rng.uniform(1.5, 3.5, 2)
                mask |= ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1
        else:
            mask = metal.metal_mask(kind, n, pixel_mm, _centre(cand, x, y, rng), rng)
        mask &= allowed
        if mask.sum() >= 2:
            return mask
    return mask


# ------------------------------------------------------------------------------------ simulation


def _blur_bins(sino: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``B V K`` sinograms along the bins (sigma in bins), edge values replicated."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=sino.dtype, device=sino.device) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    b, v, n = sino.shape
    flat = F.pad(sino.reshape(b * v, 1, n), (r, r), mode="replicate")
    return F.conv1d(flat, k).reshape(b, v, n)


def simulate_domain(
    hu: torch.Tensor,
    masks: torch.Tensor,
    geometry: ct.CTGeometry,
    scan: metal.MetalScan,
    blur_bins: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """:func:`medistill.physics.metal.simulate_metal` with a detector blur of ``blur_bins`` on the
    material line integrals before the spectrum (the shifted domain); the same chain, draw for draw, when
    ``blur_bins`` is 0 (tests/test_mar.py checks that). Returns its dict (``B H W`` / ``B V K``)."""
    if blur_bins <= 0:
        return metal.simulate_metal(hu, masks, geometry, scan, generator)
    op = ct.operator(geometry, hu.device)
    metal.check_metal_in_fov(masks, geometry)
    hu = hu.float().clamp_min(-1024.0)
    rho_w, rho_b = decompose_water_bone(hu, scan.water_hu, scan.bone_hu)
    keep, b = (~masks).float(), hu.shape[0]
    stacked = torch.cat([rho_w * keep, rho_b * keep, rho_w, rho_b, masks.float()])
    p_w, p_b, p_w0, p_b0, p_m = _blur_bins(op.project(stacked), blur_bins).split(b)
    sino_metal = metal.polychromatic_sinogram({"water": p_w, "bone": p_b, scan.metal: p_m}, scan, generator)
    sino_free = metal.polychromatic_sinogram({"water": p_w0, "bone": p_b0}, scan, generator)
    artifact_mu, free_mu = op.fbp(torch.cat([sino_metal, sino_free]), scan.filter_name).split(b)
    return {
        "clean_hu": hu,
        "artifact_hu": mu_to_hu(artifact_mu),
        "free_hu": mu_to_hu(free_mu),
        "metal_mask": masks,
        "sino_metal": sino_metal,
        "metal_trace": p_m > 0,
    }


def reprojected_li(
    hu: torch.Tensor, masks: torch.Tensor, geometry: ct.CTGeometry, filter_name: str = "ramp"
) -> torch.Tensor:
    """LI image ``B H W`` (HU) of reconstructed slices ``hu`` without their raw data (a real scan):
    forward-project the image, take the metal trace from the projected mask, interpolate, FBP."""
    sino = ct.project(hu_to_mu(hu.float()), geometry)
    trace = ct.project(masks.float(), geometry) > 0
    return mu_to_hu(mar_classical.li_mar(sino, trace, geometry, filter_name))


@dataclass(frozen=True)
class SetSpec:
    """What one cached set holds: ``domain``, the ``(source, slice index)`` list, image ``size``, masks
    per slice, seed, and whether NMAR is reconstructed (evaluation sets)."""

    domain: str
    slices: tuple[tuple[str, int], ...]
    size: int
    masks_per_slice: int
    seed: int
    nmar: bool

    def key(self) -> str:
        code = hashlib.sha256(inspect.getsource(inspect.getmodule(SetSpec)).encode()).hexdigest()[:12]
        text = json.dumps(asdict(self) | {"scan": asdict(SCANS[self.domain]), "code": code}, sort_keys=True)
        return f"{self.domain}_{self.size}_{hashlib.sha256(text.encode()).hexdigest()[:20]}"


ARRAYS = ("artifact", "li", "free", "clean", "mask")


def _simulate_set(spec: SetSpec, progress: bool) -> dict[str, np.ndarray]:
    from rich.progress import track

    scan_d = SCANS[spec.domain]
    out: dict[str, list[np.ndarray]] = {k: [] for k in (*ARRAYS, "nmar", "pixel_mm")}
    by_source: dict[str, list[int]] = {}
    for src, z in spec.slices:
        by_source.setdefault(src, []).append(z)
    items = [(src, z) for src, zs in by_source.items() for z in zs]
    loaded: dict[str, tuple[np.ndarray, float]] = {}
    for src, z in track(items, description=f"simulating {spec.domain} slices", disable=not progress):
        if src not in loaded:
            loaded.clear()
            volume, px = load_source(src)
            loaded[src] = (volume, px * volume.shape[-1] / spec.size)
        volume, pixel_mm = loaded[src]
        geometry = mar_geometry(spec.size, pixel_mm)
        hu = torch.from_numpy(resample(volume[z : z + 1], spec.size))
        rng = np.random.default_rng([spec.seed, SOURCES.index(src), z, DOMAINS.index(spec.domain)])
        masks = np.stack(
            [
                place_metal(hu[0].numpy(), pixel_mm, src, rng, scan_d.kinds == "realistic")
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
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        k = spec.masks_per_slice
        sim = simulate_domain(
            hu.expand(k, -1, -1), torch.from_numpy(masks), geometry, scan, scan_d.blur_bins, gen
        )
        li = mar_classical.li_mar(sim["sino_metal"], sim["metal_trace"], geometry, scan.filter_name)
        out["artifact"].append(sim["artifact_hu"].numpy())
        out["li"].append(mu_to_hu(li).numpy())
        out["free"].append(sim["free_hu"].numpy())
        out["clean"].append(sim["clean_hu"].numpy())
        out["mask"].append(masks)
        out["pixel_mm"].append(np.full(k, pixel_mm, np.float32))
        if spec.nmar:
            nm = mar_classical.nmar(
                sim["sino_metal"], sim["metal_trace"], geometry, scan.filter_name, li_mu=li
            )
            out["nmar"].append(mu_to_hu(nm).numpy())
    arrays = {k: np.concatenate(v).astype(np.float32) for k, v in out.items() if v}
    arrays["mask"] = arrays["mask"].astype(bool)
    return arrays


def simulated_set(spec: SetSpec, cache_dir: Path | None, progress: bool = True) -> dict[str, np.ndarray]:
    """The arrays of ``spec`` (``M H W``: ``artifact``, ``li``, ``free`` (target), ``clean``, ``mask``,
    [``nmar``], and ``pixel_mm`` ``M``), from ``cache_dir`` if simulated before, else simulated and stored
    there atomically (``cache_dir=None``: no cache)."""
    if not spec.slices:
        raise MedistillError(f"MAR {spec.domain} set: no slices selected (check data.sources and the split)")
    path = None if cache_dir is None else Path(cache_dir) / f"{spec.key()}.npz"
    if path is not None and path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = _simulate_set(spec, progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return arrays
