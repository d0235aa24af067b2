"""`save_pruned`: a pruned base as a folder anyone can load or publish.

The folder is a normal transformers checkpoint (safetensors, exact zeros) plus `sparsity.json` (method,
sparsity, calibration, per-layer stats, and the mask fingerprint an SPP adapter records) and a model
card, written by `storage.write_model_folder` (one atomic, durable folder replacement).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..sparsity import model_sparsity_record
from ..storage import SPARSITY_FORMAT_VERSION, write_model_folder
from ..hub.cards import render_pruned_base_card
from .api import PruneReport



def sparsity_record(model: nn.Module, report: PruneReport, perplexity: float | None = None) -> dict:
    """The content of sparsity.json: the report plus the mask fingerprint of the pruned modules."""
    record = model_sparsity_record(model, "pruned-base", modules=list(report.modules))
    return {**record, "format_version": SPARSITY_FORMAT_VERSION, **report.to_dict(), "perplexity": perplexity,
            "mask_fingerprint": record["mask_fingerprint"]}  # fmt: skip


def save_pruned(
    model: nn.Module,
    tokenizer: Any | None,
    out_dir: str | os.PathLike,
    report: PruneReport,
    perplexity: float | None = None,
    perplexity_dataset: str | None = None,
) -> Path:
    """Write the pruned model, its tokenizer, sparsity.json and README.md to `out_dir`; returns the folder.

    `perplexity` (measured after pruning) goes into sparsity.json and the card; `perplexity_dataset`
    names what it was measured on (e.g. "wikitext") for the card's metadata. `out_dir` must be new, empty
    or an earlier pruned base (`storage.check_model_folder_target`); an earlier save's files (stale weight
    shards) do not survive, the user's other files do.
    """
    record = sparsity_record(model, report, perplexity)
    if perplexity_dataset:
        record["perplexity_dataset"] = perplexity_dataset
    calibration = report.calibration or "none (magnitude pruning uses no data)"
    card = render_pruned_base_card(
        base_model=report.base_model or "", method=report.method, sparsity=report.sparsity, calibration=calibration,
        report=report.stats.to_dict(), perplexity=perplexity, perplexity_dataset=perplexity_dataset,
    )  # fmt: skip
    return write_model_folder(model, tokenizer, out_dir, card, record)
