"""`merge_to_folder` (`spp-hf merge`): an adapter merged into its pruned base, written as a plain transformers
checkpoint that keeps the base's zeros, optionally pushed. For SPP and masked-LoRA adapters the base is streamed
layer by layer by default (`streaming_merge`), or loaded whole with `in_memory=True`; both write the same folder,
bit for bit. Sparse-PEFT adapters are merged in memory (PEFT's checked `merge_and_unload`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ..hub.cards import render_baseline_merged_card, render_merged_card, sparse_peft_method
from ..hub.transfer import push_folder, resolve_adapter
from ..pruning.streaming import DEFAULT_MAX_SHARD_SIZE, local_checkpoint
from ..sparsity import model_sparsity_record
from ..storage import (
    CONFIG_NAME,
    SPARSE_PEFT_NAME,
    check_model_folder_target,
    is_sparse_peft_folder,
    read_peft_adapter_files,
    write_model_folder,
)
from .config import AdapterConfig
from .kinds import kind_named
from .pretrained import load_pretrained
from .streaming_merge import merge_streamed


def merge_to_folder(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    base_model: str | None = None,
    base_revision: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    torch_dtype: Any = None,
    eval_results: dict | None = None,
    dataset_name: str | None = None,
    push_to_hub: str | None = None,
    private: bool | None = False,
    in_memory: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Merge an adapter into its pruned base and save a plain transformers checkpoint that keeps the base's zeros.

    Writes the model, its tokenizer (when the base has one), `sparsity.json` (report, fingerprint,
    provenance) and a merged-model card into `out` (new, empty, or an earlier merged model) through
    `storage`. Refuses to write if a merged layer's zero mask differs from the adapter's recorded base
    fingerprint. The base (a safetensors checkpoint) is read one decoder layer at a time, so the merged
    model need not fit in memory, and a killed merge resumes; `in_memory=True` loads it whole
    (`SPPModel.from_pretrained`). Output shards hold whole decoder layers, packed up to `max_shard_size`.
    A sparse-PEFT adapter is always merged in memory (PEFT's checked `merge_and_unload`); its card and
    sparsity.json name its method as `spp-hf run` does (`hira`, `masked_lokr`, ...).
    Optionally pushes the folder to `push_to_hub`.
    """
    check_model_folder_target(out, "merged")  # before any download or merge
    out = Path(out)
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        torch_dtype = getattr(torch, torch_dtype)
    directory = resolve_adapter(adapter, revision=revision, token=token)
    adapter_revision = directory.name if directory.parent.name == "snapshots" else revision
    if is_sparse_peft_folder(directory):
        in_memory = True  # PEFT's own merge_and_unload, checked: there is no streamed merge of PEFT's layers
        record = read_peft_adapter_files(directory).record
        recorded, fingerprint, source = record, record.get("mask_fingerprint"), directory / SPARSE_PEFT_NAME
    else:
        config = AdapterConfig.from_json_file(directory / CONFIG_NAME)
        recorded, fingerprint, source = config.to_dict(), config.mask_fingerprint, directory / CONFIG_NAME
    base_name = base_model or recorded.get("base_model_name_or_path")
    base_rev = base_revision or (recorded.get("base_model_revision") if base_model is None else None)
    provenance = dict(base_model=base_name, base_model_revision=base_rev, adapter=str(adapter), adapter_revision=adapter_revision)
    if is_sparse_peft_folder(directory):
        kind, method = "merged", sparse_peft_method(record)
        provenance.update(method=method, sparse_peft={k: v for k, v in record.items() if k != "mask_fingerprint"})

        def card(data: dict) -> str:
            return render_baseline_merged_card(method, base_name, data, repo_id=push_to_hub)
    else:
        kind = kind_named(config.method).merged_model_kind
        provenance.update(spp_config=config.to_dict())
        merged_config = AdapterConfig.from_dict({**config.to_dict(), "base_model_name_or_path": base_name, "base_model_revision": base_rev})

        def card(data: dict) -> str:
            return render_merged_card(merged_config, data, eval_results, repo_id=push_to_hub, adapter=str(adapter),
                                      dataset_name=dataset_name)  # fmt: skip

    tokenizer = _base_tokenizer(base_name, base_rev, token)
    if in_memory:
        model = load_pretrained(
            str(directory), base_model=base_model, base_revision=base_revision, merge=True, torch_dtype=torch_dtype, token=token
        )
        data = model_sparsity_record(model, kind, base_mask_fingerprint=fingerprint, **provenance)
        write_model_folder(model, tokenizer, out, card(data), data)
    else:
        if not base_name:
            raise ValueError(f"{source} names no base model; pass base_model=<pruned base path or repo id>.")
        base_folder = local_checkpoint(base_name, base_rev, token, role="base")
        merge_streamed(directory, out, base_folder, kind, provenance, card, tokenizer, torch_dtype, max_shard_size, progress)
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, token=token, commit_message=f"Upload {kind} model")
    return out


def _base_tokenizer(name: str | None, revision: str | None, token: str | bool | None) -> Any:
    """The base's tokenizer, to save next to the merged model (None when the base has none)."""
    if not name:
        return None
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, token=token)
    except (OSError, ValueError, KeyError, TypeError):
        return None
