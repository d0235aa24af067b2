"""`SPPModel`: the entry point for saved adapters, like PEFT's `AutoPeftModelForCausalLM`: `from_pretrained`
(download an adapter and its pruned base, check the base's zeros, merge; `adapters.pretrained`) and `save_merged`
(`merge_to_folder`, what `spp-hf merge` runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .merging import merge_to_folder
from .pretrained import load_base_model, load_pretrained

__all__ = ["SPPModel", "load_base_model"]


class SPPModel:
    """Entry point for loading saved adapters (SPP, masked LoRA, sparse PEFT), like PEFT's `AutoPeftModelForCausalLM`."""

    from_pretrained = staticmethod(load_pretrained)

    @staticmethod
    def save_merged(adapter: str | os.PathLike, out: str | os.PathLike, base_model: str | None = None, **kwargs: Any) -> Path:
        """Merge an adapter (folder or Hub repo) into its pruned base and save a plain transformers checkpoint with
        the base's zeros: `spp_hf.adapters.merging.merge_to_folder` (`spp-hf merge`; same keyword arguments).

        SPP and masked-LoRA adapters are merged decoder layer by decoder layer (the model need not fit in memory;
        ``in_memory=True`` loads it whole); sparse-PEFT adapters are merged in memory with PEFT's checked
        ``merge_and_unload`` and written by storage's model-folder writer.
        """
        return merge_to_folder(adapter, out, base_model=base_model, **kwargs)
