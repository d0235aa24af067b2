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
    work = torch.promote_types(student_logits.dtype, torch.float32)  # at least float32
    total = student_logits.new_zeros((), dtype=work)
    if weight < 1.0:
        student = student_logits[:, :-1][mask].to(work)
        total = total + (1.0 - weight) * F.cross_entropy(student, targets[mask], reduction="sum")
    if weight > 0.0:
        rows = _labelled_rows(mask, student_logits.shape[1])
        total = total + weight * _ChunkedKL.apply(student_logits, teacher_logits.detach(), rows, float(temperature))
    count = mask.sum() if num_items is None else num_items
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


# Rows of logits one chunk of the KL handles: about 16 MiB of float32 at a 50k vocabulary, so a chunk's
# temporaries stay in cache instead of streaming several logits-sized tensors through memory.
KL_CHUNK_ELEMENTS = 2**22


def _labelled_rows(mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Indices into logits viewed as (batch·seq, vocab) of the positions whose next token is labelled."""
    batch, positions = mask.nonzero(as_tuple=True)
    return batch * seq_len + positions


class _ChunkedKL(torch.autograd.Function):
    """Σ over `rows` of T²·KL(softmax(teacher/T) ‖ softmax(student/T)), and its gradient, in one pass.

    The same value as ``T² · F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, reduction="sum")``
    over the selected rows, whose autograd keeps log-softmax outputs of the whole logits and makes several more
    passes over them in backward. Here each chunk of rows is read once, in at least float32, and its gradient
    T·(softmax(s/T) − softmax(t/T)) written straight into a logits-sized buffer (zero on unselected rows): the
    only tensor kept for backward.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
        vocab = student.shape[-1]
        flat_s, flat_t = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
        grad = torch.zeros_like(flat_s)
        work = torch.promote_types(student.dtype, torch.float32)
        total = torch.zeros((), dtype=work, device=student.device)
        step = max(1, KL_CHUNK_ELEMENTS // vocab)
        for start in range(0, rows.numel(), step):
            chunk = rows[start : start + step]
            log_q = torch.log_softmax(flat_s.index_select(0, chunk).to(work) / temperature, dim=-1)
            log_p = torch.log_softmax(flat_t.index_select(0, chunk).to(work) / temperature, dim=-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            grad.index_copy_(0, chunk, log_q.exp_().sub_(p).mul_(temperature).to(grad.dtype))
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return total * temperature**2

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).view(ctx.shape), None, None, None


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
