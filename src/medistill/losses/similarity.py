"""Image similarity losses for unsupervised registration: global Pearson correlation and local NCC.

``1 - r`` with ``r`` the Pearson correlation over the whole volume (the original LDR/RCN loss,
population statistics, +1e-6 in the variances), and ``1 - mean LNCC`` over cubic windows (VoxelMorph's
local normalised cross-correlation, squared, computed by box filters). Both average over the batch
(the original summed; averaging keeps the LR independent of the batch size).
Inputs are ``B 1 *spatial`` (2D or 3D). ``role = "similarity"``: a registration task gives these the
fixed image and the warped moving image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medistill.registry import LOSSES


@LOSSES.register("pearson")
class PearsonLoss(nn.Module):
    """``1 - r(fixed, warped)``, Pearson's ``r`` over every voxel of each volume, averaged over the batch."""

    role = "similarity"

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        a, b = fixed.float().flatten(1), warped.float().flatten(1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        cov = (a * b).mean(1)
        r = cov / torch.sqrt((a.pow(2).mean(1) + 1e-6) * (b.pow(2).mean(1) + 1e-6))
        return (1 - r).mean()


@LOSSES.register("lncc")
class LocalNCCLoss(nn.Module):
    """``1 - mean cc^2`` with ``cc`` the correlation in a ``window``-voxel cube around each voxel."""

    role = "similarity"

    def __init__(self, window: int = 9, eps: float = 1e-5) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"lncc window must be odd and >= 1, got {window}")
        self.window, self.eps = window, eps

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        a, b = fixed.float(), warped.float()
        dims = a.ndim - 2
        pool = F.avg_pool3d if dims == 3 else F.avg_pool2d
        w, pad = self.window, self.window // 2

        def mean(x: torch.Tensor) -> torch.Tensor:
            return pool(x, w, stride=1, padding=pad, count_include_pad=False)

        ma, mb = mean(a), mean(b)
        cov = mean(a * b) - ma * mb
        va = (mean(a * a) - ma * ma).clamp(min=0)
        vb = (mean(b * b) - mb * mb).clamp(min=0)
        cc2 = cov * cov / (va * vb + self.eps)
        return 1 - cc2.mean()
