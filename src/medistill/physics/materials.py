"""Energy-dependent attenuation of CT materials, an X-ray tube spectrum, and water/bone decomposition.

Why: metal artifacts are beam hardening plus photon starvation, so a simulator needs mu(E) of each
material and a polychromatic spectrum (Zhang & Yu, IEEE TMI 37, 2018; ADN's ``simulate_metal_artifact.m``).
- mu/rho(E) come from the NIST X-ray mass attenuation tables (Hubbell & Seltzer, NIST SRD 126; the
  "with coherent scattering" totals of XCOM) shipped as ``medistill/data/xcom_<material>.csv`` at the
  table energies 20-150 keV, interpolated log-log (the standard way; no absorption edge lies in range).
- The spectrum is Kramers' law (Kramers, Phil. Mag. 46, 1923) for a tungsten anode, photon fluence
  ``Phi(E) ~ (kVp - E) / E``, hardened by aluminium filtration with Beer-Lambert. Deviation: no
  characteristic W K lines (58-69 keV); they change the mean energy by a few keV, not the artifacts' kind.
- Water/bone decomposition follows the linear blend of Zhang & Yu: bone fraction ramps from 0 at
  ``water_hu`` to 1 at ``bone_hu``, and each material's density is chosen so that the mixture reproduces
  the CT's attenuation at the effective energy of :mod:`medistill.physics.attenuation` (70 keV), whose
  ``hu_to_mu`` is the one HU -> mu conversion.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

from medistill.errors import MedistillError
from medistill.physics.attenuation import EFFECTIVE_KEV, MU_WATER_PER_MM, hu_to_mu

MATERIALS = ("water", "bone", "titanium", "iron", "aluminium")


@dataclass(frozen=True)
class Material:
    """A tabulated material: ``density_g_cm3`` and ``mu_over_rho_cm2_g`` at ``energies_kev``."""

    name: str
    density_g_cm3: float
    energies_kev: tuple[float, ...]
    mu_over_rho_cm2_g: tuple[float, ...]

    def mu_per_mm(self, energies_kev: Tensor, density_g_cm3: float | None = None) -> Tensor:
        """Linear attenuation (1/mm) at ``energies_kev`` (any shape), log-log interpolated."""
        e = torch.as_tensor(energies_kev, dtype=torch.float64)
        lo, hi = self.energies_kev[0], self.energies_kev[-1]
        if bool((e < lo).any() or (e > hi).any()):
            raise MedistillError(f"{self.name}: energies must lie in the table range {lo:g}-{hi:g} keV")
        table_e = torch.log(torch.tensor(self.energies_kev, dtype=torch.float64))
        table_mu = torch.log(torch.tensor(self.mu_over_rho_cm2_g, dtype=torch.float64))
        x = torch.log(e)
        i = torch.searchsorted(table_e, x.reshape(-1), right=True).clamp(1, len(table_e) - 1).reshape(x.shape)
        t = (x - table_e[i - 1]) / (table_e[i] - table_e[i - 1])
        mu_rho = torch.exp(table_mu[i - 1] + t * (table_mu[i] - table_mu[i - 1]))
        density = self.density_g_cm3 if density_g_cm3 is None else density_g_cm3
        return mu_rho * density / 10.0  # cm^2/g * g/cm^3 = 1/cm -> 1/mm


@functools.cache
def material(name: str) -> Material:
    """The shipped NIST table of ``name`` (one of :data:`MATERIALS`)."""
    if name not in MATERIALS:
        raise MedistillError(f"unknown material {name!r}; choose one of {MATERIALS}")
    text = resources.files("medistill").joinpath(f"data/xcom_{name}.csv").read_text()
    density = None
    rows: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("#"):
            if "density_g_cm3:" in line:
                density = float(line.split("density_g_cm3:")[1])
            continue
        if line and not line.startswith("energy"):
            rows.extend((float(a), float(b)) for a, b in csv.reader([line]))
    if density is None or not rows:
        raise MedistillError(f"material table xcom_{name}.csv has no density or no rows")
    return Material(name, density, tuple(r[0] for r in rows), tuple(r[1] for r in rows))


def kramers_spectrum(
    kvp: float = 120.0, filtration_mm_al: float = 6.0, step_kev: float = 1.0, min_kev: float = 20.0
) -> tuple[Tensor, Tensor]:
    """Photon spectrum ``(energies_kev E, weights E)`` of a W tube, Kramers' law + Al filtration.

    Weights are relative photon numbers per bin and sum to 1. Energies run from ``min_kev`` to just below
    ``kvp`` in ``step_kev`` steps (bin centres).
    """
    if not 30.0 < kvp <= 150.0:
        raise MedistillError(f"kVp must lie in (30, 150] (the attenuation tables end at 150 keV): {kvp}")
    energies = torch.arange(min_kev + step_kev / 2, kvp, step_kev, dtype=torch.float64)
    fluence = (kvp - energies) / energies
    fluence = fluence * torch.exp(-material("aluminium").mu_per_mm(energies) * filtration_mm_al)
    return energies, fluence / fluence.sum()


def effective_mu_per_mm(name: str, energies_kev: Tensor, weights: Tensor) -> float:
    """Spectrum-weighted mean attenuation (1/mm) of ``name``: a quick effective-energy summary."""
    return float((material(name).mu_per_mm(energies_kev) * weights).sum())


def decompose_water_bone(
    hu: Tensor, water_hu: float = 100.0, bone_hu: float = 1500.0
) -> tuple[Tensor, Tensor]:
    """Split a CT (HU, any shape) into water and bone *relative densities* (1 = the tabulated density).

    Bone fraction ``f = clip((HU - water_hu) / (bone_hu - water_hu), 0, 1)``; the water density is
    ``(1 - f) mu / mu_water`` and the bone density ``f mu / mu_bone`` at
    :data:`~medistill.physics.attenuation.EFFECTIVE_KEV` (``mu`` from
    :func:`~medistill.physics.attenuation.hu_to_mu`), so ``rho_w mu_w(E0) + rho_b mu_b(E0) = mu(HU)``
    (to the 1e-7 by which :data:`~medistill.physics.attenuation.MU_WATER_PER_MM` rounds the water table).
    """
    if bone_hu <= water_hu:
        raise MedistillError(f"bone_hu ({bone_hu}) must exceed water_hu ({water_hu})")
    mu = hu_to_mu(hu)
    frac = ((hu - water_hu) / (bone_hu - water_hu)).clamp(0.0, 1.0)
    rho_water = (1 - frac) * mu / MU_WATER_PER_MM
    rho_bone = frac * mu / float(material("bone").mu_per_mm(torch.tensor(EFFECTIVE_KEV)))
    return rho_water, rho_bone
