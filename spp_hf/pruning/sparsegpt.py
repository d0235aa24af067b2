"""SparseGPT (Frantar & Alistarh 2023): prune column by column and update the remaining weights (OBS).

With H = 2 X X^T over the calibration inputs, the weights are processed in column blocks (128 by default).
At the start of each block the mask is chosen from W^2 / diag(H^-1)^2; then every column is quantized to
its masked value and the error is spread over the not-yet-processed columns through the Cholesky factor of
H^-1, exactly as in the reference implementation (`sparsegpt.py`, `fasterprune`). N:M masks are chosen
per group of M columns when the group's first column is reached, as there.

One deliberate difference: for unstructured sparsity the reference picks one threshold over a whole block,
so rows end up with different sparsities; here each row prunes its own share of every block, so every row
has exactly `int(in_features * ratio)` zeros (like Wanda's per-output comparison). Dead inputs (zero
Hessian diagonal) get a unit diagonal but are not forced to zero, so the pattern stays exact.
"""

from __future__ import annotations

import math

import torch

from .masks import SparsitySpec

DEFAULT_BLOCKSIZE = 128
DEFAULT_PERCDAMP = 0.01


class Hessian:
    """Accumulates H = 2/N * sum_t x_t x_t^T over the N calibration tokens seen (float32).

    Layers fed the same input (q/k/v, gate/up) share one Hessian; its inverse Cholesky factor is computed once. That
    inverse consumes the sum: H is scaled, damped and factored in the sum's own memory (a wide layer's Hessian is
    tens of MB, LLaMA-7B's down_proj's 485 MB), so afterwards only the inverse at that dampening is available;
    `add_batch` and other dampenings are refused.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.xtx: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self._inverse: dict[float, torch.Tensor] = {}

    def _sum(self) -> torch.Tensor:
        if self.xtx is None:
            raise RuntimeError(
                f"This Hessian's sum was consumed by its inverse at percdamp {list(self._inverse)}: accumulate a new "
                "Hessian to add batches or to invert it at another dampening."
            )
        return self.xtx

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self._sum().addmm_(x.t(), x)
        self.tokens += x.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        return self._sum() * (2.0 / max(self.tokens, 1))

    def inverse_cholesky(self, percdamp: float) -> torch.Tensor:
        if percdamp not in self._inverse:
            matrix = self._sum().mul_(2.0 / max(self.tokens, 1))  # the same values as `matrix`, in place
            self.xtx = None
            self._inverse[percdamp] = inverse_cholesky(matrix, percdamp, overwrite=True)
        return self._inverse[percdamp]


def inverse_cholesky(hessian: torch.Tensor, percdamp: float, overwrite: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1 with damp = percdamp * mean(diag H), as the reference computes it.

    `overwrite` lets it damp `hessian` in place instead of a copy; each intermediate matrix is freed once used
    (a wide layer's are tens of MB each)."""
    H = hessian if overwrite else hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    try:
        L = torch.linalg.cholesky(H)
        H.zero_().diagonal().fill_(1)  # the identity, in H's memory (H is no longer needed)
        Hinv = torch.cholesky_solve(H, L)
        del H, L
        return torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"SparseGPT: the calibration Hessian is not positive definite even with {percdamp:.0%} dampening ({err}). "
            "Use more calibration samples or a larger dampening (percdamp)."
        ) from None


@torch.no_grad()
def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: Hessian | torch.Tensor,
    spec: SparsitySpec,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
) -> torch.Tensor:
    """Prune a dense (out, in) weight in place with the OBS update; returns the pruning mask.

    Works on the transposed weight so that each column is a contiguous vector (same arithmetic as the
    reference, which updates column slices of the (out, in) matrix).
    """
    if isinstance(hessian, Hessian):
        Hinv = hessian.inverse_cholesky(percdamp).to(weight.device)
    else:
        Hinv = inverse_cholesky(hessian.to(weight.device, torch.float32), percdamp)
    WT = weight.detach().t().float().contiguous()  # (in, out): row i is column i of W
    columns = WT.shape[0]
    if spec.is_nm:  # blocks must hold whole groups of M
        blocksize = max(spec.m, blocksize - blocksize % spec.m)
        prune_per_group = spec.m - spec.n
    maskT = torch.zeros_like(WT, dtype=torch.bool)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = WT[i1:i2]  # updated in place; ends up holding the pruned values
        mask1 = maskT[i1:i2]
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1).reshape(-1, 1)
        Err1 = torch.empty_like(W1)
        if not spec.is_nm:
            k = math.floor(spec.ratio * i2) - math.floor(spec.ratio * i1)  # this block's share of each row
            if k:
                tmp = W1**2 / d1**2
                mask1.scatter_(0, torch.topk(tmp, k, dim=0, largest=False).indices, True)
        for i in range(i2 - i1):
            if spec.is_nm and i % spec.m == 0:
                tmp = W1[i : i + spec.m] ** 2 / d1[i : i + spec.m] ** 2
                mask1.scatter_(0, i + torch.topk(tmp, prune_per_group, dim=0, largest=False).indices, True)
            w = W1[i]
            err = torch.where(mask1[i], w, 0.0).div_(Hinv1[i, i])
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
            w.masked_fill_(mask1[i], 0)
            Err1[i] = err
        if i2 < columns:
            WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)

    weight.copy_(WT.t().to(weight.dtype))
    return maskT.t()
