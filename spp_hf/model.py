"""Injecting SPP into a `PreTrainedModel`: `get_spp_model`, the `SPPModelMixin`, and `SPPModel.from_pretrained`."""

from __future__ import annotations

import logging
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, SPPConfig
from .files import atomic_save_safetensors, atomic_write_text
from .layer import SPPLinear, valid_r_message
from .sparsity import compare_fingerprints, fingerprint_modules
from .weights import dense_weight, in_out_features, is_linear_like

logger = logging.getLogger(__name__)

_MIXED_CLASSES: dict[type, type] = {}


class SPPMismatchError(ValueError):
    """The adapter was trained on a base with a different zero pattern."""


# --------------------------------------------------------------------------- target selection
def find_target_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the modules that `target_modules` selects (suffix names, a regex, or "all-linear")."""
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not name or ".base_layer" in name:
            continue
        if target_modules == "all-linear":
            if (is_linear_like(module) or isinstance(module, SPPLinear)) and module is not output_embeddings:
                names.append(name)
        elif isinstance(target_modules, str):
            if re.fullmatch(target_modules, name):
                names.append(name)
        elif any(name == t or name.endswith("." + t) for t in target_modules):
            names.append(name)
    return names


def _validate_targets(model: nn.Module, names: list[str], config: SPPConfig) -> None:
    """Check every target before anything is changed, so a bad config leaves the model untouched."""
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear_like(m)})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
            f"Linear layers in this model are named: {linear}. Pass some of these, or 'all-linear'."
        )
    for name in names:
        module = model.get_submodule(name)
        if not is_linear_like(module):
            raise TypeError(
                f"Module {name!r} is a {type(module).__name__}; SPP wraps only nn.Linear, transformers "
                "Conv1D and bitsandbytes Linear4bit/Linear8bitLt. Remove it from target_modules."
            )
        _, out_features = in_out_features(module)
        if out_features % config.r:
            raise ValueError(valid_r_message(name, out_features, config.r))


def _mixed_class(cls: type) -> type:
    if issubclass(cls, SPPModelMixin):
        return cls
    if cls not in _MIXED_CLASSES:
        _MIXED_CLASSES[cls] = type(f"SPP{cls.__name__}", (SPPModelMixin, cls), {"_spp_base_class": cls})
    return _MIXED_CLASSES[cls]


def get_spp_model(model: nn.Module, config: SPPConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap the target linear layers of `model` with `SPPLinear`, in place, and freeze the base.

    Returns the same object; its class now also derives from `SPPModelMixin`, so
    `save_pretrained` / `push_to_hub` write the adapter only and `merge_and_unload` gives back
    the original transformers class with merged, still-sparse weights.
    """
    if isinstance(model, SPPModelMixin):
        model.add_adapter(adapter_name, config)
        return model
    names = find_target_modules(model, config.target_modules)
    _validate_targets(model, names, config)
    for param in model.parameters():
        param.requires_grad_(False)
    _wrap(model, names, config, adapter_name)
    model.__class__ = _mixed_class(type(model))
    model.spp_config = {adapter_name: config}
    model.active_spp_adapter = adapter_name
    if getattr(model, "is_quantized", False):
        # transformers trains a quantized model only if it carries adapters; SPP is one on a frozen base.
        model._hf_peft_config_loaded = True
    if config.mask_fingerprint is None:
        config.mask_fingerprint = model.spp_fingerprint()
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    if config.base_model_revision is None:
        from .hub import base_commit

        config.base_model_revision = getattr(model.config, "_commit_hash", None) or base_commit(config.base_model_name_or_path)
    return model


def _wrap(model: nn.Module, names: list[str], config: SPPConfig, adapter_name: str) -> None:
    dtype = getattr(torch, config.adapter_dtype)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = SPPLinear(
            getattr(parent, child), r=config.r, scale=config.scale, dropout=config.dropout, impl=config.impl,
            use_beta=config.use_beta, zero_init=config.zero_init, adapter_dtype=dtype, adapter_name=adapter_name,
        )  # fmt: skip
        setattr(parent, child, layer)


def _layer_kwargs(config: SPPConfig) -> dict[str, Any]:
    return dict(
        r=config.r, scale=config.scale, dropout=config.dropout, impl=config.impl, use_beta=config.use_beta,
        zero_init=config.zero_init, adapter_dtype=getattr(torch, config.adapter_dtype),
    )  # fmt: skip


# --------------------------------------------------------------------------- the mixin
class SPPModelMixin:
    """Mixed into a transformers model's class by `get_spp_model`.

    Holds `spp_config` (adapter name → SPPConfig) and `active_spp_adapter`. Save/push write only
    α/β; `merge_and_unload` restores the original class.
    """

    spp_config: dict[str, SPPConfig]
    active_spp_adapter: str

    # -- layers
    def spp_layers(self) -> Iterator[tuple[str, SPPLinear]]:
        for name, module in self.named_modules():
            if isinstance(module, SPPLinear):
                yield name, module

    def spp_fingerprint(self) -> dict:
        """Mask fingerprint of the wrapped base weights (shape, zeros, hash per module).

        Sharded weights (FSDP2, ZeRO-3) are gathered one layer at a time: call it on every rank.
        """
        from .sharding import spp_mask_fingerprint

        return spp_mask_fingerprint(self)

    @property
    def active_spp_config(self) -> SPPConfig:
        return self.spp_config[self.active_spp_adapter]

    # -- adapters
    def add_adapter(self, adapter_name: str, config: SPPConfig) -> None:  # type: ignore[override]
        """Attach another named adapter (on the same target layers) and make it active."""
        if adapter_name in self.spp_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; known: {list(self.spp_config)}")
        names = [n for n, _ in self.spp_layers()]
        wanted = find_target_modules(self, config.target_modules)
        if sorted(wanted) != sorted(names):
            raise ValueError(
                "A further adapter must target the same layers as the first one "
                f"({len(names)} layers); {config.target_modules!r} selects {len(wanted)}."
            )
        for name in names:
            out_features = self.get_submodule(name).out_features
            if out_features % config.r:
                raise ValueError(valid_r_message(name, out_features, config.r))
        for _, layer in self.spp_layers():
            layer.add_adapter(adapter_name, **_layer_kwargs(config))
        config.mask_fingerprint = config.mask_fingerprint or self.spp_fingerprint()
        config.base_model_name_or_path = config.base_model_name_or_path or self.active_spp_config.base_model_name_or_path
        config.base_model_revision = config.base_model_revision or self.active_spp_config.base_model_revision
        self.spp_config[adapter_name] = config
        self.active_spp_adapter = adapter_name

    def set_adapter(self, adapter_name: str) -> None:  # type: ignore[override]
        """Make a named adapter active on every SPP layer."""
        if adapter_name not in self.spp_config:
            raise KeyError(f"No adapter {adapter_name!r}; known adapters: {list(self.spp_config)}")
        for _, layer in self.spp_layers():
            layer.set_adapter(adapter_name)
        self.active_spp_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:  # type: ignore[override]
        for _, layer in self.spp_layers():
            layer.delete_adapter(adapter_name)
        del self.spp_config[adapter_name]

    @contextmanager
    def disable_spp(self) -> Iterator[None]:
        """Run the base model alone (unmerging temporarily if merged)."""
        layers = [layer for _, layer in self.spp_layers()]
        remerge = [layer for layer in layers if layer.merged]
        for layer in remerge:
            layer.unmerge()
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False
            for layer in remerge:
                layer.merge()

    # -- merge
    def merge_spp(self) -> None:
        """Fold the active adapter into the base weights in place; all layers checked before any write."""
        layers = [layer for _, layer in self.spp_layers() if not layer.merged]
        merged = [(layer, layer.merged_weight()) for layer in layers]  # raises before any weight changes
        from .weights import set_dense_weight

        for layer, weight in merged:
            set_dense_weight(layer.base_layer, weight)
            layer.merged = True

    def unmerge_spp(self) -> None:
        """Restore the base weights after `merge_spp` (to float tolerance; zeros exact)."""
        for _, layer in self.spp_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge, remove the SPP wrappers and return the model as its original transformers class."""
        self.merge_spp()
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove the SPP wrappers (merged or not) and restore the original class."""
        for name, layer in list(self.spp_layers()):
            parent_name, _, child = name.rpartition(".")
            parent = self.get_submodule(parent_name) if parent_name else self
            setattr(parent, child, layer.base_layer)
        for attr in ("spp_config", "active_spp_adapter", "_hf_peft_config_loaded"):
            self.__dict__.pop(attr, None)
        self.__class__ = self._spp_base_class
        return self

    # -- state
    def spp_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """α/β of one adapter, keyed `<module>.spp_alpha` / `<module>.spp_beta`."""
        adapter_name = adapter_name or self.active_spp_adapter
        state = {}
        for name, layer in self.spp_layers():
            if adapter_name == layer.active_adapter:
                alpha, beta = layer.spp_alpha, layer.spp_beta
            else:
                alpha, beta = layer._inactive[adapter_name]["alpha"], layer._inactive[adapter_name]["beta"]
            state[f"{name}.spp_alpha"], state[f"{name}.spp_beta"] = alpha, beta
        return state

    def load_spp_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Copy α/β into an adapter, checking names and shapes first (nothing changes on error)."""
        own = self.spp_state_dict(adapter_name)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"Adapter weights do not fit this model: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}. Was it trained on another "
                "architecture or with other target_modules?"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"Adapter tensor {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}.")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        selected_adapters: list[str] | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save only the adapter(s): `spp_config.json`, `spp_adapter.safetensors`, `README.md`.

        The active adapter (or "default") goes in `save_directory`, others in sub-folders named
        after them, as PEFT does. Keyword arguments the Trainer passes (state_dict, …) are ignored.
        """
        if not is_main_process:
            return
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory.")
        for name in selected_adapters or list(self.spp_config):
            target = save_directory if name == "default" or len(self.spp_config) == 1 else save_directory / name
            self._save_adapter(target, name)
        if push_to_hub:
            from .hub import push_adapter

            push_adapter(self, kwargs.get("repo_id") or save_directory.name, folder=save_directory)

    def _save_adapter(self, directory: Path, adapter_name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = self.spp_config[adapter_name]
        tensors = {k: v.detach().float() if v.dtype == torch.float64 else v for k, v in self.spp_state_dict(adapter_name).items()}
        atomic_save_safetensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt", "spp_adapter": adapter_name})
        config.save_pretrained(directory)
        from .cards import render_adapter_card

        atomic_write_text(directory / "README.md", render_adapter_card(config, self))

    def load_adapter(self, path_or_repo: str | os.PathLike, adapter_name: str = "default", strict: bool = True, **hub_kwargs: Any) -> None:  # type: ignore[override]
        """Load a saved SPP adapter into this model under `adapter_name` (added if new)."""
        directory = resolve_adapter(path_or_repo, **hub_kwargs)
        config = SPPConfig.from_json_file(directory / CONFIG_NAME)
        state = _read_weights(directory)
        if adapter_name not in self.spp_config:
            self.add_adapter(adapter_name, config)
        else:
            self.spp_config[adapter_name] = config
        check_fingerprint(config, self.spp_fingerprint(), strict=strict)
        self.load_spp_state_dict(state, adapter_name)
        self.set_adapter(adapter_name)

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **kwargs: Any,
    ) -> str:
        """Upload only the adapter (spp_config.json, spp_adapter.safetensors, README.md with the SPP card)."""
        from .hub import push_adapter

        return push_adapter(
            self, repo_id, private=private, revision=revision, commit_message=commit_message, token=token, create_pr=create_pr
        )

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


# --------------------------------------------------------------------------- loading
def resolve_adapter(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local adapter directory, or the local snapshot of an adapter repo on the Hub."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    from .hub import download_adapter

    return download_adapter(str(path_or_repo), **hub_kwargs)


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"No {WEIGHTS_NAME} in {directory}: the adapter is incomplete. Save it again with "
            "model.save_pretrained(...) or re-download it."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or not a safetensors file ({err}). Save or download the adapter again.") from None


def check_fingerprint(config: SPPConfig, found: dict, strict: bool = True) -> None:
    """Compare the adapter's recorded base fingerprint with the base it is loaded onto."""
    expected = config.mask_fingerprint
    if not expected:
        return
    difference = compare_fingerprints(expected, found)
    if difference is None:
        return
    message = (
        f"This SPP adapter was trained on base {config.base_model_name_or_path!r} "
        f"(revision {config.base_model_revision}, mask hash {expected['hash'][:12]}), but the base it is being "
        f"loaded onto has mask hash {found['hash'][:12]}: {difference}. Load the pruned base the adapter was "
        "trained on (base_model=..., revision=...), or pass strict=False to load anyway."
    )
    if strict:
        raise SPPMismatchError(message)
    warnings.warn(message, stacklevel=3)


def load_base_model(name_or_path: str, revision: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a causal-LM base with transformers (a local folder or a Hub repo id)."""
    from transformers import AutoModelForCausalLM

    from .hub import base_model_errors

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
        exact zeros is returned; otherwise the SPP model (trainable when `is_trainable`).
        """
        directory = resolve_adapter(adapter_name_or_path, revision=revision, token=token)
        config = SPPConfig.from_json_file(directory / CONFIG_NAME)
        state = _read_weights(directory)
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
        found_names = find_target_modules(model, config.target_modules)
        _validate_targets(model, found_names, config)
        check_fingerprint(config, fingerprint_modules((n, dense_weight(model.get_submodule(n))) for n in found_names), strict)
        model = get_spp_model(model, config, adapter_name=adapter_name)
        model.load_spp_state_dict(state, adapter_name)
        if merge:
            return model.merge_and_unload()
        for _, layer in model.spp_layers():
            layer.spp_alpha.requires_grad_(is_trainable)
            layer.spp_beta.requires_grad_(is_trainable and layer.use_beta)
        if not is_trainable:
            model.eval()
        return model
