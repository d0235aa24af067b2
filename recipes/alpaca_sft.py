"""Alpaca instruction tuning of a pruned LLM with SPP (the paper's recovery recipe, Sec. 4).

    accelerate launch recipes/alpaca_sft.py --config recipes/configs/smollm2_135m.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/alpaca_sft.py \\
        --config recipes/configs/llama7b_wanda24.yaml --model_name_or_path <pruned base>

Arguments are parsed into three dataclasses (`ScriptArguments`, `SPPSFTConfig` = TRL's SFTConfig,
`SPPArguments`); a YAML file given with ``--config`` replaces their defaults and every field can be
overridden on the command line (``--learning_rate 2e-3 --spp_r 8``). Defaults follow the paper and
its official code (alpaca-lora based): the Alpaca prompt template, SPP on q/k/v/o/gate/up/down with
r=16 and dropout 0.05, AdamW at lr 4e-3 with 3% warm-up then linear decay, weight decay 0.001,
3 epochs, sequences cut at 512 tokens, the loss on the whole prompt + response.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402
from trl import TrlParser  # noqa: E402

from spp_hf import MaskedLoRAConfig, SPPConfig, SPPSFTTrainer  # noqa: E402
from spp_hf.data.corpora import BUNDLED_ALPACA  # noqa: E402
from spp_hf.data.training_data import (  # noqa: E402, F401  (the template and loaders live in the package)
    PROMPT_INPUT,
    PROMPT_NO_INPUT,
    alpaca_prompt,
    load_alpaca,
    to_sft_format,
)
from spp_hf.adapters.config import DEFAULT_TARGETS  # noqa: E402
from spp_hf.data.default_model import smollm2_path  # noqa: E402
from spp_hf.training.cpu_allocator import keep_freed_memory  # noqa: E402
from spp_hf.training.trainer import SPPSFTConfig  # noqa: E402

logger = logging.getLogger("alpaca_sft")

BUNDLED_DATA = BUNDLED_ALPACA

# Paper Sec. 4 / official finetune.py. A --config file or the command line replaces any of them.
PAPER_DEFAULTS = dict(
    learning_rate=4e-3,
    warmup_steps=0.03,  # a float < 1 is a ratio of the total steps (transformers 5)
    lr_scheduler_type="linear",
    weight_decay=0.001,
    optim="adamw_torch",
    num_train_epochs=3,
    max_length=512,
    seed=42,
    logging_steps=10,
    save_strategy="steps",
    save_steps=200,
    save_total_limit=5,
    report_to="none",
    output_dir="outputs/spp-alpaca",
)


@dataclass
class ScriptArguments:
    """What to train on."""

    model_name_or_path: str = field(
        default="smollm2",
        metadata={"help": "Pruned base: local folder or Hub repo id. 'smollm2' = the offline SmolLM2-135M "
                  "checkpoint of spp_hf.data.default_model (dense: prune it first, see recipes/README.md)."},
    )  # fmt: skip
    model_revision: str | None = field(default=None, metadata={"help": "Revision of the base on the Hub."})
    dataset_name: str = field(
        default="yahma/alpaca-cleaned",
        metadata={"help": "Hub data set id, a local .json/.jsonl file in Alpaca format (instruction, input, "
                  "output), or 'bundled' for the 500-example sample shipped with spp-hf (CC BY-NC 4.0)."},
    )  # fmt: skip
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub data set."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})
    eval_size: int = field(default=0, metadata={"help": "Hold out N examples for evaluation (official code: 2000)."})
    train_on_inputs: bool = field(
        default=True,
        metadata={"help": "Loss on prompt + response (paper/official code). False: response only (completion-only loss)."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base in 4-bit NF4 (bitsandbytes)."})


@dataclass
class SPPArguments:
    """The adapter: SPP (paper Sec. 3.2, `spp_hf.SPPConfig`) or masked LoRA (`spp_hf.MaskedLoRAConfig`, which
    uses spp_r, spp_dropout, spp_target_modules, spp_adapter_dtype and lora_alpha)."""

    method: str = field(
        default="spp",
        metadata={"help": "spp | masked_lora (LoRA whose update is multiplied by the base's zero mask)."},
    )
    spp_r: int = field(default=16, metadata={"help": "Rows of α (r × in_features); the LoRA rank for masked_lora."})
    spp_scale: float = field(default=2.0, metadata={"help": "s in Eq. 5 (official: lora_alpha 16 / r 8)."})
    spp_dropout: float = field(default=0.05, metadata={"help": "Dropout on the SPP branch input."})
    spp_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS), metadata={"help": "Layers to adapt."})
    spp_impl: str = field(default="auto", metadata={"help": "naive | blocked | fused | auto."})
    spp_use_beta: bool = field(default=True, metadata={"help": "Train β (Table 4 ablation when False)."})
    spp_zero_init: str = field(default="beta", metadata={"help": "Which factor starts at zero: beta | alpha."})
    spp_adapter_dtype: str = field(default="float32", metadata={"help": "dtype of the adapter's tensors."})
    lora_alpha: float = field(default=16.0, metadata={"help": "masked_lora only: the update is scaled by lora_alpha / r."})

    def to_config(self) -> SPPConfig | MaskedLoRAConfig:
        if self.method == "masked_lora":
            return MaskedLoRAConfig(
                r=self.spp_r, lora_alpha=self.lora_alpha, dropout=self.spp_dropout,
                target_modules=list(self.spp_target_modules), adapter_dtype=self.spp_adapter_dtype,
            )  # fmt: skip
        if self.method != "spp":
            raise ValueError(f"--method must be spp or masked_lora, got {self.method!r}.")
        return SPPConfig(
            r=self.spp_r, scale=self.spp_scale, dropout=self.spp_dropout, target_modules=list(self.spp_target_modules),
            impl=self.spp_impl, use_beta=self.spp_use_beta, zero_init=self.spp_zero_init, adapter_dtype=self.spp_adapter_dtype,
        )  # fmt: skip


def resolve_model(name: str) -> str:
    """A model path or repo id; 'smollm2' maps to the offline SmolLM2-135M checkpoint."""
    if name == "smollm2":
        return str(smollm2_path())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def card_dataset_name(name: str) -> str:
    """The data set as the model card names it: the bundled sample is a subset of tatsu-lab/alpaca."""
    return "tatsu-lab/alpaca" if name == "bundled" else name


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, SPPSFTConfig, SPPArguments))
    parser.set_defaults_with_config(**PAPER_DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> SPPSFTTrainer:
    script_args, training_args, spp_args = make_parser().parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    model = resolve_model(script_args.model_name_or_path)
    if script_args.model_revision:
        training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "revision": script_args.model_revision}
    data = to_sft_format(
        load_alpaca(script_args.dataset_name, script_args.dataset_split, script_args.max_train_samples),
        script_args.train_on_inputs,
    )
    eval_data = None
    if script_args.eval_size > 0:
        split = data.train_test_split(test_size=script_args.eval_size, shuffle=True, seed=training_args.seed)
        data, eval_data = split["train"], split["test"]
    quantization = None
    if script_args.load_in_4bit:
        compute = torch.bfloat16 if training_args.bf16 else torch.float32
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    trainer = SPPSFTTrainer(
        model,
        args=training_args,
        train_dataset=data,
        eval_dataset=eval_data,
        spp_config=spp_args.to_config(),
        dataset_name=card_dataset_name(script_args.dataset_name),
        quantization_config=quantization,
    )
    _warn_if_dense(trainer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
        logger.warning("%s adapter saved to %s; training loss by step: %s", spp_args.method, training_args.output_dir, json.dumps(losses))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=card_dataset_name(script_args.dataset_name))
    return trainer


def _warn_if_dense(trainer: SPPSFTTrainer) -> None:
    modules = trainer.spp_start_fingerprint["modules"]
    zeros = sum(m["zeros"] for m in modules.values())
    total = sum(m["shape"][0] * m["shape"][1] for m in modules.values())
    if total and zeros / total < 0.01:
        logger.warning(
            "The base has %.2f%% zeros in the SPP target layers: it does not look pruned. SPP keeps the base's "
            "zeros; train it on a pruned base (see recipes/README.md).", 100 * zeros / total
        )


if __name__ == "__main__":
    keep_freed_memory()  # on CPU, reuse freed step buffers instead of faulting them back in
    main()
