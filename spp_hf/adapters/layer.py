"""`SPPLinear`: a frozen linear layer with named adapters of any registered kind, as PEFT's tuner layers.

The layer is kind-agnostic: it keeps each adapter's tensors in `nn.ParameterDict`s and its settings in
dicts named after the kind's `param_names` / `setting_names`, and asks the kind (`kinds.kind_of(config)`)
to validate, initialise, run and merge. Merges are checked here, once for every kind.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from ..layer_weights import QUANTIZED_MERGE_MESSAGE, dense_weight, in_out_features, is_linear_like, is_quantized, set_dense_weight
from .chunked import compute_dtype
from .kinds import DEFAULT_KIND, KINDS, AdapterKind, kind_named, kind_of

ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def check_adapter_name(adapter_name: Any) -> str:
    """Refuse names that are not a plain identifier-like word (they become folder names and parameter keys)."""
    if not isinstance(adapter_name, str) or not ADAPTER_NAME_RE.fullmatch(adapter_name):
        raise ValueError(
            f"Invalid adapter name {adapter_name!r}: an adapter name is saved as a sub-folder name and a parameter "
            "key, so it must be 1-64 letters, digits, '_' or '-' (not starting with '-'), e.g. 'default' or 'task_a'."
        )
    return adapter_name


class SPPLinear(nn.Module):
    """A frozen linear layer (Linear, Conv1D or bitsandbytes 4/8-bit) with named adapters, as PEFT's tuner layers.

    ``SPPLinear(base_layer, adapter_name, config)`` wraps the base with one adapter (SPP by default);
    `update_layer` adds more, of any registered kind. An adapter's tensors live in `nn.ParameterDict`s
    named by its kind (SPP: ``spp_alpha[name]`` r × in_features and ``spp_beta[name]`` out_features × 1),
    so every adapter moves, casts and saves like any parameter; per-adapter settings (SPP: r, scale,
    dropout, impl, use_beta) are dicts keyed the same way. One adapter is active (`active_adapter`);
    only its parameters train.

    Merging writes W + s·ΔW into the base weight, refusing (weights untouched) if, after the cast to
    the base dtype, a value is not finite, a zero would become non-zero or a non-zero zero; zeros are
    written as +0.0. The original weight is kept while merged (one copy of the weight, a non-persistent
    buffer), so `unmerge` restores it bit for bit.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", config: Any = None) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(
                f"SPP can wrap nn.Linear, transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt, "
                f"not {type(base_layer).__name__}."
            )
        config = kind_named(DEFAULT_KIND).config_class() if config is None else config
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        for kind in KINDS.values():
            self._add_kind_storage(kind)
        self.adapter_kind: dict[str, AdapterKind] = {}
        self.merged_adapter: str | None = None
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.disabled = False
        self.update_layer(adapter_name, config)  # validates before the base is touched
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.active_adapter = adapter_name
        _register_sharded_weight(self)

    # ----------------------------------------------------------------- adapters
    def _add_kind_storage(self, kind: AdapterKind) -> None:
        """The ParameterDicts and settings dicts a kind's adapters live in (a kind registered later gets them here)."""
        for name in kind.param_names:
            if not hasattr(self, name):
                setattr(self, name, nn.ParameterDict())
        for name in kind.setting_names:
            if not hasattr(self, name):
                setattr(self, name, {})

    def check_config(self, config: Any, name: str = "") -> AdapterKind:
        """Validate a config for this layer (its kind's checks, e.g. SPP's r) without changing anything; returns its kind."""
        kind = kind_of(config)
        kind.validate(self.in_features, self.out_features, config, name)
        return kind

    def adapter_shapes(self, config: Any, name: str = "") -> dict[str, tuple[int, ...]]:
        """{param name: shape} an adapter with `config` has on this layer (checked; nothing allocated)."""
        kind = self.check_config(config, name)
        return {key: tuple(value.shape) for key, value in kind.init(self, config, torch.device("meta")).items()}

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Create adapter `adapter_name` from `config` (replacing an existing one of that name), freshly
        initialised and trainable; the active adapter does not change. Everything is checked first."""
        check_adapter_name(adapter_name)
        kind = self.check_config(config)
        if self.merged_adapter == adapter_name:
            raise RuntimeError(f"Adapter {adapter_name!r} is merged into the base weight; unmerge first.")
        device = self.base_layer.weight.device
        tensors = kind.init(self, config, torch.device("cpu") if device.type == "meta" else device)
        self._drop(adapter_name)
        self._add_kind_storage(kind)
        settings = kind.settings(config)
        for key, value in settings.items():
            getattr(self, key)[adapter_name] = value
        for key, value in tensors.items():
            getattr(self, key)[adapter_name] = nn.Parameter(value, requires_grad=key in kind.trainable(settings))
        self.adapter_kind[adapter_name] = kind

    def _drop(self, adapter_name: str) -> None:
        kind = self.adapter_kind.pop(adapter_name, None)
        if kind is None:
            return
        for key in kind.param_names:
            del getattr(self, key)[adapter_name]
        for key in kind.setting_names:
            getattr(self, key).pop(adapter_name, None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_kind)

    def _name(self, adapter_name: str | None) -> str:
        name = self.active_adapter if adapter_name is None else adapter_name
        if name not in self.adapter_kind:
            raise KeyError(f"No adapter {name!r} on this layer; known adapters: {self.adapter_names}")
        return name

    def adapter_parameters(self, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
        """{param name: parameter} of one adapter (the active one by default), e.g. {"spp_alpha": α, "spp_beta": β}.
        The param name is the suffix of the key in adapter files (``<module>.spp_alpha``)."""
        name = self._name(adapter_name)
        return {key: getattr(self, key)[name] for key in self.adapter_kind[name].param_names}

    def set_trainable(self, trainable: bool, adapter_name: str | None = None) -> None:
        """Make one adapter (active by default) trainable or frozen; parameters its config keeps fixed
        (β when use_beta is False) stay frozen."""
        name = self._name(adapter_name)
        keep = self.adapter_kind[name].trainable(self.adapter_settings(name))
        for key, param in self.adapter_parameters(name).items():
            param.requires_grad_(trainable and key in keep)

    def adapter_settings(self, adapter_name: str | None = None) -> dict[str, Any]:
        """{setting: value} of one adapter (the active one by default), e.g. {"r": 16, "scale": 2.0, ...}."""
        name = self._name(adapter_name)
        return {key: getattr(self, key)[name] for key in self.adapter_kind[name].setting_names}

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` active; it becomes trainable if the layer's active adapter was, others are frozen."""
        name = self._name(adapter_name)
        if name == self.active_adapter:
            return
        if self.merged:
            raise RuntimeError(
                f"Adapter {self.merged_adapter!r} is merged into the base weights; unmerge first "
                "(model.unmerge_spp()), switch, then merge again."
            )
        trainable = any(p.requires_grad for p in self.adapter_parameters().values())
        for other in self.adapter_names:
            self.set_trainable(False, other)
        self.set_trainable(trainable, name)
        self.active_adapter = name

    def delete_adapter(self, adapter_name: str) -> None:
        name = self._name(adapter_name)
        if name == self.active_adapter:
            raise ValueError(f"Cannot delete the active adapter {name!r}; set_adapter another first.")
        self._drop(name)

    # ----------------------------------------------------------------- math
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's dense (out, in) weight (dequantized for 4/8-bit bases)."""
        return dense_weight(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapter_kind[self.active_adapter].forward(self, self.active_adapter, x, *args, **kwargs)

    # ----------------------------------------------------------------- merge
    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    @torch.no_grad()
    def merged_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """W + s·ΔW of an adapter as a dense (out, in) tensor in the base dtype, checked after the cast:
        all finite, every zero of W still zero (written +0.0), no non-zero of W turned into zero."""
        name = self._name(adapter_name)
        weight = self.weight
        if is_quantized(self.base_layer):
            raise TypeError(QUANTIZED_MERGE_MESSAGE)
        dtype = compute_dtype(weight.dtype, *(p.dtype for p in self.adapter_parameters(name).values()))
        merged = self.adapter_kind[name].merged_weight(self, name, weight.to(dtype)).to(weight.dtype)
        zero = weight == 0
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"Refusing to merge adapter {name!r}: the merged {weight.dtype} weight would not be finite (factors "
                "hold NaN/Inf, or the product overflows this dtype). The base weights were left untouched; check "
                "training for divergence, or merge onto a wider dtype (e.g. float32)."
            )
        if (merged[zero] != 0).any():
            raise ValueError("Refusing to merge: the merge would fill zeros of the pruned base. Weights left untouched.")
        if (merged[~zero] == 0).any():
            raise ValueError(
                f"Refusing to merge adapter {name!r}: {int((merged[~zero] == 0).sum())} non-zero weights would "
                f"become zero in {weight.dtype} (1 + s·ΔW factor at or near 0, or underflow), which would change the "
                "sparsity mask. The base weights were left untouched."
            )
        return merged.masked_fill_(zero, 0.0)

    @torch.no_grad()
    def merge(self, adapter_name: str | None = None) -> None:
        """Fold an adapter (the active one) into the base weight in place; the original is kept for `unmerge`."""
        name = self._name(adapter_name)
        if self.merged:
            if self.merged_adapter == name:
                return
            raise RuntimeError(f"Adapter {self.merged_adapter!r} is already merged; unmerge first.")
        merged = self.merged_weight(name)
        self._unmerged_weight = self.base_layer.weight.detach().clone()
        set_dense_weight(self.base_layer, merged)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit from the copy kept by `merge` (no division)."""
        if not self.merged:
            return
        self.base_layer.weight.data.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapter = None

    def extra_repr(self) -> str:
        name = self.active_adapter
        settings = ", ".join(f"{k}={v}" for k, v in self.adapter_settings(name).items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapter={name!r}, {settings}"


def _register_sharded_weight(layer: SPPLinear) -> None:
    """Under DeepSpeed ZeRO-3 the base weight is partitioned and gathered only for the forward of the
    module that owns it; the SPP layer reads it in its own forward and backward, so register it as
    an external parameter of the SPP layer (DeepSpeed then gathers it for both passes).

    FSDP needs nothing: it unshards a whole wrapped unit (a decoder layer) around its forward and
    backward, and the fused function saves the same weight tensor `F.linear` would.
    """
    if is_deepspeed_zero3_enabled():
        import deepspeed  # optional: only present (and only needed) under DeepSpeed ZeRO-3

        deepspeed.zero.register_external_parameter(layer, layer.base_layer.weight)
