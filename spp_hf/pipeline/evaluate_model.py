"""`evaluate_model`: load a checkpoint folder, Hub repo or SPP adapter (merged onto its pruned base) and measure
it into the one evaluation record (`spp_hf.pipeline.evaluation.evaluation_record`); what `spp-hf eval` runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from huggingface_hub import file_exists
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..adapters.config import AdapterConfig
from ..adapters.pretrained import load_pretrained
from ..hub.transfer import resolve_adapter
from ..storage import CONFIG_NAME, atomic_write_text
from .evaluation import EvalPlan, evaluation_record, hub_available, resolve_tasks


def is_spp_adapter(name_or_path: str | os.PathLike, revision: str | None = None) -> bool:
    """Whether `name_or_path` is an SPP adapter (a folder or Hub repo holding spp_config.json)."""
    path = Path(name_or_path)
    if path.is_dir():
        return (path / CONFIG_NAME).is_file()
    if path.exists() or not hub_available():
        return False
    try:
        return file_exists(str(name_or_path), CONFIG_NAME, revision=revision)
    except Exception:  # not a repo id, or no access: let transformers report it when loading
        return False


def load_for_eval(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    revision: str | None = None,
) -> tuple[torch.nn.Module, Any, dict]:
    """(model, tokenizer, info) for a checkpoint folder / repo id, or an SPP adapter (merged on load)."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if is_spp_adapter(name_or_path, revision):
        directory = resolve_adapter(name_or_path, revision=revision)
        config = AdapterConfig.from_json_file(directory / CONFIG_NAME)
        model = load_pretrained(directory, merge=True, torch_dtype=dtype)  # SPPModel.from_pretrained
        if (directory / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(directory)
        else:  # adapters carry no tokenizer: use the base's
            tokenizer = AutoTokenizer.from_pretrained(config.base_model_name_or_path, revision=config.base_model_revision)
        info = {"model": str(name_or_path), "kind": "spp-adapter (merged)", "method": config.method, "base_model": config.base_model_name_or_path}
    else:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), revision=revision, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
        info = {"model": str(name_or_path), "kind": "checkpoint"}
    if device:
        model.to(device)
    return model.eval(), tokenizer, info


def evaluate_model(
    model_or_path: torch.nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    ppl: bool = True,
    ppl_seqlen: int | None = None,
    ppl_windows: int | None = None,
    ppl_source: str = "auto",
    heldout: Sequence[str] = (),
    tasks: str | Sequence[str] | None = ("offline",),
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    out: str | os.PathLike | None = None,
    print_table: bool = True,
) -> dict:
    """Evaluate a model object (dense, pruned, SPP or merged) or a checkpoint / SPP adapter path.

    `heldout` adds perplexities on bundled corpora (`spp_hf.data.corpora`, e.g. "wiki-validation", "c4-heldout").
    Returns the evaluation record (`EvalRecord.to_dict`): {"model", ..., "perplexity": {"wikitext2": ..., <corpus>: ...},
    "zero_shot": {task: ...}, "zero_shot_mean_acc", ...}; prints a table and, with `out`, writes it as JSON (atomically).
    """
    started = time.time()
    plan = EvalPlan(
        wikitext2=ppl, seqlen=ppl_seqlen, windows=ppl_windows, source=ppl_source, heldout=tuple(heldout) if ppl else (),
        heldout_windows=ppl_windows, tasks=resolve_tasks(tasks) if tasks is not None else [],  # fail before loading anything
        limit=limit, num_fewshot=num_fewshot, ppl_batch_size=batch_size, tasks_batch_size=batch_size,
    )  # fmt: skip
    if isinstance(model_or_path, (str, os.PathLike)):
        model, loaded_tokenizer, info = load_for_eval(model_or_path, dtype=dtype, device=device)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        if tokenizer is None:
            raise ValueError("evaluate_model(model, tokenizer): pass the tokenizer along with a model object.")
        model = model_or_path.to(device) if device else model_or_path
        info = {"model": getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__, "kind": "model object"}
    record = evaluation_record(model, tokenizer, plan, info)
    record.seconds = round(time.time() - started, 1)  # loading included
    results = record.to_dict()
    if print_table:
        print(format_table(results))
    if out is not None:
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict) -> str:
    """A plain-text table of an `evaluate_model` result."""
    lines = [f"model: {results.get('model')}  ({results.get('kind')}, {results.get('class')}, sparsity {results.get('sparsity', 0):.2%}"
             f"{' ' + results['sparsity_pattern'] if results.get('sparsity_pattern') else ''})"]  # fmt: skip
    rows: list[tuple[str, str, str]] = []
    for name, found in results.get("perplexity", {}).items():
        detail = f"seqlen {found['seqlen']}, {found['windows']} windows, {found['source'] or 'text'}"
        rows.append((f"{name} perplexity", f"{found['ppl']:.3f}", detail))
    for name, found in results.get("zero_shot", {}).items():
        acc_norm = found.get("acc_norm")
        detail = f"n={found.get('n')}, {found.get('num_fewshot')}-shot" + (f", acc_norm {acc_norm:.4f}" if acc_norm is not None else "")
        acc = found.get("acc")
        rows.append((f"{name} acc", "-" if acc is None else f"{acc:.4f}", detail))
    if results.get("zero_shot_mean_acc") is not None:
        rows.append(("mean zero-shot acc", f"{results['zero_shot_mean_acc']:.4f}", ""))
    width = max([len(r[0]) for r in rows] + [6])
    value_width = max([len(r[1]) for r in rows] + [5])
    lines.append(f"{'metric':<{width}}  {'value':>{value_width}}  detail")
    lines.extend(f"{a:<{width}}  {b:>{value_width}}  {c}" for a, b, c in rows)
    return "\n".join(lines)
