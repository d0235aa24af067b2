"""Wanda (Sun et al. 2023): score each weight by |W_ij| * ||X_j||_2 and prune the lowest scores per output row.

`||X_j||_2` is the L2 norm of input feature j over all calibration tokens, gathered by `InputNorms`.
"""

from __future__ import annotations

import torch

from .masks import SparsitySpec, mask_from_scores


class InputNorms:
    """Running sum of squares of each input feature over all calibration tokens."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64, copy=True)  # a copy even in float64: squared in place
        self.sq_sum += x.pow_(2).sum(0)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 for every input feature j."""
        return self.sq_sum.sqrt().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W| * ||X||_2, broadcast over output rows."""
    return weight.abs().float() * input_norms.to(weight.device).float().reshape(1, -1)


@torch.no_grad()
def prune_wanda_(weight: torch.Tensor, stats: InputNorms, spec: SparsitySpec) -> torch.Tensor:
    """Zero the lowest-scoring weights of a dense (out, in) weight in place; returns the pruning mask."""
    mask = mask_from_scores(wanda_scores(weight, stats.norms), spec)
    weight.masked_fill_(mask, 0)
    return mask
