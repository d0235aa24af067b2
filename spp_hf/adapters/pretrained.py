"""An adapter loaded from its files onto its pruned base, the base's zeros checked first, optionally merged: SPP
and masked-LoRA adapters (`spp_config.json`) and sparse-PEFT adapters (PEFT's files with spp-hf's record,
`sparse_peft_files`). `SPPModel.from_pretrained`, `merge_to_folder` (in memory) and `spp-hf eval` load through here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from ..hub.transfer import base_model_errors, resolve_adapter
from ..sparsity import model_fingerprint
from ..storage import CONFIG_NAME, SPARSE_PEFT_NAME, PeftAdapterFiles, is_sparse_peft_folder
from .files import adapter_targets, check_fingerprint, read_adapter
from .layer import check_adapter_name
from .model import inject_adapter, validate_targets
from .sparse_peft import get_sparse_peft_model
from .sparse_peft_files import base_fingerprint, check_sparse_peft_base, load_sparse_peft_state, read_sparse_peft


def load_base_model(name_or_path: str, revision: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a causal-LM base with transformers (a local folder or a Hub repo id)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with base_model_errors(str(name_or_path), revision, kwargs.get("token")):
        return AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, **kwargs)


def load_pretrained(
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
    """`SPPModel.from_pretrained`: load an adapter (local dir or Hub repo), attach it to its pruned base and merge.

    `base_model=None` takes the base name and revision the adapter records (`spp_config.json`, or a sparse-PEFT
    adapter's `spp_sparse_peft.json`). With `merge=True` (default) a plain transformers model with the base's
    exact zeros is returned; otherwise the SPP model, or for a sparse-PEFT adapter the PeftModel
    (`load_sparse_peft_model`), trainable when `is_trainable`. A given `base_model` object is left as it was
    if loading fails.
    """
    check_adapter_name(adapter_name)
    directory = resolve_adapter(adapter_name_or_path, revision=revision, token=token)
    sparse_peft = is_sparse_peft_folder(directory)
    if sparse_peft:
        files, peft_config = read_sparse_peft(directory)
        recorded, source = files.base, directory / SPARSE_PEFT_NAME
    else:
        config, state = read_adapter(directory)
        recorded, source = (config.base_model_name_or_path, config.base_model_revision), directory / CONFIG_NAME
    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        name = str(base_model) if base_model is not None else recorded[0]
        if not name:
            raise ValueError(f"{source} names no base model; pass base_model=<pruned base path or repo id>.")
        rev = base_revision or (recorded[1] if base_model is None else None)
        model = load_base_model(name, revision=rev, torch_dtype=torch_dtype, device_map=device_map, token=token, **base_kwargs)
    else:
        model = base_model
    if sparse_peft:
        peft_model = _attach_sparse_peft(model, files, peft_config, directory, adapter_name, is_trainable and not merge, strict)
        if not merge:
            return peft_model
        try:
            return peft_model.merge_and_unload()  # checked: every zero kept, else refused before any layer is written
        except BaseException:
            peft_model.base_model.unload()  # a given base_model object is handed back as it came
            raise
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


def load_sparse_peft_model(
    model: nn.Module,
    path_or_repo_id: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    strict: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
) -> PeftModel:
    """Load a sparse-PEFT adapter (saved by a model `get_sparse_peft_model` returned; a local folder or a Hub repo)
    onto the pruned base `model`: the PeftModel, its layers masked as in training.

    The base's zeros over the adapted layers are checked against the adapter's record first (`SPPMismatchError`
    naming the differing modules; ``strict=False`` only warns), then the base is wrapped with
    `get_sparse_peft_model` and the weights loaded with PEFT's `set_peft_model_state_dict` after their names and
    shapes are checked. On any failure `model` is left as it was. Trainable with ``is_trainable=True``.
    """
    check_adapter_name(adapter_name)
    directory = resolve_adapter(path_or_repo_id, revision=revision, token=token)
    files, config = read_sparse_peft(directory)
    return _attach_sparse_peft(model, files, config, directory, adapter_name, is_trainable, strict)


def _attach_sparse_peft(
    model: nn.Module,
    files: PeftAdapterFiles,
    config: PeftConfig,
    source: Path,
    adapter_name: str,
    is_trainable: bool,
    strict: bool,
) -> PeftModel:
    """`model` wrapped by `get_sparse_peft_model` with the adapter's weights, its zeros checked first; on any
    failure `model` is handed back as it came."""
    if isinstance(model, PeftModel):
        raise ValueError("Pass the pruned base model; to add an adapter to a sparse PeftModel, call its load_adapter.")
    check_sparse_peft_base(files, base_fingerprint(model, files), strict)
    config.inference_mode = not is_trainable
    trains = {param: param.requires_grad for param in model.parameters()}
    peft_model = get_sparse_peft_model(model, config, adapter_name)
    try:
        load_sparse_peft_state(peft_model, files.tensors, adapter_name, source)
    except BaseException:
        peft_model.base_model.unload()
        for param, flag in trains.items():
            param.requires_grad_(flag)
        raise
    if not is_trainable:
        peft_model.eval()
    return peft_model
