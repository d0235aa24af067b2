"""Streaming merge: an adapter folded into its pruned base decoder layer by decoder layer, the base never loaded whole.

`merge_streamed` reads one decoder layer of the base at a time (`pruning.streaming.StreamedCheckpoint`), checks that
its target layers have the zeros the adapter was trained on, merges each with the adapter's own checked merge
(`SPPLinear.merge`: finite, no zero filled or lost), writes the layer as one part of the output and frees it. So a
merged model can be written on a machine that cannot hold it, and the folder equals the in-memory merge
(`SPPModel.from_pretrained(..., merge=True)` then `save_pretrained`) bit for bit in its tensors, `sparsity.json`
and card. The output is written through `storage` like every model folder; finished layers wait in a partial
folder beside it, so a killed merge started again resumes where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layer_weights import dense_weight
from ..pruning.sequential import block_name
from ..pruning.streaming import (
    DEFAULT_MAX_SHARD_SIZE,
    StreamedCheckpoint,
    layer_part,
    parse_size,
    part_files,
    return_freed_memory,
)
from ..sparsity import fingerprint_modules, zero_mask_differences
from ..storage import SPARSITY_FORMAT_VERSION, WEIGHTS_NAME, PartialModelFolder, write_model_folder_from_parts
from ..version import __version__
from .config import AdapterConfig
from .files import SPPMismatchError, adapter_targets, read_adapter
from .layer import SPPLinear
from .model import validate_targets
from .state import adapter_key, check_adapter_tensors

ADAPTER_NAME = "default"  # the name `SPPModel.from_pretrained` loads an adapter under


def _checked_state(ckpt: StreamedCheckpoint, config: AdapterConfig, state: dict[str, torch.Tensor], names: list[str], source: str) -> None:
    """Every check the in-memory load makes before anything merges: the targets exist in the base, are linear, fit
    the adapter kind and are not tied; the adapter's tensors have the names and shapes those layers need. Targets
    must lie inside the decoder layers (the part streamed layer by layer)."""
    validate_targets(ckpt.model, names, config)
    outside = [name for name in names if ckpt.layer_index(name) is None]
    if outside:
        raise ValueError(
            f"The adapter targets {outside[:3]} outside the decoder layers, which the streaming merge does not read layer "
            "by layer. Merge it in memory: spp-hf merge --in-memory, or merge_to_folder(..., in_memory=True)."
        )
    expected = {}
    for name in names:
        layer = SPPLinear(ckpt.model.get_submodule(name), ADAPTER_NAME, copy.deepcopy(config))  # meta base: nothing read
        expected.update({adapter_key(name, key): shape for key, shape in layer.adapter_shapes(config).items()})
    check_adapter_tensors(expected, state, source)


def _check_base_zeros(config: AdapterConfig, block: nn.Module, prefix: str, names: list[str]) -> None:
    """Refuse a base layer whose target layers lack the zeros the adapter recorded (`SPPModel.from_pretrained`'s
    fingerprint check, one decoder layer at a time)."""
    recorded = config.mask_fingerprint
    if not recorded or not names:
        return
    found = fingerprint_modules((name, dense_weight(block.get_submodule(name[len(prefix) :]))) for name in names)
    expected = {"modules": {name: recorded["modules"][name] for name in names if name in recorded["modules"]}}
    problems = zero_mask_differences(expected, found)
    if problems:
        raise SPPMismatchError(
            f"This adapter was trained on base {config.base_model_name_or_path!r} (revision {config.base_model_revision}, "
            f"mask hash {recorded['hash'][:12]}), but the base being merged into has other zeros: {problems[0]}"
            f"{f' (and {len(problems) - 1} more in this layer)' if len(problems) > 1 else ''}. Nothing was written. "
            "Merge into the pruned base the adapter was trained on (--base / base_model=..., --base-revision)."
        )


@torch.no_grad()
def _merge_layer(block: nn.Module, prefix: str, names: list[str], config: AdapterConfig, state: Mapping[str, torch.Tensor]) -> None:
    """Merge the adapter into the target linear layers of one materialised decoder layer, each with `SPPLinear.merge`
    (the checked merge of the in-memory path: same dtype, same arithmetic, zeros kept)."""
    for name in names:
        layer = SPPLinear(block.get_submodule(name[len(prefix) :]), ADAPTER_NAME, copy.deepcopy(config))
        for key, param in layer.adapter_parameters().items():
            param.copy_(state[adapter_key(name, key)])
        layer.merge()  # writes W + s·ΔW into the base layer's weight, which stays the block's module


def _run_key(ckpt: StreamedCheckpoint, adapter_dir: Path) -> str:
    """A hash of the base's files, the adapter's files and the versions: a resumed merge reuses layers only under it."""
    files = sorted(set(ckpt.source.values()) | {ckpt.folder / "config.json"} | set(adapter_dir.glob("*.json")) | {adapter_dir / WEIGHTS_NAME})
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    text = json.dumps([stamp, str(ckpt.dtype), __version__, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def merge_streamed(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    base_folder: str | os.PathLike,
    kind: str,
    provenance: dict[str, Any],
    card: Callable[[dict], str],
    tokenizer: Any | None = None,
    torch_dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Merge the adapter in `adapter_dir` into the pruned base in the local folder `base_folder`, layer by layer, and
    write the merged model (`kind`, e.g. "spp-merged") to `out` with `sparsity.json` (report, fingerprint, the base's
    fingerprint and `provenance`) and the card `card(record)` renders. `merging.merge_to_folder` is the usual entry.
    """
    adapter_dir = Path(adapter_dir)
    shard_bytes = parse_size(max_shard_size)
    config, state = read_adapter(adapter_dir)
    ckpt = StreamedCheckpoint(base_folder, torch_dtype)
    names = adapter_targets(config, state)
    _checked_state(ckpt, config, state, names, str(adapter_dir / WEIGHTS_NAME))
    by_layer: dict[int, list[str]] = {}
    for name in names:
        by_layer.setdefault(ckpt.layer_index(name), []).append(name)
    parts = PartialModelFolder(out, kind, _run_key(ckpt, adapter_dir))
    rest = ckpt.write_rest(parts)
    for index in tqdm(range(len(ckpt.layers)), desc="merging", unit="layer", disable=not progress):
        if parts.has(layer_part(index)):
            continue
        block, prefix = ckpt.load_layer(index), block_name(ckpt.layers_name, index) + "."
        _check_base_zeros(config, block, prefix, by_layer.get(index, []))
        _merge_layer(block, prefix, by_layer.get(index, []), config, state)
        parts.write(layer_part(index), ckpt.layer_tensors(index))
        ckpt.release_layer(index)
        return_freed_memory()
    part_names = [*rest, *(layer_part(i) for i in range(len(ckpt.layers)))]
    report, found = ckpt.folder_sparsity(part_files(parts, part_names))
    problems = zero_mask_differences(config.mask_fingerprint, found) if config.mask_fingerprint else []
    if problems:
        raise ValueError(
            f"The {kind} model lost its base's zero mask in {len(problems)} layers ({'; '.join(problems[:3])}); "
            "nothing was written. Re-apply the base's mask before saving."
        )
    record: dict[str, Any] = {"format_version": SPARSITY_FORMAT_VERSION, "kind": kind, **report.to_dict(), **provenance,
                              "mask_fingerprint": found}  # fmt: skip
    if config.mask_fingerprint:
        record["base_mask_fingerprint"] = config.mask_fingerprint
    return write_model_folder_from_parts(out, parts, part_names, ckpt.save_configs(), tokenizer, card(record), record,
                                         shard_bytes, ckpt.model.num_parameters())  # fmt: skip
