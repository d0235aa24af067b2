"""Sparse-PEFT adapters on disk and on the Hub: PEFT's own files plus spp-hf's record of the pruned base.

The model `get_sparse_peft_model` returns is given a subclass of its PEFT class with `SparsePeftModelMixin`, whose
``save_pretrained`` / ``push_to_hub`` / ``load_adapter`` (PEFT's signatures) read and write this folder (through
`storage`, the one writer: one atomic folder swap that keeps a user's other files):

    adapter_config.json         PEFT's config (`PeftConfig.to_dict()`, as PEFT saves it), except that a masked
                                additive adapter (LoRA, LoHa, LoKr, VeRA, FourierFT) has `MASKED_MARKER` instead of
                                its `peft_type`: plain PEFT then refuses the folder with a KeyError that shows the
                                marker (how to load it) instead of applying the update unmasked. HiRA and IA³ keep
                                their zeros by construction and their real `peft_type`: plain PEFT loads them.
    adapter_model.safetensors   PEFT's state dict (`get_peft_model_state_dict`, keys as PEFT saves them); its metadata
                                records the sha256 of config and record, so a mix of two saves is refused.
    spp_sparse_peft.json        the record: the real `peft_type`, `masked`, the base (`base_model_name_or_path`,
                                `base_model_revision`), the mask fingerprint of the adapted layers, the spp-hf version.
    README.md                   spp-hf's card (`hub.cards.render_sparse_peft_card`).
    <name>/                     every adapter but "default", as PEFT lays them out.

Reading checks the pairing (`storage.read_peft_adapter_files`), builds the config of the real type, and refuses a
base whose zeros differ from the record (`files.check_base_zeros`: `SPPMismatchError` naming the modules).
`spp_hf.adapters.pretrained.load_sparse_peft_model` and `SPPModel.from_pretrained` load such a folder onto a base;
the Trainer's resume (``model.load_adapter(checkpoint, name, is_trainable=True)``) goes through `load_adapter` here.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..hub.cards import render_sparse_peft_card, sparse_peft_label
from ..hub.transfer import base_commit, fetch_adapter_files, push_adapter
from ..layer_weights import dense_weight
from ..sparsity import fingerprint_modules, zero_mask_differences
from ..storage import (
    PeftAdapterFiles,
    is_sparse_peft_folder,
    json_bytes,
    read_peft_adapter_files,
    write_adapters,
)
from ..version import __version__
from .files import check_base_zeros
from .state import check_adapter_tensors, file_tensors

RECORD_FORMAT_VERSION = 1
MASKED_MARKER = (
    "{peft_type} masked to the pruned base's zeros by spp-hf: load it with spp_hf.load_sparse_peft_model(base, path) "
    "or spp_hf.SPPModel.from_pretrained(path)"
)
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")


class SparsePeftModelMixin:
    """Mixin for the PeftModel `get_sparse_peft_model` returns: saves and loads adapters with spp-hf's record."""

    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """PEFT's save (its file names, "default" in `save_directory`, every other adapter in a sub-folder named
        after it) plus spp-hf's record and card, in one atomic folder swap that keeps the folder's other files.
        Always safetensors; the base's zeros are checked against those at `get_sparse_peft_model` first."""
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError("Sparse PEFT adapters never rewrite the base weights: there is no initial model to convert from.")
        if is_main_process:
            save_sparse_peft(self, save_directory, selected_adapters, kwargs.get("state_dict"), save_embedding_layers)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """PEFT's ``load_adapter`` that understands spp-hf's folders (local or on the Hub): the record's real PEFT
        type, the base's zeros checked (``strict=False`` only warns), names and shapes checked before anything is
        loaded; a new adapter is added masked like the others. A plain PEFT adapter is loaded by PEFT (its update
        is then masked too, with a warning)."""
        strict = kwargs.pop("strict", True)
        folder = _spp_folder(model_id, kwargs)
        if folder is None:
            warnings.warn(
                f"{model_id} is a plain PEFT adapter (no spp-hf record): it is loaded into this sparse model, where its "
                "update is masked to the base's non-zeros, which it was not trained with.",
                stacklevel=2,
            )
            return super().load_adapter(  # type: ignore[misc]
                model_id, adapter_name, is_trainable=is_trainable, torch_device=torch_device,
                autocast_adapter_dtype=autocast_adapter_dtype, ephemeral_gpu_offload=ephemeral_gpu_offload,
                low_cpu_mem_usage=low_cpu_mem_usage, key_mapping=key_mapping, **kwargs,
            )  # fmt: skip
        files, config = read_sparse_peft(folder)
        check_sparse_peft_base(files, base_fingerprint(self, files), strict)
        existing = self.peft_config.get(adapter_name)
        if existing is not None and existing.peft_type != config.peft_type:
            raise ValueError(
                f"Adapter {adapter_name!r} of this model is a {existing.peft_type.value} adapter, but {folder} holds a "
                f"{config.peft_type.value} adapter; load it under another name."
            )
        if existing is None:
            self._check_new_adapter_config(config, is_trainable=is_trainable)
            config.inference_mode = not is_trainable
            self.add_adapter(
                adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype
            )
        try:
            load_sparse_peft_state(self, files.tensors, adapter_name, folder)
        except BaseException:
            if existing is None:
                self.delete_adapter(adapter_name)
            raise
        if is_trainable:
            self.set_requires_grad(adapter_name)
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        base: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Save the adapter(s) and upload them keyed to a base others can download (`hub.transfer.push_adapter`: the
        base's zeros on the Hub checked, its commit pinned; `base` re-keys one loaded from a local folder)."""
        return push_adapter(
            self, repo_id, private=private, revision=revision, commit_message=commit_message, token=token,
            create_pr=create_pr, base=base,
        )  # fmt: skip


def is_sparse_peft_model(model: Any) -> bool:
    """Whether `model` is a PeftModel made by `get_sparse_peft_model` (or loaded by `load_sparse_peft_model`)."""
    return isinstance(model, SparsePeftModelMixin)


# --------------------------------------------------------------------------- saving
def save_sparse_peft(
    model: Any,
    directory: str | os.PathLike,
    selected_adapters: list[str] | None = None,
    state_dict: dict | None = None,
    save_embedding_layers: str | bool = "auto",
    in_place: bool = False,
    **card: Any,
) -> Path:
    """Write adapters of a sparse PEFT model (all by default) as PEFT lays them out, with spp-hf's record and card
    (`card`: `render_sparse_peft_card`'s training details). `in_place` writes file by file into a folder someone
    else owns (a Trainer checkpoint); otherwise one atomic folder swap. Everything is checked before writing."""
    if Path(directory).is_file():
        raise ValueError(f"Provided path ({directory}) should be a directory, not a file")
    names = list(selected_adapters) if selected_adapters is not None else list(model.peft_config)
    unknown = [name for name in names if name not in model.peft_config]
    if unknown:
        raise ValueError(f"No adapter(s) {unknown} to save; this model has {list(model.peft_config)}.")
    adapters = {
        ("" if name == "default" else name): sparse_peft_files(model, name, state_dict, save_embedding_layers, **card)
        for name in names
    }
    return write_adapters(directory, adapters, in_place=in_place)


def sparse_peft_files(
    model: Any, adapter_name: str, state_dict: dict | None = None, save_embedding_layers: str | bool = "auto", **card: Any
) -> PeftAdapterFiles:
    """What goes on disk for one adapter: PEFT's config and state dict, spp-hf's record, the card."""
    config = model.peft_config[adapter_name]
    tensors = get_peft_model_state_dict(
        model, state_dict=state_dict, adapter_name=adapter_name, save_embedding_layers=save_embedding_layers
    )
    tensors = {key: value.clone() for key, value in file_tensors(tensors).items()}  # safetensors refuses shared storage
    record = sparse_peft_record(model, adapter_name)
    data = config.to_dict()
    data.update(
        base_model_name_or_path=record["base_model_name_or_path"], revision=record["base_model_revision"], inference_mode=True,
        peft_type=MASKED_MARKER.format(peft_type=record["peft_type"]) if record["masked"] else record["peft_type"],
    )  # fmt: skip
    if config.task_type is None:  # as PEFT records it, for AutoPeftModel
        base_class = type(model.get_base_model())
        data["auto_mapping"] = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    data = json.loads(json_bytes({k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}))  # as it reads back
    return PeftAdapterFiles(data, record, tensors, render_sparse_peft_card(record, data, **card))


def sparse_peft_record(model: Any, adapter_name: str) -> dict[str, Any]:
    """spp-hf's record of one adapter's base: its PEFT type, whether the update is masked, the base's name and
    revision, and the mask fingerprint of the layers it adapts, measured now and refused if the zeros changed
    since `get_sparse_peft_model` (the base is frozen: something else wrote to it)."""
    tuner = model.base_model
    config = model.peft_config[adapter_name]
    layers = adapter_layers(model, adapter_name)
    with torch.no_grad():
        found = fingerprint_modules((name, dense_weight(layer.get_base_layer())) for name, layer in layers)
    start = tuner.spp_sparse_peft["mask_fingerprint"]["modules"]
    problems = zero_mask_differences({"modules": {n: start[n] for n in found["modules"] if n in start}}, found)
    if problems:
        raise ValueError(
            f"The pruned base's zeros changed since get_sparse_peft_model ({len(problems)} layers, first {problems[0]}): "
            "something wrote to the frozen base weights. Nothing was saved."
        )
    inner = tuner.model
    name = config.base_model_name_or_path or tuner.spp_sparse_peft.get("base_model_name_or_path") or None
    revision = config.revision
    if revision is None and name:
        loaded = name == getattr(inner, "name_or_path", None)
        revision = (getattr(inner.config, "_commit_hash", None) if loaded else None) or base_commit(name)
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    return {
        "format_version": RECORD_FORMAT_VERSION, "peft_type": peft_type, "masked": bool(tuner.spp_masked(adapter_name)),
        "base_model_name_or_path": name, "base_model_revision": revision, "mask_fingerprint": found,
        "spp_hf_version": __version__,
    }  # fmt: skip


def adapter_layers(model: Any, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """(name in the transformers model, tuner layer) of every layer that holds `adapter_name`."""
    return [
        (name, module)
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, BaseTunerLayer)
        and any(adapter_name in (getattr(module, attr, None) or ()) for attr in module.adapter_layer_names)
    ]


# --------------------------------------------------------------------------- reading
def read_sparse_peft(folder: str | os.PathLike) -> tuple[PeftAdapterFiles, PeftConfig]:
    """The files of a sparse-PEFT adapter folder (checked to come from one save) and its PEFT config, of the real
    PEFT type the record names."""
    folder = Path(folder)
    files = read_peft_adapter_files(folder)
    record = files.record
    peft_type, fingerprint = record.get("peft_type"), record.get("mask_fingerprint")
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING or not isinstance(record.get("masked"), bool):
        raise ValueError(
            f"{folder / 'spp_sparse_peft.json'} names no known PEFT type ({peft_type!r}) or masked flag; save the adapter again."
        )
    if fingerprint is not None and not (isinstance(fingerprint, dict) and isinstance(fingerprint.get("modules"), dict)):
        raise ValueError(f"{folder / 'spp_sparse_peft.json'} has a malformed mask_fingerprint; save the adapter again.")
    if record.get("format_version", RECORD_FORMAT_VERSION) > RECORD_FORMAT_VERSION:
        raise ValueError(
            f"{folder} was saved by spp-hf {record.get('spp_hf_version')} in record format {record['format_version']}; "
            f"this spp-hf ({__version__}) reads up to {RECORD_FORMAT_VERSION}. Upgrade with `pip install -U spp-hf`."
        )
    data = {k: v for k, v in files.config.items() if k != "runtime_config"}
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    config = config_class.from_peft_type(**config_class.check_kwargs(**{**data, "peft_type": peft_type}))
    return files, config


def base_fingerprint(model: nn.Module, files: PeftAdapterFiles) -> dict:
    """The mask fingerprint, on `model` (plain, or a PeftModel whose layers may be wrapped), of the layers an
    adapter's record lists; a layer `model` lacks is left out (the comparison then names it missing)."""
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    weights = []
    for name in (files.mask_fingerprint or {}).get("modules", {}):
        try:
            module = inner.get_submodule(name)
        except AttributeError:
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if getattr(base, "weight", None) is not None and base.weight.dim() == 2:
            weights.append((name, dense_weight(base)))
    with torch.no_grad():
        return fingerprint_modules(weights)


def check_sparse_peft_base(files: PeftAdapterFiles, found: dict, strict: bool = True) -> None:
    """Refuse (`SPPMismatchError`, a warning with ``strict=False``) a base without the zeros the adapter was trained on."""
    label = f"sparse-PEFT {sparse_peft_label(files.record)} adapter"
    check_base_zeros(files.mask_fingerprint, found, label, *files.base, strict=strict)


def load_sparse_peft_state(model: Any, tensors: dict[str, torch.Tensor], adapter_name: str, source: Any) -> None:
    """Load an adapter's saved tensors with PEFT's `set_peft_model_state_dict`, after checking their names, shapes
    and values against what the model's adapter holds (nothing is loaded on a mismatch)."""
    own = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    check_adapter_tensors({k: tuple(v.shape) for k, v in own.items()}, tensors, f"{source} (adapter {adapter_name!r})")
    set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)


def _spp_folder(model_id: str | os.PathLike, kwargs: dict[str, Any]) -> Path | None:
    """The local folder of a sparse-PEFT adapter `model_id` names (a folder, optionally with `subfolder`, or a Hub
    repo, downloaded with the Hub arguments in `kwargs`), or None when it holds another (a plain PEFT) adapter."""
    subfolder = kwargs.get("subfolder")
    local = Path(model_id) / subfolder if subfolder else Path(model_id)
    if local.is_dir():
        return local if is_sparse_peft_folder(local) else None
    if subfolder:
        return None  # PEFT's own loader handles sub-folders of Hub repos (a sparse-PEFT one fails on its marker)
    folder = fetch_adapter_files(str(model_id), **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    return folder if is_sparse_peft_folder(folder) else None


# --------------------------------------------------------------------------- what the trainer checks
def sparse_peft_fingerprint(model: Any) -> dict:
    """Mask fingerprint of the base weights of every layer a sparse PEFT model adapts (the trainer's sparsity guard)."""
    layers = {name: layer for adapter in model.peft_config for name, layer in adapter_layers(model, adapter)}
    with torch.no_grad():
        return fingerprint_modules((name, dense_weight(layer.get_base_layer())) for name, layer in sorted(layers.items()))


def sparse_peft_parameters(model: Any) -> list[torch.Tensor]:
    """The adapters' own parameters (every tuner layer's `adapter_layer_names`), not the base's."""
    params = {}
    for module in model.base_model.model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                for param in getattr(module, attr).parameters():
                    params[id(param)] = param
    return list(params.values())
