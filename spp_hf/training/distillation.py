"""Distillation from the dense model: the losses, and a mixin that gives any TRL trainer a teacher.

The paper retrains with the language-modelling loss on the observed next token. Distillation trains the
pruned model towards the dense model (the teacher) instead, the lever every strong published recovery
uses: on its whole next-token distribution (logit KL, `distillation_loss`), and on its hidden states at
each decoder layer's output (`feature_distillation_loss`, SquareHead's normalised MSE, Kurtic et al.
2023). `DistillationMixin` adds both to `SPPSFTTrainer` and, as `DistillSFTTrainer`, to TRL's
`SFTTrainer` (for PEFT baselines such as LoRA*), so compared methods see the same loss. Measured results:
docs/results.md.
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


def feature_distillation_loss(
    student_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    teacher_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SquareHead's feature loss: the mean over layers of ‖h_s − h_t‖² / ‖h_t‖² over the attended tokens.

    `student_hidden` / `teacher_hidden` are the decoder layers' outputs, (batch, seq, hidden) each, as
    `output_hidden_states=True` returns them without the embeddings (`hidden_states[1:]`). Normalising by
    the teacher's energy per layer makes every layer count alike whatever its scale.
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(
            f"The student has {len(student_hidden)} hidden-state layers and the teacher {len(teacher_hidden)}: feature "
            "distillation needs the dense model the student was pruned from (same depth)."
        )
    keep = None if attention_mask is None else attention_mask.bool()
    losses = []
    for student, teacher in zip(student_hidden, teacher_hidden):
        student, teacher = student.float(), teacher.float()
        if keep is not None:
            student, teacher = student[keep], teacher[keep]
        losses.append((student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp(min=torch.finfo(torch.float32).tiny))
    return torch.stack(losses).mean()


class DistillationMixin:
    """Adds ``teacher_model``, ``distill_weight``, ``distill_temperature`` and ``feature_weight`` to a TRL trainer.

    With a teacher, training minimises `distillation_loss` (``distill_weight`` 1.0: the KL term
    only; 0.0: the plain language-modelling loss) plus ``feature_weight`` × `feature_distillation_loss`;
    without one the trainer is unchanged. The teacher runs in no_grad, is frozen, kept in eval mode on
    the training device, and never saved.
    """

    def __init__(
        self,
        *args: Any,
        teacher_model: nn.Module | None = None,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
        feature_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1] (1 = distillation loss only), got {distill_weight!r}")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be positive, got {distill_temperature!r}")
        if feature_weight < 0:
            raise ValueError(f"feature_weight must be >= 0 (0 = no feature loss), got {feature_weight!r}")
        if isinstance(teacher_model, str):
            raise TypeError("teacher_model must be a loaded model (e.g. AutoModelForCausalLM.from_pretrained(...)), not a path.")
        super().__init__(*args, **kwargs)
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.feature_weight = feature_weight
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.requires_grad_(False)
            teacher_model.eval()
            teacher_model.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_model is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        forward.update(use_cache=False, output_hidden_states=self.feature_weight > 0)
        outputs = model(**forward)
        with torch.no_grad():
            teacher = self.teacher_model(**forward)
        loss = distillation_loss(
            outputs.logits, teacher.logits, inputs["labels"], self.distill_weight, self.distill_temperature, num_items_in_batch
        )
        if self.feature_weight > 0:
            features = feature_distillation_loss(outputs.hidden_states[1:], teacher.hidden_states[1:], inputs.get("attention_mask"))
            loss = loss + self.feature_weight * features
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages gradients over ranks
        return (loss, outputs) if return_outputs else loss


class DistillSFTTrainer(DistillationMixin, SFTTrainer):
    """`trl.SFTTrainer` (PEFT adapters included) with an optional dense teacher."""
