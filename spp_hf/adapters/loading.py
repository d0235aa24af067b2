"""Adapter files ↔ model: reading and checking `spp_config.json` / `spp_adapter.safetensors`, the mask
fingerprint check, saving named adapters, `load_adapter`, and `SPPModel.from_pretrained`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..storage import CONFIG_NAME, WEIGHTS_NAME, AdapterFiles, read_adapter_files, write_adapters
from .config import AdapterConfig
from .layer import ADAPTER_KINDS, check_adapter_name
from .model import inject_adapter, refuse_if_merged, validate_targets
from ..sparsity import fingerprint_modules, zero_mask_differences
from ..layer_weights import dense_weight


class SPPMismatchError(ValueError):
    """The adapter was trained on a base with a different zero pattern."""


# --------------------------------------------------------------------------- reading
def resolve_adapter(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local adapter directory, or the local snapshot of an adapter repo on the Hub."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    from ..hub.transfer import download_adapter

    return download_adapter(str(path_or_repo), **hub_kwargs)


def read_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a saved adapter: both files from one save (`artifacts.read_adapter_files`), the
    config typed and validated, every tensor floating point and finite. Errors name the file and the fix."""
    directory = Path(directory)
    data, state = read_adapter_files(directory)
    config = AdapterConfig.from_file_data(data, directory / CONFIG_NAME)  # the class the file's method names
    check_tensor_values(state, str(directory / WEIGHTS_NAME))
    return config, state


def check_tensor_values(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse adapter tensors that are not floating point or hold NaN/Inf, naming the tensor."""
    for key, value in state.items():
        if not torch.is_tensor(value) or not value.is_floating_point():
            raise ValueError(
                f"Adapter tensor {key} in {source} has dtype {getattr(value, 'dtype', type(value).__name__)}, not a "
                "floating-point dtype: the file is corrupt or not an SPP adapter. Save or download it again."
            )
        if not torch.isfinite(value).all():
            raise ValueError(
                f"Adapter tensor {key} in {source} holds NaN/Inf values (not finite): training diverged or the file "
                "is corrupt. Use an earlier checkpoint, or train again with a lower learning rate."
            )


def check_adapter_tensors(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], source: str) -> None:
    """Names, shapes, dtypes and finiteness of `state` against the shapes an adapter needs."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Adapter weights in {source} do not fit this model: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}. Was it trained on another "
            "architecture or with other target_modules?"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"Adapter tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(shape)} ({source}).")
    check_tensor_values(state, source)


def adapter_targets(config: AdapterConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """The module names a saved adapter applies to: those its mask fingerprint lists, else those its
    weight file names. The saved `target_modules` (possibly a regex from an untrusted file) is not used."""
    if config.mask_fingerprint:
        return list(config.mask_fingerprint["modules"])
    suffixes = tuple(f".{p}" for kind in ADAPTER_KINDS.values() for p in kind.param_names)
    return list(dict.fromkeys(k.rsplit(".", 1)[0] for k in state if k.endswith(suffixes)))


def check_same_method(existing: AdapterConfig | None, config: AdapterConfig, adapter_name: str, source: Any) -> None:
    """Refuse to put an adapter of one method (SPP, masked LoRA) in place of an adapter of the other."""
    if existing is not None and existing.method != config.method:
        raise ValueError(
            f"Adapter {adapter_name!r} of this model is a {type(existing).__name__} adapter (method {existing.method!r}), "
            f"but {source} holds a {type(config).__name__} adapter (method {config.method!r}); one cannot be loaded as "
            "the other. Load it under a new name (load_adapter(..., adapter_name='other')), or into a model without "
            f"adapter {adapter_name!r}."
        )


def check_fingerprint(config: AdapterConfig, found: dict, strict: bool = True) -> None:
    """Compare the adapter's recorded base fingerprint with the base it is loaded onto."""
    expected = config.mask_fingerprint
    if not expected:
        return
    problems = zero_mask_differences(expected, found)
    if not problems:
        return
    message = (
        f"This {type(config).__name__.removesuffix('Config')} adapter was trained on base {config.base_model_name_or_path!r} "
        f"(revision {config.base_model_revision}, mask hash {expected['hash'][:12]}), but the base it is being "
        f"loaded onto has mask hash {found['hash'][:12]}: {len(problems)} modules differ, first {problems[0]}. "
        "Load the pruned base the adapter was "
        "trained on (base_model=..., revision=...), or pass strict=False to load anyway."
    )
    if strict:
        raise SPPMismatchError(message)
    warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------- saving
def root_adapter(names: list[str], active: str) -> str:
    """Which of the saved adapters goes in the folder itself: "default", else the active one, else the first."""
    if "default" in names:
        return "default"
    return active if active in names else names[0]


def save_adapters(model: nn.Module, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
    """Save adapters of an SPP model: one at `save_directory` (see `root_adapter`), the others in sub-folders,
    all in one atomic folder replacement (`artifacts.write_adapters`). Every name is checked before anything
    is written; other files in the folder (a Trainer's checkpoints) are kept."""
    save_directory = Path(save_directory)
    if save_directory.is_file():
        raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory.")
    names = list(selected_adapters) if selected_adapters else list(model.spp_config)
    for name in names:
        check_adapter_name(name)
        if name not in model.spp_config:
            raise KeyError(f"No adapter {name!r} to save; known adapters: {list(model.spp_config)}")
    root = root_adapter(names, model.active_spp_adapter)
    write_adapters(save_directory, {"" if name == root else name: adapter_files(model, name) for name in names})


def adapter_files(model: nn.Module, adapter_name: str) -> AdapterFiles:
    """What goes on disk for one adapter of `model`: its config data, tensors (float64 stored as float32) and card."""
    from ..hub.cards import render_adapter_card

    config = model.spp_config[adapter_name]
    tensors = {k: v.detach().float() if v.dtype == torch.float64 else v.detach() for k, v in model.spp_state_dict(adapter_name).items()}
    return AdapterFiles(config.file_dict(), tensors, render_adapter_card(config, model), {"spp_adapter": adapter_name})


# --------------------------------------------------------------------------- loading into a model
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
            expected[f"{name}.{key}"] = shape
    check_adapter_tensors(expected, state, str(directory / WEIGHTS_NAME))
    check_fingerprint(config, model.spp_fingerprint(), strict=strict)
    model._install_adapter(adapter_name, config, state)
    for layer in layers.values():
        layer.set_trainable(is_trainable)


def load_base_model(name_or_path: str, revision: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a causal-LM base with transformers (a local folder or a Hub repo id)."""
    from transformers import AutoModelForCausalLM

    from ..hub.transfer import base_model_errors

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
        check_fingerprint(config, fingerprint_modules((n, dense_weight(model.get_submodule(n))) for n in names), strict)
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


__all__ = ["SPPModel", "SPPMismatchError", "check_fingerprint", "load_adapter", "read_adapter", "resolve_adapter", "save_adapters"]
