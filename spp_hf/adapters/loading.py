"""`SPPModel.from_pretrained`: download an adapter and its pruned base, check the base's zeros, merge."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..hub.transfer import base_model_errors, resolve_adapter
from ..sparsity import model_fingerprint
from ..storage import CONFIG_NAME
from .files import adapter_targets, check_fingerprint, read_adapter
from .layer import check_adapter_name
from .model import inject_adapter, validate_targets


def load_base_model(name_or_path: str, revision: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a causal-LM base with transformers (a local folder or a Hub repo id)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with base_model_errors(str(name_or_path), revision, kwargs.get("token")):
        return AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, **kwargs)


class SPPModel:
    """Entry point for loading saved SPP adapters, like PEFT's `AutoPeftModelForCausalLM`."""

    @classmethod
    def from_pretrained(
        cls,
        adapter_name_or_path: str | os.PathLike,
        base_model: str | nn.Module | None = None,
        merge: bool = True,
        revision: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        is_trainable: bool = False,
        strict: bool = True,
        adapter_name: str = "default",
        token: str | bool | None = None,
        base_revision: str | None = None,
        **base_kwargs: Any,
    ) -> nn.Module:
        """Load an adapter (local dir or Hub repo), attach it to its pruned base and merge.

        `base_model=None` takes `base_model_name_or_path` / `base_model_revision` from
        `spp_config.json`. With `merge=True` (default) a plain transformers model with the base's
        exact zeros is returned; otherwise the SPP model (trainable when `is_trainable`). A given
        `base_model` object is left as it was if loading fails.
        """
        check_adapter_name(adapter_name)
        directory = resolve_adapter(adapter_name_or_path, revision=revision, token=token)
        config, state = read_adapter(directory)
        if base_model is None or isinstance(base_model, (str, os.PathLike)):
            name = str(base_model) if base_model is not None else config.base_model_name_or_path
            if not name:
                raise ValueError(
                    f"{directory / CONFIG_NAME} names no base model; pass base_model=<pruned base path or repo id>."
                )
            rev = base_revision or (config.base_model_revision if base_model is None else None)
            model = load_base_model(name, revision=rev, torch_dtype=torch_dtype, device_map=device_map, token=token, **base_kwargs)
        else:
            model = base_model
        names = adapter_targets(config, state)
        validate_targets(model, names, config)
        check_fingerprint(config, model_fingerprint(model, names), strict)
        trainable = {id(p): p.requires_grad for p in model.parameters()}
        model = inject_adapter(model, config, adapter_name, names, loaded=True)
        try:
            model.load_spp_state_dict(state, adapter_name)
            if merge:
                model.merge_spp()
        except BaseException:
            model.unload()  # a given base_model object is handed back as it came
            for p in model.parameters():
                p.requires_grad_(trainable[id(p)])
            raise
        if merge:
            return model.unload()
        for _, layer in model.spp_layers():
            layer.set_trainable(is_trainable)
        if not is_trainable:
            model.eval()
        return model


