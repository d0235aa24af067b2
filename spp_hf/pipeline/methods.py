"""The recovery methods `spp-hf run` compares, one registry entry each.

A method turns the pruned base into a trainer (`prepare`) and, once trained, into a plain transformers
model that keeps the base's zeros (`Prepared.merge`). The pipeline does everything else the same way
for every method: data, steps, seeds, timing, peak memory, the bit-for-bit zero check, saving and
evaluation. Adding a method is one `register(...)` call (see the entries at the end of this module).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from .run import PipelineConfig

Zeros = dict[str, torch.Tensor]  # linear weight name -> True where the pruned base is zero


@dataclass
class Prepared:
    """A trainer ready to train, and how to turn its model into the merged, still-sparse model."""

    trainer: Any
    trainable_parameters: int  # the weights the method can change (masked full FT: the non-zero ones)
    merge: Callable[[], nn.Module]  # after training: a plain transformers model
    card: Callable[[nn.Module], str]  # the merged model's card
    kind: str = "merged"  # sparsity.json kind of the merged model (artifacts.MODEL_KINDS)


PrepareFn = Callable[["PipelineConfig", Path, Any, Any, dict[str, Any], Zeros], Prepared]


@dataclass(frozen=True)
class Method:
    label: str  # as the report names it
    learning_rate: Callable[["PipelineConfig"], float]
    prepare: PrepareFn  # (cfg, pruned base, train rows, training args, trainer kwargs, base zeros) -> Prepared


METHODS: dict[str, Method] = {}


def register(name: str, method: Method) -> None:
    """Make `name` usable in a pipeline config's `methods:` list."""
    METHODS[name] = method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown recovery method {name!r}; registered: {sorted(METHODS)} (add one with spp_hf.pipeline.methods.register).")
    return METHODS[name]


def load_plain(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a checkpoint folder, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def linear_zeros(model: nn.Module) -> Zeros:
    """Where each linear weight of `model` is exactly zero."""
    from ..sparsity import iter_linear_weights

    return {name: (w == 0).clone() for name, w in iter_linear_weights(model)}


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def baseline_card(label: str, pruned: Path) -> Callable[[nn.Module], str]:
    """The card of a merged baseline (LoRA*, masked full fine-tuning) on the pruned base."""

    def card(model: nn.Module) -> str:
        from ..hub.cards import render_baseline_merged_card
        from ..sparsity import sparsity_report

        return render_baseline_merged_card(label, str(pruned), sparsity_report(model).to_dict())

    return card


# --------------------------------------------------------------------------- adapters trained like SPP
def adapter_method(make_config: Callable[["PipelineConfig"], Any], kind: str = "spp-merged") -> PrepareFn:
    """An spp-hf adapter (SPPConfig, or any config `get_spp_model` takes): trained with SPPSFTTrainer on the
    pruned base, saved to <variant>/adapter, merged with merge_and_unload (the zeros stay by construction).
    `kind` is the merged model's sparsity.json kind."""

    def prepare(cfg, pruned, data, args, trainer_kwargs, zeros) -> Prepared:
        from ..hub.cards import render_merged_card
        from ..sparsity import sparsity_report
        from ..training.trainer import SPPSFTTrainer

        config = make_config(cfg)
        trainer = SPPSFTTrainer(
            str(pruned), args=args, train_dataset=data, spp_config=config, dataset_name=cfg.train.data, **trainer_kwargs
        )

        def merge() -> nn.Module:
            trainer.save_model(str(Path(args.output_dir).parent / "adapter"))
            return trainer.model.merge_and_unload()

        def card(model: nn.Module) -> str:
            return render_merged_card(config, sparsity_report(model).to_dict(), dataset_name=cfg.train.data)

        return Prepared(trainer, _trainable(trainer.model), merge, card, kind=kind)

    return prepare


def _spp_config(cfg: "PipelineConfig"):
    from ..adapters.config import SPPConfig

    t = cfg.train
    return SPPConfig(r=t.r, scale=t.scale, dropout=t.dropout, impl=t.impl, target_modules=list(t.target_modules))


def _masked_lora_config(cfg: "PipelineConfig"):
    from ..adapters.config import MaskedLoRAConfig

    return MaskedLoRAConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, dropout=cfg.train.dropout, target_modules=list(cfg.train.target_modules)
    )


# --------------------------------------------------------------------------- LoRA*
def _prepare_lora_star(cfg, pruned, data, args, trainer_kwargs, zeros) -> Prepared:
    """LoRA* (paper Table 5): LoRA on the same targets, data and steps, merged, then the pruning mask re-applied."""
    from peft import LoraConfig

    from ..training.distillation import DistillSFTTrainer
    from ..sparsity import iter_linear_weights

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

    return Prepared(trainer, _trainable(trainer.model), merge, baseline_card("LoRA*", pruned))


# --------------------------------------------------------------------------- masked full fine-tuning
def _prepare_masked_full(cfg, pruned, data, args, trainer_kwargs, zeros) -> Prepared:
    """Every non-zero weight of the targeted layers trains; gradients and updates keep the mask."""
    from ..training.distillation import DistillSFTTrainer
    from ..training.masked_full import KeepZerosCallback, MaskKeeper

    model, tokenizer = load_plain(pruned)
    keeper = MaskKeeper(model, cfg.train.target_modules)
    trainer = DistillSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer,
        callbacks=[KeepZerosCallback(keeper)], **trainer_kwargs,
    )  # fmt: skip

    def merge() -> nn.Module:
        keeper.remove()
        return trainer.model

    return Prepared(trainer, keeper.trainable_parameters, merge, _masked_full_card(pruned, cfg.train.target_modules))


def _masked_full_card(pruned: Path, targets: list[str]) -> Callable[[nn.Module], str]:
    # The baseline card template describes LoRA* (mask re-applied after merging), which this is not.
    def card(model: nn.Module) -> str:
        from ..sparsity import sparsity_report

        report = sparsity_report(model)
        return (
            f"# {pruned.name} + masked full fine-tuning\n\nThe pruned model `{pruned}` with every non-zero weight of its "
            f"{', '.join(targets)} layers fine-tuned; gradients and optimizer updates were masked by the pruning mask, "
            f"so it has exactly the base's zeros ({report.ratio:.2%} zeros{f', {report.pattern}' if report.pattern else ''} "
            "in the linear layers) and loads as a plain transformers model.\n"
        )

    return card


register("spp", Method("SPP", lambda cfg: cfg.train.learning_rate, adapter_method(_spp_config)))
register("masked_lora", Method("masked LoRA", lambda cfg: cfg.lora.learning_rate, adapter_method(_masked_lora_config, kind="merged")))
register("lora_star", Method("LoRA*", lambda cfg: cfg.lora.learning_rate, _prepare_lora_star))
register("masked_full", Method("masked full FT", lambda cfg: cfg.masked_full.learning_rate, _prepare_masked_full))
