"""Distillation from the dense model: the loss, and a mixin that gives any TRL trainer a teacher.

The paper retrains with the language-modelling loss on the observed next token. Distillation trains
the pruned model on the dense model's whole next-token distribution (the teacher) instead, a common
recovery objective (on SmolLM2, 40 steps of the recovery config, it matched the LM loss: README).
`DistillationMixin` adds that
objective to `SPPSFTTrainer` and, as `DistillSFTTrainer`, to TRL's `SFTTrainer` (for PEFT
baselines such as LoRA*), so compared methods see the same loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from trl import SFTTrainer

IGNORE_INDEX = -100


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    weight: float = 1.0,
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``(1 - weight)·CE + weight·T²·KL(teacher_T ‖ student_T)`` per labelled token.

    Labels are unshifted, as for transformers' causal LMs (position t predicts ``labels[t + 1]``);
    positions labelled -100 are ignored. The sum is divided by ``num_items`` (the batch's labelled
    tokens over all gradient-accumulation steps, as `Trainer` passes it) or by this batch's count.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the teacher must be the dense model the student was pruned from (same tokenizer and vocabulary)."
        )
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    student = student_logits[:, :-1][mask].float()
    total = student.new_zeros(())
    if weight < 1.0:
        total = total + (1.0 - weight) * F.cross_entropy(student, targets[mask], reduction="sum")
    if weight > 0.0:
        teacher = teacher_logits[:, :-1][mask].float()
        kl = F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.log_softmax(teacher / temperature, dim=-1),
            log_target=True,
            reduction="sum",
        )
        total = total + weight * temperature**2 * kl
    count = mask.sum() if num_items is None else num_items
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


class DistillationMixin:
    """Adds ``teacher_model``, ``distill_weight`` and ``distill_temperature`` to a TRL trainer.

    With a teacher, training minimises `distillation_loss` (``distill_weight`` 1.0: the KL term
    only; 0.0: the plain language-modelling loss); without one the trainer is unchanged. The teacher
    is frozen, kept in eval mode on the training device, and never saved.
    """

    def __init__(
        self,
        *args: Any,
        teacher_model: nn.Module | None = None,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1] (1 = distillation loss only), got {distill_weight!r}")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be positive, got {distill_temperature!r}")
        if isinstance(teacher_model, str):
            raise TypeError("teacher_model must be a loaded model (e.g. AutoModelForCausalLM.from_pretrained(...)), not a path.")
        super().__init__(*args, **kwargs)
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.requires_grad_(False)
            teacher_model.eval()
            teacher_model.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_model is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        forward["use_cache"] = False
        outputs = model(**forward)
        with torch.no_grad():
            teacher_logits = self.teacher_model(**forward).logits
        loss = distillation_loss(
            outputs.logits, teacher_logits, inputs["labels"], self.distill_weight, self.distill_temperature, num_items_in_batch
        )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages gradients over ranks
        return (loss, outputs) if return_outputs else loss


class DistillSFTTrainer(DistillationMixin, SFTTrainer):
    """`trl.SFTTrainer` (PEFT adapters included) with an optional dense teacher."""
