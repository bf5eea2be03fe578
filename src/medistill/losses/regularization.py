"""Regularisers of registration: smoothness of a displacement field and plausibility of an affine map.

* ``grad_smooth``: the original RCN/LDR smoothness, ``1/2 sum_d sum (d_d u)^2 / (N * voxels)`` with
  forward differences (TF ``l2_loss`` over ``3 * 128^3``), applied to each deformable stem's own flow.
* ``bending``: bending energy ``mean sum_{i,j} (d_i d_j u)^2`` (second differences), an alternative.
* ``affine_reg``: the RCN affine stem's ``det_weight * 1/2 (det A - 1)^2 + ortho_weight * sum_i
  (l_i + (1+e)^2 / l_i) - 2 N (1+e)`` with ``l_i`` the eigenvalues of ``C = A^T A + e I``, computed without
  an eigen-decomposition (trace, principal minors and determinant of ``C``), averaged over the batch.

``role``: "flow" terms get each deformable stem's flow ``B N *spatial`` (voxels); "affine" terms get
``A = I + W`` ``B N N``.
"""

from __future__ import annotations

import torch
from torch import nn

from medistill.registry import LOSSES


def _diff(u: torch.Tensor, axis: int) -> torch.Tensor:
    return u.narrow(axis, 1, u.shape[axis] - 1) - u.narrow(axis, 0, u.shape[axis] - 1)


@LOSSES.register("grad_smooth")
class GradientSmoothness(nn.Module):
    """``1/2 sum_axes sum (forward difference of u)^2 / (N * voxels)``, averaged over the batch."""

    role = "flow"

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        u = flow.float()
        per = u[0].numel()
        total = sum(_diff(u, a).pow(2).flatten(1).sum(1) for a in range(2, u.ndim))
        return (0.5 * total / per).mean()


@LOSSES.register("bending")
class BendingEnergy(nn.Module):
    """``mean over voxels of sum_{i,j} (d_i d_j u)^2`` (second forward differences), batch-averaged."""

    role = "flow"

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        u = flow.float()
        axes = range(2, u.ndim)
        terms = []
        for i in axes:
            di = _diff(u, i)
            for j in axes:
                if j < i:
                    continue
                dij = _diff(di, j)
                terms.append((1 if i == j else 2) * dij.pow(2).flatten(1).mean(1))
        return torch.stack(terms).sum(0).mean()


@LOSSES.register("affine_reg")
class AffineRegulariser(nn.Module):
    """Determinant and orthogonality loss of ``A`` ``B N N`` (RCN, Zhao et al. 2019)."""

    role = "affine"

    def __init__(self, det_weight: float = 0.1, ortho_weight: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.det_weight, self.ortho_weight, self.eps = det_weight, ortho_weight, eps

    def forward(self, matrix: torch.Tensor) -> torch.Tensor:
        a = matrix.float()
        n, e = a.shape[-1], self.eps
        det = torch.linalg.det(a)
        c = a.transpose(-1, -2) @ a + e * torch.eye(n, device=a.device)
        s1 = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1)  # sum of eigenvalues
        s3 = torch.linalg.det(c)  # product
        # sum 1/l_i = (sum of the principal (n-1)-minors) / det: for n = 3 that is e2 = (tr^2 - tr C^2) / 2,
        # for n = 2 the trace
        minors = 0.5 * (s1**2 - (c @ c).diagonal(dim1=-2, dim2=-1).sum(-1)) if n == 3 else s1
        inv_sum = minors / s3
        ortho = s1 + (1 + e) ** 2 * inv_sum - 2 * n * (1 + e)
        return (self.det_weight * 0.5 * (det - 1) ** 2 + self.ortho_weight * ortho).mean()
