"""`SPPSFTTrainer`: TRL's `SFTTrainer` for SPP adapters on pruned bases.

The trainer injects SPP (``get_spp_model``) before TRL sets up training, so TRL's data handling
(text, ``messages``, prompt/completion with completion-only loss, packing), gradient checkpointing
and mixed precision all apply unchanged. What differs from PEFT training:

- only the adapter trains (SPP's ``spp_alpha`` / ``spp_beta``, or masked LoRA's ``lora_A`` / ``lora_B`` with
  ``MaskedLoRAConfig``); the pruned base stays frozen;
- checkpoints and the final save hold the adapter only (``spp_config.json`` +
  ``spp_adapter.safetensors`` + ``README.md``, plus optimizer/scheduler/RNG/trainer state in
  checkpoints), and resuming reads ``spp_adapter.safetensors``;
- every save first checks that the base's zero masks still match the fingerprint taken at the
  start (the sparsity guard), so a run that damaged the pruned base stops instead of saving.

It also trains the PeftModel `spp_hf.get_sparse_peft_model` returns (PEFT's adapters with the base's zeros kept):
checkpoints and the final save are then PEFT's files with spp-hf's record (`adapters.sparse_peft_files`), written
by the same code as the model's ``save_pretrained``, and resuming goes through the Trainer's own PEFT path
(``model.load_adapter(checkpoint, name, is_trainable=True)``, which reads that record); the sparsity guard covers
the layers it adapts. Other PEFT models are refused (their update would densify the base).

Sharded training: under FSDP2 parameters are DTensors and under DeepSpeed ZeRO-3 they are
partitioned; the helpers of `spp_hf.adapters.sharded_state` (`iter_full_base_weights`, `gather_spp_state`,
`load_spp_state`) read and write them in full, so the guard, saving and resuming work there too. (The SPP layer's own forward
under ZeRO-3 is handled in `spp_hf.adapters.layer`, which registers the base weight as an external parameter.)
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from ..adapters.config import AdapterConfig
from ..adapters.files import SPPMismatchError, check_fingerprint, check_same_method, read_adapter
from ..adapters.model import SPPModelMixin, find_target_modules, get_spp_model, refuse_if_merged
from ..adapters.sharded_state import (
    adapter_layers,
    full_tensor,
    gather_spp_state,
    is_zero3,
    load_spp_state,
    spp_mask_fingerprint,
)
from ..adapters.sparse_peft_files import (
    is_sparse_peft_model,
    save_sparse_peft,
    sparse_peft_files,
    sparse_peft_fingerprint,
    sparse_peft_parameters,
)
from ..adapters.spp import SPPConfig
from ..adapters.state import file_tensors
from ..hub.cards import render_adapter_card
from ..hub.paths import is_hub_id
from ..hub.transfer import SPPHubError, push_adapter_folder
from ..layer_weights import dense_weight
from ..sparsity import fingerprint_modules, zero_mask_differences
from ..storage import (
    WEIGHTS_NAME,
    atomic_write_text,
    read_adapter_folder,
    write_adapter_files_in_place,
    write_adapters,
)
from .distillation import DistillationMixin

logger = logging.getLogger(__name__)


class SparsityGuardError(RuntimeError):
    """The frozen pruned base changed during training: its zero masks no longer match the start."""


def bf16_available(use_cpu: bool = False) -> bool:
    """True where bf16 training is fast: a CUDA device with bf16 support (not this kind of CPU)."""
    return not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class SPPSFTConfig(SFTConfig):
    """`trl.SFTConfig` whose ``bf16`` defaults to "when available" instead of always on.

    TRL turns bf16 on unless fp16 is set, which fails on CPU-only machines (and bf16 is far slower
    there). Left unset, ``bf16`` here becomes True only on a GPU with bf16 support.
    """

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16:
            self.bf16 = bf16_available(self.use_cpu)
        super().__post_init__()


# --------------------------------------------------------------------------- sharded parameter access
def _fsdp1_full_params(trainer: "SPPSFTTrainer", writeback: bool = False):
    """FSDP1 keeps flat shards outside forward: summon the full parameters around reads (and writes)."""
    if not _is_fsdp1(trainer):
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.summon_full_params(trainer.model_wrapped, writeback=writeback, recurse=True)


def _is_fsdp1(trainer: "SPPSFTTrainer") -> bool:
    return bool(trainer.is_fsdp_enabled) and getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or is_zero3(p) for p in model.parameters())


# --------------------------------------------------------------------------- the trainer
class SPPSFTTrainer(DistillationMixin, SFTTrainer):
    """Supervised fine-tuning of an SPP adapter on a pruned base, as a drop-in for `trl.SFTTrainer`.

    Args:
        model: a pruned base (path, Hub repo id or `PreTrainedModel`), or a model that already has
            SPP layers, or the PeftModel `get_sparse_peft_model` returned (then ``spp_config`` must be None).
        args: `SFTConfig` (or `SPPSFTConfig`, whose bf16 default suits CPU-only machines). With
            ``push_to_hub`` the base must be a Hub repo id (or ``spp_config`` must name one): the pushed
            adapter names its base, so a local one is refused here, before any training.
        spp_config: the adapter's settings: `SPPConfig` (the paper's defaults if None) or `MaskedLoRAConfig`.
        dataset_name: a name for the data set in the model card (e.g. ``"yahma/alpaca-cleaned"``).
        quantization_config: `BitsAndBytesConfig` for loading ``model`` from a path in 4/8 bit.
        peft_config: not accepted (SPP replaces PEFT methods here; LoRA would densify the base).
        teacher_model, distill_weight, distill_temperature: optional distillation from the dense
            model (`spp_hf.training.distillation.DistillationMixin`); without a teacher the loss is TRL's.

    Other arguments are those of `trl.SFTTrainer`.
    """

    _tag_names = ["trl", "sft", "spp", "sparse"]
    _name = "SPP-SFT"

    def __init__(
        self,
        model: str | nn.Module,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        spp_config: AdapterConfig | None = None,
        dataset_name: str | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if peft_config is not None:
            raise ValueError(
                "SPPSFTTrainer trains SPP adapters and does not take a peft_config: a LoRA-style update is dense "
                "and would destroy the pruned base's sparsity. Pass spp_config=SPPConfig(...) (or MaskedLoRAConfig(...), LoRA "
                "whose update keeps the base's zeros) instead, or use "
                "trl.SFTTrainer for PEFT methods."
            )
        if _is_peft_model(model) and not is_sparse_peft_model(model):
            raise ValueError(
                "SPPSFTTrainer got a PEFT model. Pass the pruned base itself (merge_and_unload() any PEFT adapter "
                "and save it first); SPP layers are attached by the trainer. For PEFT's own methods with the base's "
                "zeros kept, pass spp_hf.get_sparse_peft_model(base, peft_config)."
            )
        if is_sparse_peft_model(model) and spp_config is not None:
            raise ValueError("The model already has sparse PEFT adapters; pass spp_config=None to train them.")
        args = _as_sft_config(args, model)
        _check_push_base(args, model, spp_config)
        from transformers import set_seed

        set_seed(args.seed)  # α is randomly initialised: seed first, as TRL does before PEFT
        if isinstance(model, (str, os.PathLike)):
            model = self._load_base(str(model), args, quantization_config)
        elif quantization_config is not None:
            logger.warning("quantization_config is ignored: the model is already instantiated.")
        self.sparse_peft = is_sparse_peft_model(model)
        if not self.sparse_peft:
            model = self._attach_spp(model, spp_config)
        start_fingerprint = self._base_fingerprint(model)  # the reference of the sparsity guard
        if getattr(model, "is_quantized", False):
            _record_full_precision_fingerprint(model)
        self.dataset_name = dataset_name
        self._spp_adapter_dtype = {
            id(p): p.dtype for _, layer in adapter_layers(model) for p in layer.adapter_parameters().values()
        }
        if getattr(model, "is_quantized", False):
            # transformers' validate_quantization_for_training refuses a quantized model unless it is a
            # PeftModel or has `_hf_peft_config_loaded`: SPP is exactly such an adapter on a frozen base.
            model._hf_peft_config_loaded = True
        if args.gradient_checkpointing:
            # The frozen base gives the embeddings' output no grad; checkpointed blocks need it to backprop.
            model.enable_input_require_grads()
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._restore_adapter_dtype()
        self._check_trainable()
        self.spp_start_fingerprint = start_fingerprint

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _load_base(name_or_path: str, args: SFTConfig, quantization_config: Any) -> nn.Module:
        """Load the pruned base as TRL would (model_init_kwargs, float32 default, no device_map under DDP)."""
        from trl.trainer.utils import create_model_from_path

        kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            if "quantization_config" in kwargs:
                raise ValueError("quantization_config is set both as a trainer argument and in args.model_init_kwargs.")
            kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        return create_model_from_path(name_or_path, **kwargs)

    @staticmethod
    def _attach_spp(model: nn.Module, spp_config: AdapterConfig | None) -> nn.Module:
        if isinstance(model, SPPModelMixin):
            if spp_config is not None:
                raise ValueError(
                    "The model already has SPP layers; pass spp_config=None to train them, or pass the plain "
                    "pruned base together with spp_config."
                )
            refuse_if_merged(model, "train")
            for _, layer in model.spp_layers():
                layer.set_trainable(True)
            return model
        spp_config = spp_config if spp_config is not None else SPPConfig()
        given = spp_config.mask_fingerprint is not None
        if given and not getattr(model, "is_quantized", False):
            # A config that names its base's masks (e.g. continuing an adapter) must fit this base: check first.
            names = find_target_modules(model, spp_config.target_modules)
            found = fingerprint_modules((n, full_tensor(dense_weight(model.get_submodule(n))).detach()) for n in names)
            check_fingerprint(spp_config, found, strict=True)
        model = get_spp_model(model, spp_config)
        if _is_sharded(model) and not given:
            # Loaded partitioned (ZeRO-3 zero.Init): fingerprint the gathered weights, not the empty partitions.
            model.active_spp_config.mask_fingerprint = spp_mask_fingerprint(model)
        return model

    def _restore_adapter_dtype(self) -> None:
        """TRL casts trainable parameters of quantized models to bf16 (the QLoRA recipe); SPP keeps
        `SPPConfig.adapter_dtype` (float32 by default), so put α/β back before the optimizer exists."""
        for _, layer in adapter_layers(self.model):
            for param in layer.adapter_parameters().values():
                dtype = self._spp_adapter_dtype.get(id(param))
                if dtype is not None and param.dtype != dtype:
                    param.data = param.data.to(dtype)

    def _check_trainable(self) -> None:
        if self.sparse_peft:
            adapters = {id(p) for p in sparse_peft_parameters(self.model)}
        else:
            adapters = {id(p) for _, layer in adapter_layers(self.model) for p in layer.adapter_parameters().values()}
        others = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in adapters]
        if others:
            raise ValueError(
                f"SPPSFTTrainer trains only the adapter, but {len(others)} base parameters are trainable "
                f"(e.g. {others[:3]}). Something unfroze them (e.g. a chat template that adds tokens resizes the "
                "embeddings); freeze them or use a chat template without new tokens."
            )

    @property
    def spp_model(self) -> nn.Module:
        """The model with SPP layers, unwrapped from DDP/FSDP/DeepSpeed."""
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ sparsity guard
    def _base_fingerprint(self, model: nn.Module) -> dict:
        """Mask fingerprint of the base weights the adapters act on (gathered in full under sharding)."""
        return sparse_peft_fingerprint(model) if self.sparse_peft else spp_mask_fingerprint(model)

    def check_sparsity(self) -> None:
        """Compare the base's zero masks with the fingerprint taken at the start; raise on any change.

        Collective under sharding: every rank calls it (`save_model` does).
        """
        expected = self.spp_start_fingerprint
        if not expected:
            return
        with _fsdp1_full_params(self):
            found = self._base_fingerprint(self.spp_model)
        problems = zero_mask_differences(expected, found)
        if problems:
            raise SparsityGuardError(
                f"Sparsity guard at step {self.state.global_step}: the pruned base's zero pattern changed during "
                f"training ({len(problems)} modules differ, first {problems[0]}). SPP trains only α/β, so something else wrote to the frozen base weights "
                "(a callback, a custom optimizer over all parameters, a weight update outside the trainer). "
                "Training was stopped before saving; the last checkpoint written is unaffected."
            )

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter only (α/β, spp_config.json, model card), after the sparsity guard."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.check_sparsity()
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write spp_config.json + spp_adapter.safetensors + README.md (never the base weights).

        The active adapter goes at the root of `output_dir`, whatever its name (resuming reads it there).
        The folder is the Trainer's (checkpoints, optimizer state), so the files are written in place, each
        atomically; the config hash in the weights file pairs them.
        """
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        model = self.spp_model
        if self.sparse_peft:  # PEFT's layout (every adapter), spp-hf's record: what model.save_pretrained writes
            if self.args.should_save:
                save_sparse_peft(model, output_dir, state_dict=state_dict, in_place=True, **self._card_details())
            return
        with _fsdp1_full_params(self):
            state = gather_spp_state(model)  # collective under sharding: all ranks
        if not self.args.should_save:
            return
        write_adapter_files_in_place(
            output_dir, model.active_spp_config.file_dict(), file_tensors(state), self._card(),
            metadata={"spp_adapter": model.active_spp_adapter},
        )  # fmt: skip

    def _card_details(self, **extra: Any) -> dict[str, Any]:
        return dict(dataset_name=extra.get("dataset_name") or self.dataset_name, final_loss=self.final_loss(),
                    training_args=self.training_summary())  # fmt: skip

    def _card(self, **extra: Any) -> str:
        model = self.spp_model
        if self.sparse_peft:
            return sparse_peft_files(model, model.active_adapter, **self._card_details(**extra)).card
        return render_adapter_card(
            model.active_spp_config,
            None if _is_sharded(model) or _is_fsdp1(self) else model,  # sharded: sparsity from the fingerprint
            dataset_name=extra.get("dataset_name") or self.dataset_name,
            final_loss=self.final_loss(),
            training_args=self.training_summary(),
        )

    def final_loss(self) -> float | None:
        """The last logged training loss (or the run's mean loss if no step was logged)."""
        history = getattr(self.state, "log_history", None) or []
        for entry in reversed(history):
            if "loss" in entry:
                return float(entry["loss"])
        for entry in reversed(history):
            if "train_loss" in entry:
                return float(entry["train_loss"])
        return None

    def training_summary(self) -> dict[str, Any]:
        """The training settings a model card should show."""
        a = self.args
        summary = {
            "learning_rate": a.learning_rate,
            "num_train_epochs": a.num_train_epochs,
            "max_steps": a.max_steps,
            "per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps,
            "world_size": a.world_size,
            "global_batch_size": a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size,
            "optim": str(getattr(a.optim, "value", a.optim)),
            "lr_scheduler_type": str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)),
            "warmup_steps": a.warmup_steps,
            "weight_decay": a.weight_decay,
            "max_length": a.max_length,
            "packing": a.packing,
            "bf16": a.bf16,
            "seed": a.seed,
            "global_step": self.state.global_step,
        }
        return summary

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags: Any = None, **_: Any) -> None:
        """Write the SPP adapter card to ``output_dir/README.md`` (TRL calls this on checkpoints and pushes)."""
        if not self.is_world_process_zero():
            return
        atomic_write_text(Path(self.args.output_dir) / "README.md", self._card(dataset_name=dataset_name))

    # ------------------------------------------------------------------ loading
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load α/β from ``spp_adapter.safetensors`` in a checkpoint (the base is not in it); a sparse PEFT model
        through the Trainer's PEFT path (its ``load_adapter`` reads spp-hf's record)."""
        if self.sparse_peft:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        directory = _checkpoint_adapter_dir(Path(resume_from_checkpoint), self.spp_model.active_spp_adapter)
        config, state = _read_checkpoint(directory)
        check_same_method(self.spp_model.active_spp_config, config, self.spp_model.active_spp_adapter, directory)
        target = self.spp_model if model is None else self.accelerator.unwrap_model(model)
        expected = self.spp_model.active_spp_config.mask_fingerprint
        if config.mask_fingerprint and expected:
            problems = zero_mask_differences(config.mask_fingerprint, expected)
            if problems:
                raise SPPMismatchError(
                    f"Checkpoint {directory} was trained on a base with another zero pattern ({len(problems)} modules "
                    f"differ, first {problems[0]}); resume with the pruned base it was trained on."
                )
        with _fsdp1_full_params(self, writeback=True):
            load_spp_state(target, state)

    def _load_best_model(self) -> None:
        if self.sparse_peft:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        logger.info(f"Loading best SPP adapter from {best} (score: {self.state.best_metric}).")
        self._load_from_checkpoint(best, self.model_wrapped if self.is_fsdp_enabled else None)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """As the Trainer, but DeepSpeed and FSDP checkpoints leave the frozen base out."""
        if self.is_deepspeed_enabled:
            # DeepSpeed's own checkpoint holds optimizer and module states: exclude the frozen base.
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        elif self.is_fsdp_enabled:
            # The Trainer also writes a sharded copy of the whole model here; the adapter file suffices.
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)
        else:
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and type(self.lr_scheduler).__name__ != "DeepSpeedSchedulerWrapper":
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not (self.is_deepspeed_enabled and resume_from_checkpoint is not None):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        # transformers loads DeepSpeed checkpoints with strict module loading, which fails on a checkpoint
        # without the frozen base; load it non-strictly, then α/β from the adapter file.
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        load_path, _ = self.model_wrapped.load_checkpoint(
            resume_from_checkpoint, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise ValueError(f"DeepSpeed could not resume from {resume_from_checkpoint}.")
        self._load_from_checkpoint(resume_from_checkpoint)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        return model, train_dataloader

    # ------------------------------------------------------------------ Hub
    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Save the adapter into ``output_dir`` and upload only the adapter files with the SPP card."""
        token = token if token is not None else self.args.hub_token
        revision = revision if revision is not None else self.args.hub_revision
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(dataset_name=kwargs.get("dataset_name"))
        self._finish_current_push()
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        return self._upload(self.args.output_dir, repo_id, commit_message, token, revision, private, blocking)

    def _upload(self, folder, repo_id, commit_message, token, revision, private, blocking=True) -> Any:
        """Upload the adapter of `folder` keyed to its base on the Hub (`hub.transfer.push_adapter_folder`: the base's
        zeros checked, its commit pinned; a base loaded from a local folder is refused with the fix)."""
        return push_adapter_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """hub_strategy="every_save": copy the checkpoint's adapter files to output_dir and upload those."""
        if not self.is_world_process_zero() or str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy)) == "end":
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        files = read_adapter_folder(checkpoint_folder)
        metadata = None if self.sparse_peft else {"spp_adapter": self.spp_model.active_spp_adapter}
        write_adapters(self.args.output_dir, {"": files}, metadata, in_place=True)
        message = f"Training in progress, step {self.state.global_step}"
        self._upload(self.args.output_dir, self.hub_model_id, message, self.args.hub_token, self.args.hub_revision, None)


# --------------------------------------------------------------------------- helpers
def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _check_push_base(args: SFTConfig, model: Any, spp_config: AdapterConfig | None) -> None:
    """With ``push_to_hub``, refuse now a base that is not a Hub repo id (every push would refuse it, after training)."""
    if not args.push_to_hub:
        return
    if isinstance(model, SPPModelMixin):
        bases = [config.base_model_name_or_path for config in model.spp_config.values()]
    elif is_sparse_peft_model(model):
        bases = [model.base_model.spp_sparse_peft.get("base_model_name_or_path")]
    else:
        named = spp_config.base_model_name_or_path if spp_config is not None else None
        loaded = str(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None)
        bases = [named or loaded or None]
    local = [base for base in bases if not is_hub_id(base)]
    if not local:
        return
    what = f"{local[0]!r}, a local path" if local[0] else "not recorded (a model built in memory)"
    raise SPPHubError(
        f"push_to_hub=True pushes the adapter keyed to its base, but the base is {what}, not a Hub repo id, so the "
        "first push (at a checkpoint or the end) would be refused after training. Push the pruned base first "
        "(`spp-hf push PRUNED_DIR ORG/NAME`) and train on it from the Hub (SPPSFTTrainer(\"ORG/NAME\", ...)), or name "
        "its Hub copy in the adapter's config (spp_config=SPPConfig(base_model_name_or_path=\"ORG/NAME\", ...)), or "
        "train without push_to_hub and push afterwards with `spp-hf push ADAPTER REPO --base ORG/NAME[@REVISION]`."
    )


def _as_sft_config(args: SFTConfig | TrainingArguments | None, model: Any) -> SFTConfig:
    if args is None:
        name = str(model) if isinstance(model, (str, os.PathLike)) else getattr(model.config, "_name_or_path", "model")
        return SPPSFTConfig(output_dir=f"{Path(name).name or 'model'}-SPP")
    if isinstance(args, SFTConfig):
        return args
    values = args.to_dict()
    values["hub_token"] = args.hub_token
    return SPPSFTConfig(**values)


def _record_full_precision_fingerprint(model: nn.Module) -> None:
    """Give a quantized base's adapter the mask fingerprint of the full-precision checkpoint it came from.

    4-bit NF4 keeps every zero but also rounds some small weights to zero, so the quantized model's
    masks are a superset of the pruned base's. The adapter is merged onto the full-precision base, so
    it must carry that base's fingerprint; it is read from the checkpoint's safetensors files. If
    they cannot be read, the fingerprint is dropped (with a warning) rather than recorded wrongly.
    """
    config = model.active_spp_config
    names = [name for name, _ in adapter_layers(model)]
    try:
        config.mask_fingerprint = fingerprint_modules(
            _checkpoint_weights(config.base_model_name_or_path, config.base_model_revision, model, names)
        )
    except (OSError, KeyError, ValueError) as err:
        warnings.warn(
            f"Could not read the full-precision weights of {config.base_model_name_or_path!r} ({err}); the adapter "
            "is saved without a mask fingerprint, so loading it will not check the base's zero pattern.",
            stacklevel=3,
        )
        config.mask_fingerprint = None


def _checkpoint_weights(name_or_path: str | None, revision: str | None, model: nn.Module, names: list[str]):
    """Yield (name, dense (out, in) weight) for `names` from a transformers safetensors checkpoint."""
    import json

    from safetensors import safe_open
    from transformers.utils import cached_file

    if not name_or_path:
        raise ValueError("the model records no base_model_name_or_path")
    index = cached_file(name_or_path, "model.safetensors.index.json", revision=revision, _raise_exceptions_for_missing_entries=False)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {key: cached_file(name_or_path, shard, revision=revision) for key, shard in weight_map.items()}
    else:
        single = cached_file(name_or_path, "model.safetensors", revision=revision)
        files = None
    for name in names:
        key = f"{name}.weight"
        path = files[key] if files is not None else single
        with safe_open(str(path), framework="pt") as handle:
            if key not in handle.keys():
                raise KeyError(f"{key} not in {path}")
            tensor = handle.get_tensor(key)
        if _stored_transposed(model.get_submodule(name).base_layer):
            tensor = tensor.t()
        yield name, tensor


def _stored_transposed(module: nn.Module) -> bool:
    """True when a checkpoint stores this layer's weight as (in, out): a GPT-2 Conv1D, also after
    bitsandbytes replaced it (transformers records the replaced class as ``source_cls``)."""
    from transformers.pytorch_utils import Conv1D

    return issubclass(getattr(module, "source_cls", type(module)), Conv1D)


def _checkpoint_adapter_dir(directory: Path, adapter_name: str) -> Path:
    """Where a checkpoint holds the adapter: its root (or, as older runs wrote a named adapter, `<name>/`)."""
    nested = directory / adapter_name
    if not (directory / WEIGHTS_NAME).is_file() and (nested / WEIGHTS_NAME).is_file():
        return nested
    return directory


def _read_checkpoint(directory: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of the adapter in a checkpoint, with errors that say to resume from another one."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise ValueError(
            f"Can't resume from {directory}: it has no {WEIGHTS_NAME} (found {found[:6]}). Point "
            f"resume_from_checkpoint to a {PREFIX_CHECKPOINT_DIR}-N folder written by SPPSFTTrainer."
        )
    try:
        return read_adapter(directory)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Can't resume from {directory}: {err} Resume from an earlier {PREFIX_CHECKPOINT_DIR}-N folder instead."
        ) from None


__all__ = [
    "SPPSFTTrainer",
    "SPPSFTConfig",
    "SparsityGuardError",
    "bf16_available",
]
