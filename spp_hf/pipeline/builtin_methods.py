"""The recovery methods spp-hf ships, one `register(...)` each (at the end): SPP and masked LoRA (spp-hf adapters),
LoRA* (LoRA merged, the pruning mask re-applied) and masked full fine-tuning. Importing this module registers them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig
from torch import nn

from ..adapters import MaskedLoRAConfig, SPPConfig
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


register("spp", Method("SPP", lambda cfg: cfg.train.learning_rate, adapter_method(_spp_config)))
register("masked_lora", Method("masked LoRA", lambda cfg: cfg.lora.learning_rate, adapter_method(_masked_lora_config, kind="merged")))
register("lora_star", Method("LoRA*", lambda cfg: cfg.lora.learning_rate, _prepare_lora_star))
register("masked_full", Method("masked full FT", lambda cfg: cfg.masked_full.learning_rate, _prepare_masked_full))
