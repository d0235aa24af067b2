"""Adapter kinds: everything spp-hf knows about one adapter type, in one registered object.

A kind is one module (`spp.py`, `masked_lora.py`, or a user's own) that defines its config class and its
math and calls `register_adapter_kind(AdapterKind(...))` once. Everything generic (the layer, injection,
adapter files, cards, the Hub, `spp-hf inspect`) asks the kind for what it needs; nothing else names a
kind. The registry refuses a second kind of the same name or config class, as PEFT's
`register_peft_method` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MERGED_MODEL_KINDS = ("spp-merged", "merged")
DEFAULT_KIND = "spp"  # what a layer built without a config gets, and what an old config file without `method` holds


@dataclass(frozen=True)
class AdapterKind:
    """One adapter type.

    name: the config's `method`, written to `spp_config.json` ("spp", "masked_lora").
    label: how people call it ("SPP", "Masked-LoRA"): card titles, `describe_folder`, `spp-hf inspect`.
    config_class: its `AdapterConfig` subclass (whose `method` is `name`).
    param_names: the layer's `nn.ParameterDict` attributes holding its tensors (also the key suffixes
        in adapter files, ``<module>.<param_name>``).
    setting_names: per-adapter plain settings, kept in dicts of the same names on the layer.
    settings(config) -> {setting: value}.
    validate(in_features, out_features, config, module_name): raise if the config cannot fit such a
        layer (SPP: r must divide out_features); runs before anything is built or wrapped.
    init(layer, config, device) -> {param_name: tensor}: fresh tensors for a new adapter.
    trainable(settings) -> the param names that train, given `settings(config)` (others stay frozen).
    forward(layer, adapter_name, x, *args, **kwargs) -> Y with the adapter applied.
    merged_weight(layer, adapter_name, weight) -> W + s·ΔW for the dense (out, in) weight given in
        `compute_dtype` (the layer casts, checks zeros and finiteness, and keeps the original).
    parameter_count(config, out_features, in_features) -> trainable parameters on one such layer.
    card_settings(config) -> [(setting, value)] rows of the cards' training table.
    adapter_description: the cards' first paragraph for an adapter; `{base_link}`, `{num_layers}` and
        `{adapter_params}` are filled in.
    merged_description: the same for a model with the adapter merged; `{base_link}`, `{sparsity_summary}`.
    merged_model_kind: the `sparsity.json` kind of a merged model ("spp-merged" or "merged").
    """

    name: str
    label: str
    config_class: type
    param_names: tuple[str, ...]
    setting_names: tuple[str, ...]
    settings: Callable[[Any], dict[str, Any]]
    validate: Callable[[int, int, Any, str], None]
    init: Callable[[Any, Any, torch.device], dict[str, torch.Tensor]]
    trainable: Callable[[dict[str, Any]], tuple[str, ...]]
    forward: Callable[..., torch.Tensor]
    merged_weight: Callable[[Any, str, torch.Tensor], torch.Tensor]
    parameter_count: Callable[[Any, int, int], int]
    card_settings: Callable[[Any], list[tuple[str, str]]]
    adapter_description: str
    merged_description: str
    merged_model_kind: str = "merged"


KINDS: dict[str, AdapterKind] = {}


def register_adapter_kind(kind: AdapterKind) -> AdapterKind:
    """Make spp-hf accept adapters of `kind` everywhere; refuses a name or parameter name in use, and a config
    class whose `method` is not the kind's name (so one class belongs to one kind)."""
    if getattr(kind.config_class, "method", None) != kind.name:
        raise ValueError(f"{kind.config_class.__name__}.method must be {kind.name!r}, the kind's name.")
    if kind.merged_model_kind not in MERGED_MODEL_KINDS:
        raise ValueError(f"merged_model_kind must be one of {MERGED_MODEL_KINDS}, got {kind.merged_model_kind!r}.")
    for other in KINDS.values():
        clash = "name" if other.name == kind.name else "parameter name" if set(other.param_names) & set(kind.param_names) else None
        if clash:
            raise ValueError(
                f"An adapter kind with the {clash} of {kind.name!r} is already registered ({other.name!r}); "
                "give the new kind its own name (its config class's `method`) and parameter names."
            )
    KINDS[kind.name] = kind
    return kind


def kind_named(name: Any) -> AdapterKind:
    """The kind a `method` names, or a ValueError listing the registered ones."""
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(
            f"method must be one of {sorted(KINDS)}, got {name!r}: the adapter was written by another tool or a "
            "newer spp-hf. Upgrade with `pip install -U spp-hf`, or fix the method field."
        )
    return kind


def kind_of(config: Any) -> AdapterKind:
    """The kind of a config object, or a TypeError naming the accepted config classes."""
    for kind in KINDS.values():
        if type(config) is kind.config_class:
            return kind
    accepted = ", ".join(k.config_class.__name__ for k in KINDS.values())
    raise TypeError(
        f"spp-hf layers take an adapter config of type {accepted}, not {type(config).__name__}. "
        "For LoRA and other PEFT methods use peft.get_peft_model; for SPP pass SPPConfig(...)."
    )


def all_param_names() -> tuple[str, ...]:
    """Every registered kind's parameter names (the key suffixes adapter files may hold)."""
    return tuple(dict.fromkeys(p for kind in KINDS.values() for p in kind.param_names))
