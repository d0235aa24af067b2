"""`save_pruned`: a pruned base as a folder anyone can load or publish.

The folder is a normal transformers checkpoint (safetensors, exact zeros) plus `sparsity.json` (method,
sparsity, calibration, per-layer stats, and the mask fingerprint an SPP adapter records) and a model card.
Everything is written to a staging folder first and moved into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic_write_text
from ..sparsity import fingerprint_modules
from ..weights import dense_weight
from .api import PruneReport

SPARSITY_FILE = "sparsity.json"
SPARSITY_FORMAT_VERSION = 1


def sparsity_record(model: nn.Module, report: PruneReport, perplexity: float | None = None) -> dict:
    """The content of sparsity.json: the report plus the mask fingerprint of the pruned modules."""
    fingerprint = fingerprint_modules((name, dense_weight(model.get_submodule(name))) for name in report.modules)
    record = {"format_version": SPARSITY_FORMAT_VERSION, **report.to_dict(), "perplexity": perplexity}
    record["mask_fingerprint"] = fingerprint
    return record


def _fallback_card(base_model: str, method: str, sparsity: str, calibration: str, report: dict, perplexity: float | None) -> str:
    front = ["---", "library_name: transformers"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front += ["tags:", "- spp", "- sparse", "- pruned", f"- {method}", "---", ""]
    rows = [
        ("method", method),
        ("sparsity", sparsity),
        ("measured ratio", f"{report.get('ratio', 0):.4f}"),
        ("N:M pattern", report.get("pattern") or "-"),
        ("calibration", calibration or "none"),
        ("perplexity", f"{perplexity:.2f}" if perplexity is not None else "not measured"),
    ]
    body = [f"# {base_model or 'Model'} pruned with {method} ({sparsity})", "", "| | |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in rows]
    body += ["", "Per-layer statistics and the mask fingerprint are in `sparsity.json`. Made with spp-hf."]
    return "\n".join(front + body) + "\n"


def render_card(
    base_model: str, method: str, sparsity: str, calibration: str, report: dict, perplexity: float | None,
    perplexity_dataset: str | None = None,
) -> str:
    """The pruned-base card from spp_hf.cards; a minimal card if that renderer is not available."""
    try:
        from ..cards import render_pruned_base_card
    except (ImportError, AttributeError):
        return _fallback_card(base_model, method, sparsity, calibration, report, perplexity)
    extra = {"perplexity_dataset": perplexity_dataset} if perplexity_dataset else {}
    return render_pruned_base_card(
        base_model=base_model, method=method, sparsity=sparsity, calibration=calibration, report=report,
        perplexity=perplexity, **extra,
    )


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the staged files into out_dir (renaming the folder when out_dir does not exist yet)."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder.")
    new = {p.name for p in staging.iterdir()}
    for old in out_dir.iterdir():  # weight files of an earlier save that this one does not replace
        if old.is_file() and old.name not in new and old.name.startswith("model") and ".safetensors" in old.name:
            old.unlink()
    for path in staging.iterdir():
        target = out_dir / path.name
        if target.is_dir() and not path.is_dir():
            raise IsADirectoryError(f"{target} is a folder; cannot write the file {path.name} there.")
        os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)


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
    names what it was measured on (e.g. "wikitext") for the card's metadata.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    record = sparsity_record(model, report, perplexity)
    if perplexity_dataset:
        record["perplexity_dataset"] = perplexity_dataset
    calibration = report.calibration or "none (magnitude pruning uses no data)"
    card = render_card(
        report.base_model or "", report.method, report.sparsity, calibration, report.stats.to_dict(), perplexity,
        perplexity_dataset,
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        atomic_write_text(staging / SPARSITY_FILE, json.dumps(record, indent=2) + "\n")
        atomic_write_text(staging / "README.md", card)
        _publish(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
