"""Adapters on pruned models: the kind-agnostic layer and model machinery, adapter files, and one module per
adapter kind (`spp`, `masked_lora`), both registered when this package is imported."""

from .masked_lora import MaskedLoRAConfig
from .spp import SPPConfig

__all__ = ["MaskedLoRAConfig", "SPPConfig"]
