"""`merge_to_folder` (`spp-hf merge`): an adapter merged into its pruned base, written as a plain transformers
checkpoint that keeps the base's zeros, optionally pushed. The base is streamed layer by layer by default
(`streaming_merge`), or loaded whole with `in_memory=True`; both write the same folder, bit for bit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ..hub.cards import render_merged_card
from ..hub.transfer import push_folder, resolve_adapter
from ..pruning.streaming import DEFAULT_MAX_SHARD_SIZE, local_checkpoint
from ..sparsity import model_sparsity_record
from ..storage import CONFIG_NAME, check_model_folder_target, write_model_folder
from .config import AdapterConfig
from .kinds import kind_named
from .loading import SPPModel
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
    Optionally pushes the folder to `push_to_hub`.
    """
    check_model_folder_target(out, "merged")  # before any download or merge
    out = Path(out)
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        torch_dtype = getattr(torch, torch_dtype)
    directory = resolve_adapter(adapter, revision=revision, token=token)
    config = AdapterConfig.from_json_file(directory / CONFIG_NAME)
    base_name = base_model or config.base_model_name_or_path
    base_rev = base_revision or (config.base_model_revision if base_model is None else None)
    kind = kind_named(config.method).merged_model_kind
    provenance = dict(
        base_model=base_name, base_model_revision=base_rev, adapter=str(adapter),
        adapter_revision=directory.name if directory.parent.name == "snapshots" else revision, spp_config=config.to_dict(),
    )  # fmt: skip
    merged_config = AdapterConfig.from_dict({**config.to_dict(), "base_model_name_or_path": base_name, "base_model_revision": base_rev})

    def card(record: dict) -> str:
        return render_merged_card(merged_config, record, eval_results, repo_id=push_to_hub, adapter=str(adapter),
                                  dataset_name=dataset_name)  # fmt: skip

    tokenizer = _base_tokenizer(base_name, base_rev, token)
    if in_memory:
        model = SPPModel.from_pretrained(
            str(directory), base_model=base_model, base_revision=base_revision, merge=True, torch_dtype=torch_dtype, token=token
        )
        record = model_sparsity_record(model, kind, base_mask_fingerprint=config.mask_fingerprint, **provenance)
        write_model_folder(model, tokenizer, out, card(record), record)
    else:
        if not base_name:
            raise ValueError(f"{directory / CONFIG_NAME} names no base model; pass base_model=<pruned base path or repo id>.")
        base_folder = local_checkpoint(base_name, base_rev, token, role="base")
        merge_streamed(directory, out, base_folder, kind, provenance, card, tokenizer, torch_dtype, max_shard_size, progress)
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, token=token, commit_message="Upload SPP-merged model")
    return out


def _base_tokenizer(name: str | None, revision: str | None, token: str | bool | None) -> Any:
    """The base's tokenizer, to save next to the merged model (None when the base has none)."""
    if not name:
        return None
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, token=token)
    except (OSError, ValueError, KeyError, TypeError):
        return None
