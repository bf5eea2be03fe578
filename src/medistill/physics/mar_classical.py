"""Classical metal artifact reduction baselines: linear interpolation (LI) and NMAR, on batches.

Why: every MAR paper reports LI (Kalender et al., Radiology 164, 1987) and NMAR (Meyer et al., Med. Phys.
37, 2010) next to its network, and DuDoNet-style inputs are LI sinograms. LI replaces the metal trace of
each view by a straight line between the nearest unaffected bins. NMAR first divides the sinogram by the
projection of a prior image (the LI image thresholded into air / soft tissue / bone), interpolates the
flattened sinogram, and multiplies back, so tissue edges inside the trace survive. Deviations: the
prior's thresholds are fixed HU values instead of Meyer's k-means clustering, and a constant offset
in the normalisation keeps rays through air (prior sinogram ~0) stable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medistill.physics import ct
from medistill.physics.attenuation import hu_to_mu, mu_to_hu


def interpolate_trace(sinogram: Tensor, trace: Tensor) -> Tensor:
    """Linear interpolation along the bins (per view) over ``trace`` (bool), ``B V K`` -> ``B V K``.

    Bins of the trace get the straight line between the nearest unaffected bins on either side; at a
    detector edge the nearest unaffected value is held. Views with no unaffected bin are left as they are.
    """
    k = sinogram.shape[-1]
    idx = torch.arange(k, device=sinogram.device).expand_as(sinogram)
    good = ~trace
    # index of the nearest good bin at or left of each bin (-1: none), and at or right of it (k: none)
    left = torch.where(good, idx, torch.full_like(idx, -1)).cummax(-1).values
    right = torch.where(good, idx, torch.full_like(idx, k)).flip(-1).cummin(-1).values.flip(-1)
    has_left, has_right = left >= 0, right < k
    vl = sinogram.gather(-1, left.clamp(0, k - 1))
    vr = sinogram.gather(-1, right.clamp(0, k - 1))
    span = (right - left).clamp_min(1).to(sinogram.dtype)
    t = (idx - left).to(sinogram.dtype) / span
    line = vl + t * (vr - vl)
    filled = torch.where(has_left & has_right, line, torch.where(has_left, vl, vr))
    filled = torch.where(has_left | has_right, filled, sinogram)
    return torch.where(trace, filled, sinogram)


def li_sinogram(sinogram: Tensor, trace: Tensor) -> Tensor:
    """LI-corrected sinogram ``B V K`` (the DuDoNet/InDuDoNet "S_LI" input)."""
    return interpolate_trace(sinogram, trace)


def li_mar(sinogram: Tensor, trace: Tensor, geometry: ct.CTGeometry, filter_name: str = "ramp") -> Tensor:
    """LI-corrected image ``B H W`` (1/mm at 70 keV)."""
    return ct.fbp(li_sinogram(sinogram, trace), geometry, filter_name)


def nmar_prior(li_mu: Tensor, air_hu: float = -500.0, bone_hu: float = 350.0) -> Tensor:
    """Meyer's prior ``B H W`` (1/mm): air (< ``air_hu``) -> 0, soft tissue -> water (0 HU), bone kept."""
    hu = mu_to_hu(li_mu)
    prior_hu = torch.where(
        hu < air_hu, torch.full_like(hu, -1000.0), torch.where(hu < bone_hu, torch.zeros_like(hu), hu)
    )
    return hu_to_mu(prior_hu)


def nmar(
    sinogram: Tensor,
    trace: Tensor,
    geometry: ct.CTGeometry,
    filter_name: str = "ramp",
    li_mu: Tensor | None = None,
    offset: float = 1.0,
) -> Tensor:
    """NMAR-corrected image ``B H W`` (1/mm at 70 keV). ``li_mu``: the LI image, if already computed.

    Normalisation is ``(p + c) / (p_prior + c)`` with ``c = offset`` (line-integral units; 1 is about
    50 mm of water): through tissue (``p_prior`` several units) this is Meyer's ratio, through air (prior
    near 0, metal at the skin) it falls back to LI instead of dividing noise by ~0.
    """
    if li_mu is None:
        li_mu = li_mar(sinogram, trace, geometry, filter_name)
    prior_sino = ct.project(nmar_prior(li_mu), geometry) + offset
    flat = interpolate_trace((sinogram + offset) / prior_sino, trace)
    return ct.fbp(flat * prior_sino - offset, geometry, filter_name)
