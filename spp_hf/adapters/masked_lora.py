"""The masked-LoRA adapter kind: `MaskedLoRAConfig`, LoRA whose update is multiplied by the pruned base's zero
mask while it trains, and its registration.

This is what SQFT calls SparsePEFT and PERP calls MaskLoRA. For a frozen pruned weight W (m × n),
A (r × n), B (m × r), M = (W ≠ 0) and s = lora_alpha / r:

    Y  = X Wᵀ + b + s · Dropout(X) ((B A) ⊙ M)ᵀ
    merged weight  W + s · (B A) ⊙ M                 (zeros of W stay zeros)

Two interchangeable implementations of the same function:

- ``naive``: materialise (B A) ⊙ M and call ``F.linear`` (the reference; also the path for 4/8-bit
  bases, whose base GEMM stays quantized).
- ``fused``: `_FusedMaskedLoRA`. With dropout 0 it computes Y with one GEMM on
  W_eff = W + s·(B A) ⊙ M, saves only X, and in backward computes dX = G·W_eff and the transient
  P = Gᵀ·X, from which dB = s·(P ⊙ M) Aᵀ and dA = s·Bᵀ (P ⊙ M): three weight-sized GEMMs in all, as
  SPP's fused layer. W_eff, M and P only ever exist one bounded chunk of rows at a time. With dropout
  the branch sees other inputs than the base: it saves X and the dropout mask and adds the branch
  GEMMs it then needs. It gives gradients to X, A, B and the bias, not to W: while the base weight
  trains, the layer takes the naive path.

Everything derived from the adapters (B A, W_eff, the merged weight) is computed in at least float32.

The end of the module registers the kind (config `MaskedLoRAConfig`, parameters ``lora_A`` / ``lora_B``), so
injection, named adapters, merging, adapter files, the trainer, cards and the Hub work for it as for SPP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_weights import is_quantized
from . import chunked
from .chunked import accumulate, base_weight_trains, compute_dtype, scratch
from .config import AdapterConfig
from .kinds import AdapterKind, register_adapter_kind


@dataclass
class MaskedLoRAConfig(AdapterConfig):
    """Settings of a masked-LoRA adapter: LoRA whose update is multiplied by the base's zero mask.

    Per target layer A (r × in_features, kaiming-uniform) and B (out_features × r, zeros) train, and
    Y = X Wᵀ + (lora_alpha / r) · Dropout(X) ((B A) ⊙ M)ᵀ with M = (W ≠ 0); the merge W + (lora_alpha / r)·(B A) ⊙ M
    keeps exactly W's zeros. Shared fields: see `AdapterConfig`.

    Args:
        r: LoRA rank (any positive integer; it need not divide out_features).
        lora_alpha: the update is scaled by lora_alpha / r, as in PEFT's LoRA.
        dropout: dropout on the input of the LoRA branch.
    """

    method: ClassVar[str] = "masked_lora"
    _field_types: ClassVar[dict[str, tuple[tuple[type, ...], str]]] = {
        "r": ((int,), "a positive integer"),
        "lora_alpha": ((int, float), "a finite number"),
        "dropout": ((int, float), "a number in [0, 1)"),
    }

    r: int = 8
    lora_alpha: float = 16
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        """lora_alpha / r, the factor on the masked update."""
        return self.lora_alpha / self.r

    def validate(self) -> None:
        if not self.r >= 1:
            raise ValueError(f"MaskedLoRAConfig.r must be a positive integer, got {self.r!r}")
        if not math.isfinite(self.lora_alpha):
            raise ValueError(f"MaskedLoRAConfig.lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MaskedLoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")


def check_shapes(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Raise a ValueError naming the fix unless A is (r × in) and B is (out × r) for the (out × in) W."""
    m, n = weight.shape
    ok = lora_A.dim() == lora_B.dim() == 2 and lora_A.shape[1] == n and lora_B.shape[0] == m
    if not ok or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(
            f"Masked LoRA needs lora_A of shape (r, in_features={n}) and lora_B of shape (out_features={m}, r) "
            f"for a weight of shape (out, in) = {tuple(weight.shape)}; got lora_A {tuple(lora_A.shape)}, "
            f"lora_B {tuple(lora_B.shape)}. Pass the dense (out, in) weight (Conv1D: weight.t())."
        )


def init_masked_lora(
    r: int,
    in_features: int,
    out_features: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as LoRA initialises them: A (r × in) kaiming-uniform with a=√5, B (out × r) zeros, so the
    adapted layer starts equal to the base."""
    if r < 1:
        raise ValueError(f"Masked LoRA rank r must be a positive integer, got r={r}.")
    lora_A = torch.empty(r, in_features, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    lora_B = torch.zeros(out_features, r, dtype=dtype, device=device)
    return lora_A, lora_B


def masked_lora_delta(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """(B A) ⊙ (W ≠ 0) as an (m × n) tensor in `compute_dtype` (exact zeros where W is zero, even if
    B A holds Inf/NaN there)."""
    check_shapes(weight, lora_A, lora_B)
    dtype = compute_dtype(weight.dtype, lora_A.dtype, lora_B.dtype)
    delta = lora_B.to(dtype) @ lora_A.to(dtype)
    return torch.where(weight != 0, delta, torch.zeros((), dtype=dtype, device=delta.device))


def masked_lora_merged_weight(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
) -> torch.Tensor:
    """W + s·(B A) ⊙ M in `compute_dtype` (float32 for float32/bf16/fp16 bases and adapters), unchecked.

    Where W is zero the result is W's own element (same bits, sign included), so the merge cannot fill
    a zero; finiteness and "no new zeros" are for the caller to check before writing it back.
    """
    check_shapes(weight, lora_A, lora_B)
    dtype = compute_dtype(weight.dtype, lora_A.dtype, lora_B.dtype)
    w = weight.to(dtype)
    delta = lora_B.to(dtype) @ lora_A.to(dtype)
    return torch.where(weight != 0, w + scale * delta, w)


def masked_lora_branch_naive(
    x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> torch.Tensor:
    """X ((B A) ⊙ M)ᵀ with the masked update materialised, in x's dtype (unscaled, no dropout)."""
    return F.linear(x, masked_lora_delta(weight, lora_A, lora_B).to(x.dtype))


def masked_lora_forward_naive(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scale: float, dropout_p: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Y = X Wᵀ + b + s · Dropout(X) ((B A) ⊙ M)ᵀ, every term materialised (the reference)."""
    x_branch = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    base = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return base + scale * masked_lora_branch_naive(x_branch, weight, lora_A, lora_B)


def masked_lora_fused(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scale: float, dropout_p: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """The same Y as `masked_lora_forward_naive` by `_FusedMaskedLoRA` (W must be frozen and dense: it
    gets no gradient there)."""
    check_shapes(weight, lora_A, lora_B)
    if base_weight_trains(weight):
        raise ValueError(
            "The fused masked-LoRA path gives no gradient to the base weight (only to X, A, B and the bias): "
            "freeze the base weight (requires_grad_(False)), or use masked_lora_forward_naive, which trains it too."
        )
    return _FusedMaskedLoRA.apply(x, weight, bias, lora_A, lora_B, scale, dropout_p)


def _row_chunks(m: int, n: int, elem_size: int):
    """Yield (start, stop) row ranges of about `chunked.CHUNK_BYTES` of an (m × n) tensor.

    Any row split is valid here (no α blocks as in SPP), so chunks need not divide m: the last may be
    shorter.
    """
    step = max(1, min(m, chunked.CHUNK_BYTES // (n * elem_size)))
    for start in range(0, m, step):
        yield start, min(start + step, m)


def _mask_chunk(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """M = (W ≠ 0) for a chunk of rows as 0/1 in `dtype`: a float mask multiplies several times faster than
    a bool one (no per-element type promotion)."""
    out = scratch("masked_lora_mask", w.shape[0], w.shape[1], dtype, w.device)
    return w.ne(0).to(dtype) if out is None else torch.ne(w, 0, out=out)


def _update_chunk(scaled_B: torch.Tensor, lora_A: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """s·(B A)[start:stop], unmasked, in the reused W_eff buffer (when autograd is not recording)."""
    out = scratch("masked_lora_w_eff", stop - start, lora_A.shape[1], lora_A.dtype, lora_A.device)
    return torch.mm(scaled_B[start:stop], lora_A, out=out)


class _FusedMaskedLoRA(torch.autograd.Function):
    """Y = X W_effᵀ + b (dropout 0) or X Wᵀ + b + s·D(X) ((B A) ⊙ M)ᵀ (dropout p), with exact dX, dA, dB.

    W_eff (or the masked update) is built chunk by chunk of rows right before the GEMM that reads it,
    in forward and again in backward; only X (plus the dropout mask) is kept. The adapter math runs in
    `compute_dtype` with autocast off; the weight-sized GEMMs run in x's dtype (autocast may lower them).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p):
        dtype, (m, n) = x.dtype, weight.shape
        cdtype = compute_dtype(weight.dtype, lora_A.dtype, lora_B.dtype)
        x2 = x.reshape(-1, n)
        keep = None
        if dropout_p > 0.0:
            keep = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            x_branch = x2 * keep / (1.0 - dropout_p)
        a, scaled_B = lora_A.to(cdtype), lora_B.to(cdtype) * scale
        outs = []
        for start, stop in _row_chunks(m, n, cdtype.itemsize):
            w = weight[start:stop]
            b = None if bias is None else bias[start:stop].to(dtype)  # in the GEMM: autocast casts it as the base's
            with torch.autocast(x.device.type, enabled=False):
                mask, update = _mask_chunk(w, cdtype), _update_chunk(scaled_B, a, start, stop)
                if keep is None:  # W_eff = W + s·(B A) ⊙ M
                    update = torch.addcmul(w, update, mask, out=update)
                else:
                    update = update.mul_(mask)
            if keep is None:
                y = F.linear(x2, update.to(dtype), b)
            else:  # base + s · branch, the branch on dropped-out inputs
                y = torch.addmm(F.linear(x2, w.to(dtype), b), x_branch, update.to(dtype).t())
            outs.append(y)
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        ctx.save_for_backward(x, keep, weight, lora_A, lora_B)
        ctx.scale, ctx.dropout_p, ctx.bias_dtype = scale, dropout_p, None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, weight, lora_A, lora_B = ctx.saved_tensors
        scale, p = ctx.scale, ctx.dropout_p
        m, n = weight.shape
        cdtype = compute_dtype(weight.dtype, lora_A.dtype, lora_B.dtype)
        g = grad_out.reshape(-1, m).to(x.dtype)  # bf16 under autocast while x is fp32
        x2 = x.reshape(-1, n)
        x_branch = x2 if keep is None else x2 * keep / (1.0 - p)
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        recording = torch.is_grad_enabled()  # create_graph=True: no out= / in-place writes into buffers

        def reuse(t: torch.Tensor) -> torch.Tensor | None:
            return None if recording else t

        a, b = lora_A.to(cdtype), lora_B.to(cdtype)
        scaled_B = b * scale
        grad_x = grad_branch = grad_A = None
        grad_B_rows = []
        for start, stop in _row_chunks(m, n, cdtype.itemsize):
            w, g_c = weight[start:stop], g[:, start:stop]
            with torch.autocast(x.device.type, enabled=False):
                mask = _mask_chunk(w, cdtype)
                if need_x:
                    update = _update_chunk(scaled_B, a, start, stop)
                    if keep is None:
                        w_eff = torch.addcmul(w, update, mask, out=reuse(update))
                        grad_x = accumulate(grad_x, g_c, w_eff.to(g.dtype))
                    else:
                        grad_x = accumulate(grad_x, g_c, w.to(g.dtype))
                        masked = torch.mul(update, mask, out=reuse(update))
                        grad_branch = accumulate(grad_branch, g_c, masked.to(g.dtype))
                if need_A or need_B:
                    # Q = (Gᵀ X_branch) ⊙ M for these rows; dB = s·Q Aᵀ, dA = s·Σ Bᵀ Q
                    buf = scratch("masked_lora_grad", stop - start, n, x.dtype, x.device)
                    prod = torch.mm(g_c.t(), x_branch, out=buf).to(cdtype)
                    q = torch.mul(prod, mask, out=reuse(prod))
                    if need_B:
                        grad_B_rows.append(q @ a.t())
                    if need_A:
                        grad_A = accumulate(grad_A, b[start:stop].t(), q)
        if need_x:
            if keep is not None:
                branch = grad_branch * keep if recording else grad_branch.mul_(keep)
                grad_x = grad_x + branch / (1.0 - p) if recording else grad_x.add_(branch, alpha=1.0 / (1.0 - p))
            grad_x = grad_x.view(x.shape)
        if need_A:
            grad_A = (grad_A * scale).to(lora_A.dtype)
        grad_B = (torch.cat(grad_B_rows) * scale).to(lora_B.dtype) if need_B else None
        grad_bias = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_A, grad_B, None, None


# --------------------------------------------------------------------------- the masked-LoRA adapter kind
def _settings(config: Any) -> dict[str, Any]:
    return dict(r=config.r, lora_alpha=config.lora_alpha, scale=config.scale, dropout=config.dropout)


def _validate(in_features: int, out_features: int, config: Any, name: str) -> None:
    """Any rank fits any layer (unlike SPP's α rows, B A needs no divisibility)."""


def _trainable(settings: dict[str, Any]) -> tuple[str, ...]:
    return ("lora_A", "lora_B")


def _init(layer: Any, config: Any, device: torch.device) -> dict[str, torch.Tensor]:
    lora_A, lora_B = init_masked_lora(config.r, layer.in_features, layer.out_features, getattr(torch, config.adapter_dtype), device)
    return {"lora_A": lora_A, "lora_B": lora_B}


def _forward(layer: Any, name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Fused on dense frozen bases; on 4/8-bit bases the base GEMM stays quantized and the branch is
    materialised, and while the base weight trains the same naive path gives it its gradient."""
    lora_A, lora_B, scale = layer.lora_A[name], layer.lora_B[name], layer.scale[name]
    dropout = layer.dropout[name] if layer.training else 0.0
    weight = layer.weight
    if not is_quantized(layer.base_layer) and not base_weight_trains(weight):
        return masked_lora_fused(x, weight, layer.bias, lora_A, lora_B, scale, dropout)
    base_out = layer.base_layer(x, *args, **kwargs)
    x_branch = F.dropout(x, dropout, training=True) if dropout > 0 else x
    return base_out + scale * masked_lora_branch_naive(x_branch, weight, lora_A, lora_B).to(base_out.dtype)


def _merged_weight(layer: Any, name: str, weight: torch.Tensor) -> torch.Tensor:
    return masked_lora_merged_weight(weight, layer.lora_A[name], layer.lora_B[name], layer.scale[name])


def _parameter_count(config: Any, out_features: int, in_features: int) -> int:
    return config.r * (in_features + out_features)


def _card_settings(config: Any) -> list[tuple[str, str]]:
    return [
        ("method", "masked LoRA: W + (lora_alpha / r)·(B A) ⊙ (W ≠ 0)"),
        ("r (LoRA rank)", str(config.r)),
        ("lora_alpha", f"{config.lora_alpha:g}"),
        ("dropout", f"{config.dropout:g}"),
        ("target modules", f"`{config.targets_text()}`"),
        ("adapter dtype", config.adapter_dtype),
    ]


MASKED_LORA_KIND = register_adapter_kind(
    AdapterKind(
        name="masked_lora",
        label="Masked-LoRA",
        config_class=MaskedLoRAConfig,
        param_names=("lora_A", "lora_B"),
        setting_names=("r", "lora_alpha", "scale", "dropout"),
        settings=_settings,
        validate=_validate,
        init=_init,
        trainable=_trainable,
        forward=_forward,
        merged_weight=_merged_weight,
        parameter_count=_parameter_count,
        card_settings=_card_settings,
        adapter_description=(
            "A **masked-LoRA adapter** (LoRA whose update is multiplied by the base's zero mask while it trains, as "
            "SQFT's SparsePEFT and PERP's MaskLoRA) for the pruned model {base_link}.\n"
            "It holds only the LoRA matrices A (r × in) and B (out × r) of {num_layers} linear layers "
            "({adapter_params} parameters); merging adds (lora_alpha / r)·(B A) ⊙ (W ≠ 0) to the base weights, so "
            "every zero of the base stays zero."
        ),
        merged_description=(
            "The pruned model {base_link} with a **masked-LoRA adapter** (LoRA whose update is multiplied by the "
            "base's zero mask) merged into its weights.\n"
            "Merging adds (lora_alpha / r)·(B A) ⊙ (W ≠ 0), so this model has exactly the base's zeros "
            "({sparsity_summary} in the linear layers) and loads as a plain transformers model."
        ),
    )
)
