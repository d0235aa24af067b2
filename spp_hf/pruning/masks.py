"""Sparsity specs ("0.5", "2:4") and turning importance scores into pruning masks.

Every method scores each weight and keeps the highest scores *within each output row*: unstructured
pruning removes exactly `int(in_features * ratio)` weights per row, N:M pruning keeps exactly N weights
in every group of M consecutive inputs. A mask is a boolean tensor of the weight's (out, in) shape that
is True where the weight is pruned (set to zero).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparsitySpec:
    """Unstructured `ratio` (fraction of each row pruned) or an N:M pattern (N kept in every M inputs)."""

    ratio: float | None = None
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def fraction(self) -> float:
        """Fraction of weights pruned."""
        return 1 - self.n / self.m if self.is_nm else float(self.ratio)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    def pruned_per_row(self, in_features: int) -> int:
        """Number of weights unstructured pruning removes from a row of `in_features` inputs."""
        return int(in_features * self.ratio)

    def check_in_features(self, name: str, in_features: int) -> None:
        """Raise if a layer with `in_features` inputs cannot take this pattern."""
        if self.is_nm and in_features % self.m:
            raise ValueError(
                f"Cannot prune {name!r} to {self}: its {in_features} input features are not divisible by M={self.m}. "
                f"Choose an M that divides {in_features}, or leave this module out (modules=...)."
            )


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_sparsity(value: float | str | SparsitySpec) -> SparsitySpec:
    """Parse 0.5, "0.5", "50%" (unstructured ratio in (0, 1)) or "2:4" (N:M with 0 < N < M)."""
    if isinstance(value, SparsitySpec):
        spec = value
    elif isinstance(value, str) and _NM.match(value):
        n, m = (int(x) for x in _NM.match(value).groups())
        spec = SparsitySpec(n=n, m=m)
    else:
        try:
            text = str(value).strip()
            ratio = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(
                f"Sparsity {value!r} is neither a ratio (e.g. 0.5) nor an N:M pattern (e.g. 2:4)."
            ) from None
        spec = SparsitySpec(ratio=ratio)
    if spec.is_nm:
        if not 0 < spec.n < spec.m:
            raise ValueError(
                f"N:M sparsity {spec.n}:{spec.m} is invalid: N (weights kept per group) must satisfy 0 < N < M, "
                "e.g. 2:4 or 4:8."
            )
    elif not 0 < spec.ratio < 1:
        raise ValueError(f"Sparsity ratio {spec.ratio} is outside (0, 1): give the fraction of weights to prune, e.g. 0.5.")
    return spec


def mask_from_scores(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Boolean (out, in) mask, True = prune: the lowest scores per row, or per group of M for N:M."""
    out_f, in_f = scores.shape
    mask = torch.zeros(out_f, in_f, dtype=torch.bool, device=scores.device)
    if spec.is_nm:
        groups = scores.reshape(out_f, in_f // spec.m, spec.m)
        drop = torch.topk(groups, spec.m - spec.n, dim=-1, largest=False).indices
        mask.view(out_f, in_f // spec.m, spec.m).scatter_(-1, drop, True)
    else:
        k = spec.pruned_per_row(in_f)
        if k:
            drop = torch.topk(scores, k, dim=-1, largest=False).indices
            mask.scatter_(-1, drop, True)
    return mask
