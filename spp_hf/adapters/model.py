"""Adapters in a `PreTrainedModel`: target selection, `get_spp_model`, the `SPPModelMixin` (named adapters,
merge, save / load / push) and `load_adapter`. Adapter files live in `files`, `SPPModel.from_pretrained` in
`loading`."""

from __future__ import annotations

import copy
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..hub.transfer import base_commit, push_adapter, resolve_adapter
from ..layer_weights import in_out_features, is_linear_like
from ..storage import WEIGHTS_NAME
from .config import AdapterConfig
from .files import (
    adapter_targets,
    check_fingerprint,
    check_same_method,
    read_adapter,
    save_adapters,
)
from .kinds import kind_of
from .layer import SPPLinear, check_adapter_name
from .sharded_state import spp_mask_fingerprint
from .state import adapter_key, check_adapter_tensors, layer_state

_MIXED_CLASSES: dict[type, type] = {}


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


def validate_targets(model: nn.Module, names: list[str], config: Any) -> None:
    """Check every target before anything is changed, so a bad config leaves the model untouched:
    each exists, is linear-like, fits the adapter kind (SPP: r divides out_features), and owns its weight (not tied)."""
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear_like(m)})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
            f"Linear layers in this model are named: {linear}. Pass some of these, or 'all-linear'."
        )
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"The adapter targets module {name!r}, which {type(model).__name__} does not have.") from None
        if not is_linear_like(module):
            raise TypeError(
                f"Module {name!r} is a {type(module).__name__}; SPP wraps only nn.Linear, transformers "
                "Conv1D and bitsandbytes Linear4bit/Linear8bitLt. Remove it from target_modules."
            )
        kind_of(config).validate(*in_out_features(module), config, name)
        shared = [p for p in owners.get(id(module.weight), []) if p != f"{name}.weight"]
        if shared:
            raise ValueError(
                f"Module {name!r} shares its weight with {shared[0]!r} (tied embeddings): merging an adapter into "
                f"it would change {shared[0]!r} too. Remove {name!r} from target_modules."
            )


def _mixed_class(cls: type) -> type:
    if issubclass(cls, SPPModelMixin):
        return cls
    if cls not in _MIXED_CLASSES:
        _MIXED_CLASSES[cls] = type(f"SPP{cls.__name__}", (SPPModelMixin, cls), {"_spp_base_class": cls})
    return _MIXED_CLASSES[cls]


def get_spp_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap the target linear layers of `model` with `SPPLinear`, in place, and freeze the base.

    Returns the same object; its class now also derives from `SPPModelMixin`, so
    `save_pretrained` / `push_to_hub` write the adapter only and `merge_and_unload` gives back
    the original transformers class with merged, still-sparse weights. `config` is copied, never
    changed; the copy is keyed to `model` (`record_base`): the mask fingerprint measured from its
    weights, its name and the commit it was loaded from. No network access here: `push_to_hub` pins
    and checks the base commit.
    """
    if isinstance(model, SPPModelMixin):
        model.add_adapter(config, adapter_name=adapter_name)
        return model
    kind_of(config)
    return inject_adapter(model, config, adapter_name, find_target_modules(model, config.target_modules))


def inject_adapter(model: nn.Module, config: Any, adapter_name: str, names: list[str], *, loaded: bool = False) -> nn.Module:
    """`get_spp_model` on explicit module names (loading uses the names an adapter file lists, so a
    saved regex is never evaluated). Everything is validated before the model changes. A `loaded`
    adapter keeps the base its file records, filled in from `model` only where the file has nothing."""
    check_adapter_name(adapter_name)
    kind_of(config)
    validate_targets(model, names, config)
    config = copy.deepcopy(config)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SPPLinear(getattr(parent, child), adapter_name, config))
    model.__class__ = _mixed_class(type(model))
    model.spp_config = {adapter_name: config}
    model.active_spp_adapter = adapter_name
    if getattr(model, "is_quantized", False):
        # transformers trains a quantized model only if it carries adapters; SPP is one on a frozen base.
        model._hf_peft_config_loaded = True
    if not loaded:
        record_base(model, config)
        return model
    if config.mask_fingerprint is None:
        config.mask_fingerprint = model.spp_fingerprint()
    fill_base(model, config)
    return model


def record_base(model: nn.Module, config: AdapterConfig, reference: AdapterConfig | None = None) -> None:
    """Key a new adapter's config (the model's own copy) to `model`, the base it is added to.

    The mask fingerprint is always measured from the base weights now. A config that carries another
    fingerprint (filled for another base, or loaded with another adapter) names that base, so its base
    name and revision go too; on a config without one they were set by the user and are kept. What is
    missing comes from `reference` (the active adapter) if it was keyed to these zeros, else `fill_base`.
    """
    found = model.spp_fingerprint()
    if config.mask_fingerprint is not None and config.mask_fingerprint["hash"] != found["hash"]:
        config.base_model_name_or_path = config.base_model_revision = None
    config.mask_fingerprint = found
    same = reference is not None and (reference.mask_fingerprint or {}).get("hash") == found["hash"]
    if same and config.base_model_name_or_path is None and config.base_model_revision is None:
        config.base_model_name_or_path = reference.base_model_name_or_path
        config.base_model_revision = reference.base_model_revision
        return
    fill_base(model, config)


def fill_base(model: nn.Module, config: AdapterConfig) -> None:
    """Fill in the base name and revision `config` lacks from `model`: its `name_or_path`, and for that name
    the commit it was loaded from (``config._commit_hash``, else the one commit of it in the HF cache,
    `hub.transfer.base_commit`; None for a local folder)."""
    name = getattr(model, "name_or_path", None) or None
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = name
    if config.base_model_revision is None and config.base_model_name_or_path:
        commit = getattr(model.config, "_commit_hash", None) if config.base_model_name_or_path == name else None
        config.base_model_revision = commit or base_commit(  # revision=None: the cache only, never the network
            config.base_model_name_or_path)


def refuse_if_merged(model: nn.Module, action: str) -> None:
    """Raise if any SPP layer of `model` is merged: `action` would not be correct on merged weights."""
    merged = sorted({layer.merged_adapter for _, layer in model.spp_layers() if layer.merged})
    if merged:
        raise RuntimeError(
            f"Cannot {action} while adapter {merged[0]!r} is merged into the base weights: unmerge first "
            "(model.unmerge_spp()), then merge again afterwards if you want (model.merge_spp())."
        )


# --------------------------------------------------------------------------- the mixin
class SPPModelMixin:
    """Mixed into a transformers model's class by `get_spp_model`.

    Holds `spp_config` (adapter name → its config, owned by the model) and `active_spp_adapter`.
    Every method that changes adapters or weights validates everything first and then changes all
    or nothing. Save/push write only the adapter; `merge_and_unload` restores the original class.
    """

    spp_config: dict[str, AdapterConfig]
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
        return spp_mask_fingerprint(self)

    @property
    def active_spp_config(self) -> AdapterConfig:
        return self.spp_config[self.active_spp_adapter]

    # -- adapters (transformers' signatures; SPP configs only)
    def add_adapter(self, adapter_config: AdapterConfig, adapter_name: str | None = None) -> None:  # type: ignore[override]
        """Attach another named adapter (on the same target layers), freshly initialised, and make it active.

        `adapter_config` is copied; the copy is keyed to this model's base (`record_base`), whatever
        base the other adapters were trained on."""
        adapter_name = "default" if adapter_name is None else adapter_name
        check_adapter_name(adapter_name)
        kind_of(adapter_config)
        if adapter_name in self.spp_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; known: {list(self.spp_config)}")
        refuse_if_merged(self, "add an adapter")
        names = [n for n, _ in self.spp_layers()]
        wanted = find_target_modules(self, adapter_config.target_modules)
        if sorted(wanted) != sorted(names):
            raise ValueError(
                "A further adapter must target the same layers as the first one "
                f"({len(names)} layers); {adapter_config.target_modules!r} selects {len(wanted)}."
            )
        for name, layer in self.spp_layers():
            layer.check_config(adapter_config, name)
        config = copy.deepcopy(adapter_config)
        record_base(self, config, reference=self.active_spp_config)
        self._install_adapter(adapter_name, config)

    def _install_adapter(self, adapter_name: str, config: AdapterConfig, state: dict[str, torch.Tensor] | None = None) -> None:
        """Create (or replace) an adapter on every layer and make it active. Callers validated everything."""
        with torch.no_grad():
            for name, layer in self.spp_layers():
                layer.update_layer(adapter_name, config)
                if state is not None:
                    for key, param in layer.adapter_parameters(adapter_name).items():
                        param.copy_(state[adapter_key(name, key)])
        self.spp_config[adapter_name] = config
        self._activate(adapter_name)

    def _activate(self, adapter_name: str) -> None:
        for _, layer in self.spp_layers():
            layer.set_adapter(adapter_name)
        self.active_spp_adapter = adapter_name

    def set_adapter(self, adapter_name: str) -> None:  # type: ignore[override]
        """Make a named adapter active on every SPP layer (refused while another one is merged)."""
        if not isinstance(adapter_name, str):
            raise TypeError(f"SPP models have one active adapter; pass its name as a string, not {adapter_name!r}.")
        if adapter_name not in self.spp_config:
            raise KeyError(f"No adapter {adapter_name!r}; known adapters: {list(self.spp_config)}")
        if adapter_name != self.active_spp_adapter:
            refuse_if_merged(self, f"switch to adapter {adapter_name!r}")
        self._activate(adapter_name)

    def delete_adapter(self, adapter_names: list[str] | str) -> None:  # type: ignore[override]
        """Delete one or more inactive adapters (all names checked first)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.spp_config:
                raise KeyError(f"No adapter {name!r}; known adapters: {list(self.spp_config)}")
            if name == self.active_spp_adapter:
                raise ValueError(f"Cannot delete the active adapter {name!r}; set_adapter another first.")
        for name in names:
            for _, layer in self.spp_layers():
                layer.delete_adapter(name)
            del self.spp_config[name]

    @contextmanager
    def disable_spp(self) -> Iterator[None]:
        """Run the base model alone; a merged model is unmerged (exactly) and merged again on exit."""
        layers = [layer for _, layer in self.spp_layers()]
        remerge = [(layer, layer.merged_adapter) for layer in layers if layer.merged]
        for layer, _ in remerge:
            layer.unmerge()
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False
            for layer, name in remerge:
                layer.merge(name)

    # -- merge
    def merge_spp(self) -> None:
        """Fold the active adapter into the base weights in place: every layer merges or none does.

        Each merged layer keeps its original weight (one copy), so `unmerge_spp` is bit-exact.
        """
        done = []
        try:
            for _, layer in self.spp_layers():
                if not layer.merged:
                    layer.merge()
                    done.append(layer)
        except BaseException:
            for layer in reversed(done):
                layer.unmerge()
            raise

    def unmerge_spp(self) -> None:
        """Restore the base weights after `merge_spp`, bit for bit."""
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
        """One adapter's tensors keyed as in adapter files: `<module>.spp_alpha` / `<module>.spp_beta`."""
        adapter_name = adapter_name or self.active_spp_adapter
        if adapter_name not in self.spp_config:
            raise KeyError(f"No adapter {adapter_name!r}; known adapters: {list(self.spp_config)}")
        return layer_state(self.spp_layers(), adapter_name)

    def load_spp_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Copy tensors into an adapter, checking names, shapes, dtypes and finiteness first (nothing changes on error)."""
        adapter_name = adapter_name or self.active_spp_adapter
        own = self.spp_state_dict(adapter_name)
        check_adapter_tensors({k: tuple(v.shape) for k, v in own.items()}, state, "the given state dict")
        if any(layer.merged_adapter == adapter_name for _, layer in self.spp_layers()):
            refuse_if_merged(self, f"load weights into adapter {adapter_name!r}")
        with torch.no_grad():
            for key, param in own.items():
                param.copy_(state[key])

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        selected_adapters: list[str] | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save only the adapter(s): `spp_config.json`, `spp_adapter.safetensors`, `README.md`.

        One adapter goes in `save_directory` itself: "default" if it is saved, else the active
        adapter if saved, else the first; every other one in a sub-folder named after it (as PEFT
        saves non-default adapters). Keyword arguments the Trainer passes (state_dict, …) are ignored.
        """
        if not is_main_process:
            return
        save_adapters(self, save_directory, selected_adapters)
        if push_to_hub:
            push_adapter(self, kwargs.get("repo_id") or Path(save_directory).name, folder=save_directory)

    def load_adapter(  # type: ignore[override]
        self,
        peft_model_id: str | os.PathLike,
        adapter_name: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        is_trainable: bool = False,
        strict: bool = True,
        **hub_kwargs: Any,
    ) -> None:
        """Load a saved SPP adapter (folder or Hub repo) under `adapter_name` ("default" if None) and make it
        active; an existing adapter of that name is replaced. All checks (name, merged state, targets,
        shapes, dtypes, finiteness, mask fingerprint) run before the model changes."""
        load_adapter(
            self, peft_model_id, adapter_name="default" if adapter_name is None else adapter_name,
            revision=revision, token=token, is_trainable=is_trainable, strict=strict, **hub_kwargs,
        )  # fmt: skip

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
        return push_adapter(
            self, repo_id, private=private, revision=revision, commit_message=commit_message, token=token, create_pr=create_pr
        )

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def load_adapter(
    model: nn.Module,
    path_or_repo: str | os.PathLike,
    adapter_name: str = "default",
    strict: bool = True,
    is_trainable: bool = False,
    **hub_kwargs: Any,
) -> None:
    """Load a saved adapter into an SPP model under `adapter_name` (replacing one of that name) and make it
    active. Everything is read and checked before the model changes; on any error it is as before."""
    check_adapter_name(adapter_name)
    refuse_if_merged(model, "load an adapter")
    directory = resolve_adapter(path_or_repo, **{k: v for k, v in hub_kwargs.items() if v is not None})
    config, state = read_adapter(directory)
    check_same_method(model.spp_config.get(adapter_name), config, adapter_name, directory)
    targets, own = adapter_targets(config, state), [n for n, _ in model.spp_layers()]
    if sorted(targets) != sorted(own):
        extra, absent = sorted(set(targets) - set(own)), sorted(set(own) - set(targets))
        raise ValueError(
            f"The adapter at {directory} applies to other layers than this model's SPP layers (only in the adapter: "
            f"{extra[:3]}, only in the model: {absent[:3]}). Load it onto its own base with SPPModel.from_pretrained."
        )
    layers = dict(model.spp_layers())
    expected = {}
    for name, layer in layers.items():
        for key, shape in layer.adapter_shapes(config, name).items():
            expected[adapter_key(name, key)] = shape
    check_adapter_tensors(expected, state, str(directory / WEIGHTS_NAME))
    check_fingerprint(config, model.spp_fingerprint(), strict=strict)
    model._install_adapter(adapter_name, config, state)
    for layer in layers.values():
        layer.set_trainable(is_trainable)
