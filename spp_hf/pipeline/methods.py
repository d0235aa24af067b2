"""What a recovery method of `spp-hf run` is, and the registry of them.

A method turns the pruned base into a trainer (`prepare`) and, once trained, into a plain transformers
model that keeps the base's zeros (`Prepared.merge`). The pipeline does everything else the same way
for every method: data, steps, seeds, timing, peak memory, the bit-for-bit zero check, saving and
evaluation. Adding a method is one `register(...)` call; the shipped ones (SPP, masked LoRA, LoRA*, masked
full fine-tuning) are in `spp_hf.pipeline.builtin_methods`, registered when `spp_hf.pipeline.run` is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..sparsity import iter_linear_weights
from .config import PipelineConfig

Zeros = dict[str, torch.Tensor]  # linear weight name -> True where the pruned base is zero


@dataclass
class Prepared:
    """A trainer ready to train, and how to turn its model into the merged, still-sparse model."""

    trainer: Any
    trainable_parameters: int  # the weights the method can change (masked full FT: the non-zero ones)
    merge: Callable[[], nn.Module]  # after training: a plain transformers model
    card: Callable[[nn.Module], str]  # the merged model's card
    kind: str = "merged"  # sparsity.json kind of the merged model (storage.MODEL_KINDS)
    save_adapter: Callable[[Path], None] | None = None  # adapter methods: write the trained adapter to a folder


PrepareFn = Callable[[PipelineConfig, Path, Any, Any, dict[str, Any], Zeros], Prepared]


@dataclass(frozen=True)
class Method:
    """A recovery method: its report label, its learning rate in a config, and how it prepares a trainer."""

    label: str  # as the report names it
    learning_rate: Callable[[PipelineConfig], float]
    prepare: PrepareFn  # (cfg, pruned base, train rows, training args, trainer kwargs, base zeros) -> Prepared


METHODS: dict[str, Method] = {}


def register(name: str, method: Method) -> None:
    """Make `name` usable in a pipeline config's `methods:` list; a name is registered once."""
    if name in METHODS:
        raise ValueError(f"A recovery method named {name!r} is already registered ({METHODS[name].label}); pick another name.")
    METHODS[name] = method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(
            f"Unknown recovery method {name!r}; registered: {sorted(METHODS)}. Add one with spp_hf.pipeline.methods.register "
            "(importing spp_hf.pipeline.builtin_methods, as spp_hf.pipeline.run does, registers the shipped ones)."
        )
    return METHODS[name]


def load_plain(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a checkpoint folder, in float32."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def linear_zeros(model: nn.Module) -> Zeros:
    """Where each linear weight of `model` is exactly zero."""
    return {name: (w == 0).clone() for name, w in iter_linear_weights(model)}
