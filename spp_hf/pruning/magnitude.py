"""Magnitude pruning: drop the weights of smallest |W| within each output row (or each group of M)."""

from __future__ import annotations

import torch

from .masks import SparsitySpec, mask_from_scores


@torch.no_grad()
def prune_magnitude_(weight: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Zero the lowest-|W| weights of a dense (out, in) weight in place; returns the pruning mask."""
    mask = mask_from_scores(weight.abs().float(), spec)
    weight.masked_fill_(mask, 0)
    return mask
