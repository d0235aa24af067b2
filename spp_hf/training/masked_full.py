"""Masked full fine-tuning: the upper reference of the recovery comparison, not an adapter type.

Every non-zero weight of the targeted linear layers trains; everything else is frozen. The pruning
mask is kept twice over: a gradient hook zeroes the gradient at pruned positions (so AdamW's moments
stay zero there and its decoupled weight decay multiplies a zero), and `KeepZerosCallback` writes the
zeros back after every optimizer step (so no optimizer, clipping or rounding detail can fill them).
It costs what SPP avoids: a gradient and two Adam moments for every weight of the targeted layers.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from ..adapters.model import find_target_modules


class MaskKeeper:
    """Freezes a model except the targeted linear weights, and keeps their zeros zero while they train."""

    def __init__(self, model: nn.Module, target_modules: Sequence[str] | str) -> None:
        names = find_target_modules(model, list(target_modules) if not isinstance(target_modules, str) else target_modules)
        weights = {name: model.get_submodule(name).weight for name in names}
        bad = [name for name, w in weights.items() if not isinstance(w, nn.Parameter) or not w.is_floating_point()]
        if not names or bad:
            raise ValueError(
                f"Masked full fine-tuning needs floating-point linear weights to train; target_modules={target_modules!r} "
                f"selected {len(names)} modules{f', of which these are not: {bad[:3]}' if bad else ''}. "
                "Load the pruned base unquantized and name its linear layers (e.g. q_proj, v_proj)."
            )
        for param in model.parameters():
            param.requires_grad_(False)
        self.weights = weights
        self.zeros = {name: (w == 0).detach().clone() for name, w in weights.items()}  # True where pruned
        self._hooks = []
        for name, weight in weights.items():
            weight.requires_grad_(True)
            self._hooks.append(weight.register_hook(_zero_at(self.zeros[name])))

    @property
    def trainable_parameters(self) -> int:
        """Weights that actually train: the non-zero entries of the targeted layers."""
        return sum(int((~zeros).sum()) for zeros in self.zeros.values())

    @torch.no_grad()
    def reapply(self) -> None:
        """Write the pruning mask's zeros back into the weights."""
        for name, weight in self.weights.items():
            weight.masked_fill_(self.zeros[name].to(weight.device), 0.0)

    def remove(self) -> None:
        """Drop the gradient hooks (the weights stay trainable)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _zero_at(zeros: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(zeros.to(grad.device), 0.0)

    return hook


class KeepZerosCallback(TrainerCallback):
    """Re-applies the pruning mask after every optimizer step of a `transformers.Trainer`."""

    def __init__(self, keeper: MaskKeeper) -> None:
        self.keeper = keeper

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.keeper.reapply()
