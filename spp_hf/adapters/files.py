"""Adapter files ↔ tensors: the state-dict keys, reading and checking `spp_config.json` / `spp_adapter.safetensors`,
the mask-fingerprint check, and saving a model's named adapters (through `storage`, the one writer)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hub.cards import render_adapter_card
from ..sparsity import zero_mask_differences
from ..storage import CONFIG_NAME, WEIGHTS_NAME, AdapterFiles, read_adapter_files, write_adapters
from .config import AdapterConfig
from .kinds import all_param_names
from .layer import check_adapter_name
from .state import adapter_key, check_tensor_values, file_tensors


class SPPMismatchError(ValueError):
    """The adapter was trained on a base with a different zero pattern."""


def read_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a saved adapter: both files from one save (`storage.read_adapter_files`), the
    config typed and validated, every tensor floating point and finite. Errors name the file and the fix."""
    directory = Path(directory)
    data, state = read_adapter_files(directory)
    config = AdapterConfig.from_file_data(data, directory / CONFIG_NAME)  # the class the file's method names
    check_tensor_values(state, str(directory / WEIGHTS_NAME))
    return config, state


def adapter_targets(config: AdapterConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """The module names a saved adapter applies to: those its mask fingerprint lists, else those its
    weight file names. The saved `target_modules` (possibly a regex from an untrusted file) is not used."""
    if config.mask_fingerprint:
        return list(config.mask_fingerprint["modules"])
    suffixes = tuple(adapter_key("", p) for p in all_param_names())
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
    label = f"{type(config).__name__.removesuffix('Config')} adapter"
    check_base_zeros(config.mask_fingerprint, found, label, config.base_model_name_or_path, config.base_model_revision, strict)


def check_base_zeros(
    expected: dict | None, found: dict, label: str, base: str | None, revision: str | None, strict: bool = True
) -> None:
    """Refuse (`SPPMismatchError`; a warning with ``strict=False``) a base whose zero masks differ from the
    fingerprint `expected` an adapter (`label`, e.g. "SPP adapter") recorded of `base`@`revision`."""
    if not expected:
        return
    problems = zero_mask_differences(expected, found)
    if not problems:
        return
    message = (
        f"This {label} was trained on base {base!r} (revision {revision}, mask hash {expected['hash'][:12]}), but the "
        f"base it is being loaded onto has mask hash {found['hash'][:12]}: {len(problems)} modules differ, first "
        f"{problems[0]}. Load the pruned base the adapter was trained on (base_model=..., revision=...), or pass "
        "strict=False to load anyway."
    )
    if strict:
        raise SPPMismatchError(message)
    warnings.warn(message, stacklevel=4)


def root_adapter(names: list[str], active: str) -> str:
    """Which of the saved adapters goes in the folder itself: "default", else the active one, else the first."""
    if "default" in names:
        return "default"
    return active if active in names else names[0]


def save_adapters(model: nn.Module, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
    """Save adapters of an SPP model: one at `save_directory` (see `root_adapter`), the others in sub-folders,
    all in one atomic folder replacement (`storage.write_adapters`). Every name is checked before anything
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
    config = model.spp_config[adapter_name]
    tensors = file_tensors(model.spp_state_dict(adapter_name))
    return AdapterFiles(config.file_dict(), tensors, render_adapter_card(config, model), {"spp_adapter": adapter_name})
