"""Materials, spectrum, polychromatic metal simulation and the LI / NMAR baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from example_data import require_example
from medistill.errors import MedistillError
from medistill.io.images import read_image
from medistill.physics import ct, mar_classical, metal
from medistill.physics.attenuation import EFFECTIVE_KEV, MU_WATER_PER_MM, hu_to_mu, mu_to_hu
from medistill.physics.materials import decompose_water_bone, kramers_spectrum, material

E0 = torch.tensor(EFFECTIVE_KEV)


def test_nist_tables_match_known_values() -> None:
    water, iron = material("water"), material("iron")
    # mu/rho: water 0.193 cm2/g at 70 keV (log-log between 60 and 80 keV), iron 0.3717 at 100 keV
    assert math.isclose(float(water.mu_per_mm(E0)) * 10 / water.density_g_cm3, 0.193, rel_tol=0.01)
    assert math.isclose(
        float(iron.mu_per_mm(torch.tensor(100.0))) * 10 / iron.density_g_cm3, 0.372, rel_tol=0.005
    )
    energies = torch.arange(20.0, 151.0, 5.0)
    for name in ("water", "bone", "titanium", "iron", "aluminium"):
        mu = material(name).mu_per_mm(energies)
        assert bool((mu[1:] < mu[:-1]).all()), name  # no edges in 20-150 keV: strictly decreasing
    with pytest.raises(MedistillError, match="unknown material"):
        material("gold")
    with pytest.raises(MedistillError, match="table range"):
        material("water").mu_per_mm(torch.tensor(10.0))


def test_mu_water_is_the_shipped_nist_table_at_the_effective_energy() -> None:
    """One HU scale: MU_WATER_PER_MM is the water table at EFFECTIVE_KEV; HU 0 / -1000 map to it / 0."""
    table = material("water")
    assert float(table.mu_per_mm(E0)) == pytest.approx(MU_WATER_PER_MM, rel=1e-6)
    # by hand: the 60 and 80 keV rows of xcom_water.csv, log-log interpolated at 70 keV, 1 g/cm3, 1/cm -> 1/mm
    rows = dict(zip(table.energies_kev, table.mu_over_rho_cm2_g, strict=True))
    t = math.log(EFFECTIVE_KEV / 60.0) / math.log(80.0 / 60.0)
    by_hand = math.exp((1 - t) * math.log(rows[60.0]) + t * math.log(rows[80.0])) * table.density_g_cm3 / 10
    assert by_hand == pytest.approx(MU_WATER_PER_MM, rel=1e-6)
    mu = hu_to_mu(torch.tensor([-1000.0, 0.0, 1000.0], dtype=torch.float64))
    assert mu.tolist() == pytest.approx([0.0, MU_WATER_PER_MM, 2 * MU_WATER_PER_MM], rel=1e-12)


def test_kramers_spectrum() -> None:
    energies, weights = kramers_spectrum(120.0, filtration_mm_al=6.0)
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-9)
    assert energies.max() < 120.0 and weights[-1] < weights.max() / 20  # falls to 0 at the kVp
    mean = float((energies * weights).sum())
    assert 50.0 < mean < 70.0  # 120 kVp, 6 mm Al: mean energy about half the kVp
    _, soft = kramers_spectrum(120.0, filtration_mm_al=1.0)
    assert float((energies * weights).sum()) > float((energies[: len(soft)] * soft).sum())  # filter hardens
    with pytest.raises(MedistillError, match="kVp"):
        kramers_spectrum(200.0)


def test_water_bone_decomposition_reproduces_reference_attenuation() -> None:
    hu = torch.tensor([-1000.0, -500.0, 0.0, 100.0, 800.0, 1500.0, 2500.0])
    rho_w, rho_b = decompose_water_bone(hu)
    mu = rho_w * material("water").mu_per_mm(E0) + rho_b * material("bone").mu_per_mm(E0)
    torch.testing.assert_close(mu.float(), hu_to_mu(hu).float(), rtol=1e-6, atol=1e-7)
    assert rho_b[:4].abs().max() == 0 and rho_w[-2:].abs().max() == 0  # pure water below, pure bone above
    torch.testing.assert_close(mu_to_hu(hu_to_mu(hu[1:])), hu[1:], rtol=1e-5, atol=1e-3)


def test_polychromatic_water_is_linearised_and_bone_hardens() -> None:
    thickness = torch.tensor([[[0.0, 10.0, 100.0, 300.0]]])
    scan = metal.MetalScan(photons=1e14)  # ~noise-free
    water = metal.polychromatic_sinogram({"water": thickness}, scan, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        water, thickness * material("water").mu_per_mm(E0).float(), rtol=2e-3, atol=1e-4
    )
    raw = metal.polychromatic_sinogram({"bone": thickness}, metal.MetalScan(photons=1e14, water_bhc=False))
    per_mm = raw[0, 0, 1:] / thickness[0, 0, 1:]
    assert bool((per_mm[1:] < per_mm[:-1]).all())  # beam hardening: effective mu falls with thickness


def test_poisson_noise_and_photon_starvation() -> None:
    gen = torch.Generator().manual_seed(0)
    water = torch.full((1, 200, 200), 200.0)
    scan = metal.MetalScan(photons=1e4, water_bhc=False)
    p = metal.polychromatic_sinogram({"water": water}, scan, gen)
    expected_counts = 1e4 * torch.exp(-p.mean())
    assert math.isclose(float(p.var()), 1 / float(expected_counts), rel_tol=0.1)  # var(-log N) = 1/N
    thick_iron = metal.polychromatic_sinogram({"iron": torch.full((1, 4, 4), 200.0)}, scan, gen)
    torch.testing.assert_close(thick_iron, torch.full_like(thick_iron, math.log(1e4)))  # 1-photon floor
    with pytest.raises(MedistillError, match="photon count"):
        metal.MetalScan(photons=0)
    with pytest.raises(MedistillError, match="unknown metal"):
        metal.MetalScan(metal="lead")


def test_linear_interpolation_restores_a_linear_sinogram() -> None:
    bins = torch.arange(40, dtype=torch.float32)
    sino = (3.0 + 0.5 * bins).expand(2, 5, 40).clone()
    trace = torch.zeros(2, 5, 40, dtype=torch.bool)
    trace[:, :, 10:17] = True
    trace[1, 2, 30:] = True  # runs off the detector edge: hold the last good value
    corrupted = sino.masked_fill(trace, 99.0)
    fixed = mar_classical.interpolate_trace(corrupted, trace)
    torch.testing.assert_close(fixed[:, :, :30], sino[:, :, :30])
    torch.testing.assert_close(fixed[1, 2, 30:], torch.full((10,), float(sino[1, 2, 29])))


def test_metal_masks_are_seeded_inside_the_fov() -> None:
    body = np.full((96, 96), 40.0)
    masks = metal.random_metal_masks(body, 1.0, 8, np.random.default_rng(3))
    again = metal.random_metal_masks(body, 1.0, 8, np.random.default_rng(3))
    assert masks.shape == (8, 96, 96) and (masks == again).all()
    assert masks.reshape(8, -1).sum(1).min() >= 4
    geometry = ct.CTGeometry(96, 1.0, 8, 139, 1.0, beam="parallel", angle_range_rad=math.pi)
    metal.check_metal_in_fov(torch.from_numpy(masks), geometry)
    corner = torch.zeros(1, 96, 96, dtype=torch.bool)
    corner[0, 1, 1] = True
    with pytest.raises(MedistillError, match="field of view"):
        metal.check_metal_in_fov(corner, geometry)
    for kind in metal.MASK_KINDS:
        assert metal.metal_mask(kind, 96, 1.0, (0.0, 0.0), np.random.default_rng(0)).sum() > 4


@pytest.fixture(scope="module")
def chest_slices() -> torch.Tensor:
    volume = read_image(require_example("chest-ct") / "cxr.nii.gz").array
    hu = torch.from_numpy(np.clip(volume[:, :, [50, 80]], -1024, None).astype(np.float32)).permute(2, 0, 1)
    return F.interpolate(hu[:, None], size=(128, 128), mode="area")[:, 0]  # 2.8 mm pixels


def test_metal_artifacts_then_li_then_nmar_on_real_slices(chest_slices: torch.Tensor) -> None:
    """Inserted metal makes streaks; LI removes most, NMAR at least as much (RMSE outside the metal)."""
    px, sod_px = 2.8125, 1075 / 416 * 128  # the InDuDoNet source distance in pixels
    geometry = ct.CTGeometry(
        128, px, 160, 185, ct._fan_arc_spacing(128, sod_px, 185), beam="fan", detector="arc",
        sod_mm=sod_px * px, sdd_mm=2 * sod_px * px,
    )  # fmt: skip
    rngs = [np.random.default_rng(i) for i in range(len(chest_slices))]
    masks = torch.from_numpy(
        np.stack(
            [metal.random_metal_masks(s.numpy(), geometry.pixel_mm, 1, rng, ("ellipse",))[0]
             for s, rng in zip(chest_slices, rngs, strict=True)]
        )
    )  # fmt: skip
    scan = metal.MetalScan(metal="iron", photons=1e6)
    out = metal.simulate_metal(chest_slices, masks, geometry, scan, torch.Generator().manual_seed(0))
    assert set(out) >= {"clean_hu", "artifact_hu", "metal_mask", "sino_clean", "sino_metal", "metal_trace"}
    li = mar_classical.li_mar(out["sino_metal"], out["metal_trace"], geometry)
    nm = mar_classical.nmar(out["sino_metal"], out["metal_trace"], geometry, li_mu=li)
    keep = ~out["metal_mask"]

    def rmse(hu: torch.Tensor) -> float:
        return float((hu - out["clean_hu"])[keep].pow(2).mean().sqrt())

    artifact, li_err, nmar_err = (
        rmse(out["artifact_hu"]),
        rmse(mu_to_hu(li)),
        rmse(mu_to_hu(nm)),
    )
    free = rmse(out["free_hu"])
    assert artifact > 2 * li_err  # streaks (measured 189 vs 62 HU): LI removes most of them
    assert nmar_err <= 1.02 * li_err  # measured 56 vs 62 HU
    assert free < nmar_err  # the metal-free scan through the same chain is the floor
    # the measured sinogram equals the clean one away from the metal trace, up to noise and beam hardening
    away = ~out["metal_trace"]
    assert float((out["sino_metal"] - out["sino_clean"])[away].abs().mean()) < 0.05
