"""The stages of `spp-hf run`: prune the model, train and merge each variant, evaluate every model.

Each stage writes a folder a user could publish, where the run layout (`spp_hf.pipeline.layout`) says,
and is skipped when that output already exists, so an interrupted run resumes where it stopped (training
resumes from its last checkpoint).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.corpora import CORPORA, documents
from ..data.default_model import smollm2_path
from ..data.training_data import load_sft_data
from ..pruning import prune, save_pruned
from ..sparsity import model_fingerprint, model_sparsity_record
from ..storage import atomic_write_text, check_model_folder_target, write_model_folder
from ..training.peak_memory import peak_memory, reset_peak_memory
from ..training.trainer import SPPSFTConfig
from .config import PipelineConfig
from .evaluation import EvalPlan, evaluation_record, resolve_tasks
from .methods import Prepared, get_method, linear_zeros, load_plain
from .results import EvalRecord
from .variants import Variant, variant_config

logger = logging.getLogger(__name__)


def resolve_model(name: str) -> str:
    """A model path or repo id; 'smollm2' is the offline SmolLM2-135M checkpoint."""
    return str(smollm2_path()) if name == "smollm2" else name


def _done(done: bool, path: Path, what: str) -> bool:
    """Log whether a stage runs or is skipped because its output `path` exists."""
    if done:
        logger.warning("[skip] %s: found %s", what, path)
        return True
    logger.warning("[run] %s", what)
    return False


# --------------------------------------------------------------------------- prune
def stage_prune(cfg: PipelineConfig) -> Path:
    """Prune the model into runs/<name>/pruned (checkpoint, sparsity.json, card); returns that folder."""
    layout, p = cfg.layout, cfg.prune
    if _done(layout.pruned_done.exists(), layout.pruned_done, f"prune {cfg.model} with {p.method} {p.sparsity}"):
        return layout.pruned
    check_model_folder_target(layout.pruned, "pruned-base")  # before any loading or pruning
    model, tokenizer = load_plain(resolve_model(cfg.model))
    report = prune(
        model, method=p.method, sparsity=p.sparsity, calibration=_calibration_file(cfg),
        tokenizer=tokenizer, nsamples=p.nsamples, seqlen=p.seqlen, seed=p.seed,
    )  # fmt: skip
    save_pruned(model, tokenizer, layout.pruned, report)
    return layout.pruned


def _calibration_file(cfg: PipelineConfig) -> str:
    """A bundled corpus is written to runs/<name>/data/<corpus>.jsonl (the record of what calibrated); others pass through."""
    name = cfg.prune.calibration
    if name not in CORPORA:
        return name
    path = cfg.layout.calibration_file(name)
    atomic_write_text(path, "".join(json.dumps({"text": text}) + "\n" for text in documents(name)))
    return str(path)


# --------------------------------------------------------------------------- train, merge
def stage_method(cfg: PipelineConfig, pruned: Path, variant: Variant) -> Path:
    """Train one variant on the pruned base, merge it, check its zeros bit for bit, save it; returns the merged folder."""
    layout, vcfg = cfg.layout, variant_config(cfg, variant.overrides, variant.seed)
    method = get_method(variant.method)
    merged, train_dir = layout.merged(variant.name), layout.train(variant.name)
    what = f"{variant.name}: {method.label}, seed {variant.seed} ({vcfg.train.max_steps} steps)"
    if _done(layout.has_merged(variant.name), merged, what):
        return merged
    check_model_folder_target(merged, "merged")  # before any training
    base, tokenizer = load_plain(pruned)
    zeros = linear_zeros(base)
    reference = model_fingerprint(base)  # every linear layer's mask, the bit-for-bit reference of the merged model
    del base
    gc.collect()
    reset_peak_memory()
    data, packed = load_sft_data(vcfg.train.data, max_samples=vcfg.train.max_samples)  # Alpaca rows one per sequence, plain text packed
    lr = method.learning_rate(vcfg)
    prepared = method.prepare(vcfg, pruned, data, _training_args(vcfg, train_dir, lr, packed), _distillation(vcfg), zeros)
    measured, losses = _train(prepared, vcfg, train_dir)
    atomic_write_text(layout.loss_history(variant.name), json.dumps(losses))
    metrics = {
        "variant": variant.name, "method": variant.method, "entry": variant.entry, "seed": variant.seed,
        "label": variant.label, "overrides": list(variant.overrides), "learning_rate": lr,
        "trainable_parameters": prepared.trainable_parameters, **measured,
    }  # fmt: skip
    atomic_write_text(layout.train_metrics(variant.name), json.dumps(metrics, indent=2))
    if prepared.save_adapter is not None:
        prepared.save_adapter(layout.adapter(variant.name))
    save_merged(prepared.merge(), tokenizer, merged, prepared, reference, variant, vcfg.train.data)
    return merged


def _train(prepared: Prepared, cfg: PipelineConfig, train_dir: Path) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    """Train, resuming from the last checkpoint in `train_dir`; returns (the run's measurements, (step, loss) pairs)."""
    trainer = prepared.trainer
    epochs = check_one_epoch(trainer, cfg)
    resumed_from = _checkpoint_step(train_dir)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resumed_from > 0 or None)
    seconds = time.perf_counter() - start
    memory = peak_memory()
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {
        "train_seconds": seconds, "epochs": epochs,
        "steps": trainer.state.global_step, "resumed_from_step": resumed_from,  # seconds cover the steps after it
        "peak_memory_bytes": memory["bytes"], "peak_memory_kind": memory["kind"],
    }, losses  # fmt: skip


def _training_args(cfg: PipelineConfig, output_dir: Path, learning_rate: float, packing: bool) -> SPPSFTConfig:
    t = cfg.train
    return SPPSFTConfig(
        packing=packing,
        packing_strategy="wrapped",  # plain text: fill every sequence (documents cut at max_length otherwise)
        gradient_checkpointing=t.gradient_checkpointing,
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=learning_rate,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        max_length=t.max_length,
        logging_steps=1,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=1,
        report_to="none",
        seed=t.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def check_one_epoch(trainer: Any, cfg: PipelineConfig) -> float:
    """The passes over the (packed) training rows the steps make; raises before training when more than train.max_epochs."""
    t = cfg.train
    rows = len(trainer.train_dataset)
    needed = t.max_steps * t.batch_size * t.grad_accum * max(1, trainer.args.world_size)
    if needed > t.max_epochs * rows:
        most = int(t.max_epochs * rows) // (t.batch_size * t.grad_accum * max(1, trainer.args.world_size))
        raise ValueError(
            f"train.max_steps={t.max_steps} needs {needed} sequences but {t.data!r} gives {rows} "
            f"({needed / rows:.2f} epochs > train.max_epochs={t.max_epochs}): lower train.max_steps to at most {most}, "
            "train on more text, or raise train.max_epochs to repeat it on purpose."
        )
    return needed / rows


def _distillation(cfg: PipelineConfig) -> dict[str, Any]:
    """Trainer arguments that make the dense model the teacher, or none for the plain LM loss."""
    if cfg.train.distill_weight <= 0 and cfg.train.distill_feature_weight <= 0:
        return {}
    teacher, _ = load_plain(resolve_model(cfg.model))
    return {"teacher_model": teacher, "distill_weight": cfg.train.distill_weight, "feature_weight": cfg.train.distill_feature_weight}


def _checkpoint_step(output_dir: Path) -> int:
    """The step of the last checkpoint in `output_dir` (0: none, training starts afresh)."""
    steps = [int(p.name.removeprefix("checkpoint-")) for p in output_dir.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    return max(steps, default=0)


def save_merged(model: nn.Module, tokenizer: Any, out: Path, prepared: Prepared, reference: dict, variant: Variant, data: str) -> None:
    """Write the merged model folder (checkpoint, sparsity.json, card), refused unless its zeros are the base's, bit for bit."""
    try:
        record = model_sparsity_record(
            model, prepared.kind, base_mask_fingerprint=reference, method=variant.method, seed=variant.seed, training_data=data
        )
    except ValueError as err:
        raise RuntimeError(f"{variant.name}: {err} This is a bug in the method's merge: please report it.") from None
    write_model_folder(model, tokenizer, out, prepared.card(model), record)


# --------------------------------------------------------------------------- evaluate
def eval_plan(cfg: PipelineConfig) -> EvalPlan:
    """What the eval stage measures, from the `eval:` settings (WikiText-2 off with eval.ppl_windows=0)."""
    e = cfg.eval
    return EvalPlan(
        wikitext2=e.ppl_windows != 0, seqlen=e.ppl_seqlen, windows=e.ppl_windows, heldout=e.heldout_names,
        heldout_windows=e.heldout_windows, tasks=resolve_tasks(e.tasks), limit=e.limit, tasks_batch_size=e.batch_size,
    )  # fmt: skip


def stage_eval(cfg: PipelineConfig, paths: dict[str, Path]) -> dict[str, EvalRecord]:
    """Evaluate each model of `paths` ({name: checkpoint}) into runs/<name>/eval/<name>.json; returns every record."""
    layout = cfg.layout
    missing = [name for name in paths if not layout.eval_record(name).exists()]
    plan = eval_plan(cfg) if missing else None
    results = {}
    for name, path in paths.items():
        out = layout.eval_record(name)
        if not _done(name not in missing, out, f"evaluate {name}"):
            model, tokenizer = load_plain(path)
            record = evaluation_record(model, tokenizer, plan, {"model": str(path), "kind": "checkpoint", "variant": name})
            atomic_write_text(out, json.dumps(record.to_dict(), indent=2))
            del model
            gc.collect()
        results[name] = EvalRecord.read(out)
    return results
