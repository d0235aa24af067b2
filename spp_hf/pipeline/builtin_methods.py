"""The recovery methods spp-hf ships, one `register(...)` each (at the end): SPP and masked LoRA (spp-hf adapters),
LoRA* (LoRA merged, the pruning mask re-applied), masked full fine-tuning, and PEFT's own HiRA, IA³ and LoKr on
the pruned base with its zeros kept (`get_sparse_peft_model`). Importing this module registers them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from peft import HiraConfig, IA3Config, LoKrConfig, LoraConfig, PeftConfig
from torch import nn

from ..adapters import MaskedLoRAConfig, SPPConfig
from ..adapters.sparse_peft import get_sparse_peft_model
from ..hub.cards import render_baseline_merged_card, render_merged_card
from ..sparsity import iter_linear_weights, sparsity_report
from ..training.distillation import DistillSFTTrainer
from ..training.masked_full import KeepZerosCallback, MaskKeeper
from ..training.trainer import SPPSFTTrainer
from .config import PipelineConfig
from .methods import Method, PrepareFn, Prepared, load_plain, register


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def baseline_card(method: str, pruned: Path) -> Callable[[nn.Module], str]:
    """The card of a merged baseline (LoRA*, masked full fine-tuning) on the pruned base; `hub.cards` describes `method`."""

    def card(model: nn.Module) -> str:
        return render_baseline_merged_card(method, str(pruned), sparsity_report(model).to_dict())

    return card


# --------------------------------------------------------------------------- adapters trained like SPP
def adapter_method(make_config: Callable[[PipelineConfig], Any], kind: str = "spp-merged") -> PrepareFn:
    """An spp-hf adapter (SPPConfig, or any config `get_spp_model` takes): trained with SPPSFTTrainer on the
    pruned base, saved as an adapter folder (the pipeline's <variant>/adapter), merged with merge_and_unload (the
    zeros stay by construction). `kind` is the merged model's sparsity.json kind."""

    def prepare(cfg, pruned, data, args, trainer_kwargs, zeros) -> Prepared:
        config = make_config(cfg)
        trainer = SPPSFTTrainer(
            str(pruned), args=args, train_dataset=data, spp_config=config, dataset_name=cfg.train.data, **trainer_kwargs
        )

        def save_adapter(folder: Path) -> None:
            trainer.save_model(str(folder))

        def card(model: nn.Module) -> str:
            return render_merged_card(config, sparsity_report(model).to_dict(), dataset_name=cfg.train.data)

        return Prepared(trainer, _trainable(trainer.model), lambda: trainer.model.merge_and_unload(), card, kind, save_adapter)

    return prepare


def _spp_config(cfg: PipelineConfig) -> SPPConfig:
    t = cfg.train
    return SPPConfig(r=t.r, scale=t.scale, dropout=t.dropout, impl=t.impl, target_modules=list(t.target_modules))


def _masked_lora_config(cfg: PipelineConfig) -> MaskedLoRAConfig:
    return MaskedLoRAConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, dropout=cfg.train.dropout, target_modules=list(cfg.train.target_modules)
    )


# --------------------------------------------------------------------------- LoRA*
def _prepare_lora_star(cfg, pruned, data, args, trainer_kwargs, zeros) -> Prepared:
    """LoRA* (paper Table 5): LoRA on the same targets, data and steps, merged, then the pruning mask re-applied."""
    model, tokenizer = load_plain(pruned)
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.train.dropout,
        target_modules=list(cfg.train.target_modules), task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = DistillSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora, **trainer_kwargs)

    def merge() -> nn.Module:
        plain = trainer.model.merge_and_unload()
        with torch.no_grad():
            for name, weight in iter_linear_weights(plain):
                weight[zeros[name]] = 0.0  # LoRA's update is dense: re-apply the pruning mask
        return plain

    return Prepared(trainer, _trainable(trainer.model), merge, baseline_card("lora_star", pruned))


# --------------------------------------------------------------------------- masked full fine-tuning
def _prepare_masked_full(cfg, pruned, data, args, trainer_kwargs, zeros) -> Prepared:
    """Every non-zero weight of the targeted layers trains; gradients and updates keep the mask."""
    model, tokenizer = load_plain(pruned)
    keeper = MaskKeeper(model, cfg.train.target_modules)
    trainer = DistillSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer,
        callbacks=[KeepZerosCallback(keeper)], **trainer_kwargs,
    )  # fmt: skip

    def merge() -> nn.Module:
        keeper.remove()
        return trainer.model

    return Prepared(trainer, keeper.trainable_parameters, merge, baseline_card("masked_full", pruned))


# --------------------------------------------------------------------------- PEFT's adapters, zeros kept
def sparse_peft_method(name: str, make_config: Callable[[PipelineConfig], PeftConfig]) -> PrepareFn:
    """A PEFT adapter made sparsity-preserving by `get_sparse_peft_model`, trained with TRL's trainer and merged
    with PEFT's own (checked) `merge_and_unload`."""

    def prepare(cfg, pruned, data, args, trainer_kwargs, zeros) -> Prepared:
        model, tokenizer = load_plain(pruned)
        model = get_sparse_peft_model(model, make_config(cfg))
        trainer = DistillSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, **trainer_kwargs)
        return Prepared(
            trainer, _trainable(trainer.model), lambda: trainer.model.merge_and_unload(), baseline_card(name, pruned),
            save_adapter=lambda folder: trainer.model.save_pretrained(folder),  # PEFT's files + the base's record
        )  # fmt: skip

    return prepare


def _targets(cfg: PipelineConfig) -> list[str]:
    return list(cfg.train.target_modules)


def _hira_config(cfg: PipelineConfig) -> HiraConfig:
    return HiraConfig(r=cfg.peft.r, target_modules=_targets(cfg), task_type="CAUSAL_LM")


def _ia3_config(cfg: PipelineConfig) -> IA3Config:
    # as PEFT's defaults for decoder LMs: the MLP's output projection scales its input, the others their output
    feedforward = [m for m in _targets(cfg) if m in ("down_proj", "fc2", "c_proj", "dense_4h_to_h")]
    return IA3Config(target_modules=_targets(cfg), feedforward_modules=feedforward, task_type="CAUSAL_LM")


def _lokr_config(cfg: PipelineConfig) -> LoKrConfig:
    return LoKrConfig(r=cfg.peft.r, alpha=cfg.peft.lokr_alpha, target_modules=_targets(cfg), task_type="CAUSAL_LM")


register("spp", Method("SPP", lambda cfg: cfg.train.learning_rate, adapter_method(_spp_config)))
register("masked_lora", Method("masked LoRA", lambda cfg: cfg.lora.learning_rate, adapter_method(_masked_lora_config, kind="merged")))
register("lora_star", Method("LoRA*", lambda cfg: cfg.lora.learning_rate, _prepare_lora_star))
register("masked_full", Method("masked full FT", lambda cfg: cfg.masked_full.learning_rate, _prepare_masked_full))
register("hira", Method("HiRA", lambda cfg: cfg.peft.hira_learning_rate, sparse_peft_method("hira", _hira_config)))
register("ia3", Method("IA³", lambda cfg: cfg.peft.ia3_learning_rate, sparse_peft_method("ia3", _ia3_config)))
register("masked_lokr", Method("masked LoKr", lambda cfg: cfg.peft.lokr_learning_rate, sparse_peft_method("masked_lokr", _lokr_config)))
