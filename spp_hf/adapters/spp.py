"""The SPP adapter kind: `SPPConfig`, the SPP branch math (paper Sec. 3.2), and its registration.

For a frozen pruned weight W (m × n), α (r × n) and β (m × 1), with A = Repeat₀(α, m/r):

    W' = W ⊙ A ⊙ β                                   (Eq. 4)
    Y  = X Wᵀ + s · Dropout(X) W'ᵀ                     (Eq. 5)
    merged weight  W + s·W' = W ⊙ (1 + s·A⊙β)          (zeros of W stay zeros)

Three interchangeable implementations of the same function:

- ``naive``:   materialise W' and call ``F.linear`` (the reference).
- ``blocked``: Eq. 7 — split W into r row blocks W_j and compute (X ⊙ α_j) W_jᵀ for each, as one
  batched GEMM; Repeat₀(α) is never built.
- ``fused``:   a custom autograd function. With dropout 0 it computes Y with one GEMM on
  W_eff = W ⊙ (1 + s·A⊙β), saves only X, and in backward computes dX = G·W_eff and the transient
  dW_eff = Gᵀ·X, from which dα and dβ are reductions with W: three weight-sized GEMMs in all.
  W_eff and dW_eff only ever exist one bounded chunk of rows at a time.
  With dropout it saves X and the dropout mask and adds the branch GEMMs it then needs.
  It gives gradients to X, α, β and the bias, not to W: while the base weight trains, the layer
  takes the naive path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_weights import is_quantized
from . import chunked
from .chunked import accumulate, base_weight_trains, compute_dtype, scratch
from .config import AdapterConfig
from .kinds import AdapterKind, register_adapter_kind

IMPLS = ("auto", "naive", "blocked", "fused")


@dataclass
class SPPConfig(AdapterConfig):
    """Settings of an SPP adapter (paper Sec. 3.2, Eq. 4-5). Shared fields: see `AdapterConfig`.

    Args:
        r: rows of α (r × in_features); each α row scales out_features / r consecutive output rows.
        scale: s in Eq. 5. 2.0 matches the official recipe (lora_alpha / lora_r).
        dropout: dropout on the input of the SPP branch.
        impl: "naive" (materialise W'), "blocked" (Eq. 7), "fused" (one GEMM on W_eff) or "auto".
        use_beta: ablation of Table 4; False freezes β at 1 (α is then zero-initialised).
        zero_init: which factor starts at zero so the model starts as the pruned base:
            "beta" (paper default, α kaiming-uniform) or "alpha" (Table 8 ablation).
    """

    method: ClassVar[str] = "spp"
    _field_types: ClassVar[dict[str, tuple[tuple[type, ...], str]]] = {
        "r": ((int,), "a positive integer"),
        "scale": ((int, float), "a number"),
        "dropout": ((int, float), "a number in [0, 1)"),
        "impl": ((str,), f"one of {IMPLS}"),
        "use_beta": ((bool,), "true or false"),
        "zero_init": ((str,), "'beta' or 'alpha'"),
    }

    r: int = 16
    scale: float = 2.0
    dropout: float = 0.0
    impl: Literal["auto", "naive", "blocked", "fused"] = "auto"
    use_beta: bool = True
    zero_init: Literal["beta", "alpha"] = "beta"

    def validate(self) -> None:
        if not self.r >= 1:
            raise ValueError(f"SPPConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SPPConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"SPPConfig.scale must be a finite number, got {self.scale!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"SPPConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        if self.zero_init not in ("beta", "alpha"):
            raise ValueError(f"SPPConfig.zero_init must be 'beta' or 'alpha', got {self.zero_init!r}")
        if not self.use_beta and self.zero_init != "alpha":
            # Without a trainable β, α must start at zero for the model to start as the pruned base.
            self.zero_init = "alpha"


def repeat_alpha(alpha: torch.Tensor, out_features: int) -> torch.Tensor:
    """Repeat₀(α, m/r): each row of α repeated m/r times along dim 0 (m × n)."""
    return alpha.repeat_interleave(out_features // alpha.shape[0], dim=0)


def spp_factor(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """M = Repeat₀(α, m/r) ⊙ β as an (m × n) tensor, built with one broadcast multiply."""
    r, n = alpha.shape
    m = beta.shape[0]
    return (alpha.view(r, 1, n) * beta.view(r, m // r, 1)).view(m, n)


def effective_weight(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float) -> torch.Tensor:
    """W_eff = W ⊙ (1 + s·Repeat₀(α)⊙β) = W + s·W' (the merged weight), in `compute_dtype` of the inputs."""
    dtype = compute_dtype(weight.dtype, alpha.dtype, beta.dtype)
    factor = spp_factor(alpha.to(dtype), beta.to(dtype))
    return factor.mul_(scale).add_(1.0).mul_(weight.to(dtype))


def _block_chunk_rows(m: int, r: int, n: int, elem_size: int) -> int:
    """Rows per chunk: about `chunked.CHUNK_BYTES` of W, and either a divisor or a multiple of the α block m/r."""
    block = m // r
    want = max(1, chunked.CHUNK_BYTES // (n * elem_size))
    if want >= block:
        blocks = max(d for d in range(1, r + 1) if r % d == 0 and d * block <= want)
        return blocks * block
    return max(d for d in range(1, block + 1) if block % d == 0 and d <= want)


def _chunk_factor(alpha: torch.Tensor, beta: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """(Repeat₀(α) ⊙ β)[start:start+rows] as a (rows × n) tensor, written into the reused W_eff buffer."""
    r, n = alpha.shape
    block = beta.shape[0] // r
    first, nblocks, per = start // block, max(1, rows // block), min(rows, block)
    out = scratch("w_eff", rows, n, alpha.dtype, alpha.device)
    a, b = alpha[first : first + nblocks].view(nblocks, 1, n), beta[start : start + rows].view(nblocks, per, 1)
    return torch.mul(a, b, out=None if out is None else out.view(nblocks, per, n)).view(rows, n)


def _chunks(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
    """Yield (start, rows, W chunk, factor chunk) over the rows of W."""
    m, n = weight.shape
    step = _block_chunk_rows(m, alpha.shape[0], n, 4)
    for start in range(0, m, step):
        yield start, step, weight[start : start + step], _chunk_factor(alpha, beta, start, step)


# Chunks above this many elements do not fit the cache: their factor gradients are reduced in row slices.
SLICE_ABOVE_ELEMENTS = 1 << 22


def _add_factor_grads(
    prod: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, start: int,
    grad_alpha: torch.Tensor, grad_beta: torch.Tensor,
) -> None:  # fmt: skip
    """Unscaled factor gradients from prod = Gᵀ·X_branch for rows start… of W (prod is overwritten).

    With P = prod ⊙ W: dα_j += Σ_{i in block j} β_i P_i and dβ_i = Σ_k P_ik α_jk. A chunk too big for the
    cache is taken a few rows at a time, each slice of P made in a small buffer and reduced while it is
    still cached: one read of prod and W instead of five passes over them.
    """
    rows, n = prod.shape
    block = beta.shape[0] // alpha.shape[0]
    if rows * n <= SLICE_ABOVE_ELEMENTS or torch.is_grad_enabled():
        first, nblocks, per = start // block, max(1, rows // block), min(rows, block)
        pv = prod.to(alpha.dtype).mul_(w).view(nblocks, per, n)
        grad_alpha[first : first + nblocks] += torch.bmm(beta[start : start + rows].view(nblocks, 1, per), pv).view(nblocks, n)
        grad_beta[start : start + rows] = torch.bmm(pv, alpha[first : first + nblocks].view(nblocks, n, 1)).view(rows, 1)
        return
    step = max(d for d in range(1, min(rows, block, 64) + 1) if min(rows, block) % d == 0)  # slices stay in one block
    buf = scratch("factor_grad_slice", step, n, alpha.dtype, alpha.device)
    for offset in range(0, rows, step):
        i = start + offset
        p = torch.mul(prod[offset : offset + step], w[offset : offset + step], out=buf)
        torch.mv(p, alpha[i // block], out=grad_beta[i : i + step, 0])
        grad_alpha[i // block].addmv_(p.t(), beta[i : i + step, 0])


class _FusedSPP(torch.autograd.Function):
    """Y = X W_effᵀ + b (dropout 0) or X Wᵀ + b + s·D(X) W'ᵀ (dropout p), with exact dα, dβ, dX.

    W_eff (or W') is built chunk by chunk of rows (at most CHUNK_BYTES each) right before the GEMM
    that reads it, in forward and again in backward; only X (plus the dropout mask) is kept.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, alpha_in, beta_in, scale, dropout_p):
        dtype = x.dtype
        cd = compute_dtype(weight.dtype, alpha_in.dtype)
        alpha, beta = alpha_in.to(cd), beta_in.to(cd)
        x2 = x.reshape(-1, x.shape[-1])
        keep = None
        if dropout_p > 0.0:
            keep = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            x_branch = x2 * keep / (1.0 - dropout_p)
        outs = []
        for start, rows, w, f in _chunks(weight, alpha, beta):
            w32 = w.to(f.dtype)
            b = None if bias is None else bias[start : start + rows].to(dtype)  # added as F.linear does: β = 0 is the base bit for bit
            if keep is None:  # W_eff = W + s·W⊙F
                y = F.linear(x2, torch.addcmul(w32, w32, f, value=scale, out=f).to(dtype), b)
            else:  # base + s · branch, the branch on dropped-out inputs
                y = torch.addmm(F.linear(x2, w.to(dtype), b), x_branch, f.mul_(w32).to(dtype).t(), alpha=scale)
            outs.append(y)
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        ctx.save_for_backward(x, keep, weight, alpha_in, beta_in)
        ctx.scale, ctx.dropout_p, ctx.has_bias = scale, dropout_p, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, weight, alpha_in, beta_in = ctx.saved_tensors
        cd = compute_dtype(weight.dtype, alpha_in.dtype)
        alpha, beta = alpha_in.to(cd), beta_in.to(cd)
        scale, p = ctx.scale, ctx.dropout_p
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)  # bf16 under autocast while x is fp32
        x2 = x.reshape(-1, x.shape[-1])
        x_branch = x2 if keep is None else x2 * keep / (1.0 - p)
        need_x, need_factors = ctx.needs_input_grad[0], ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        grad_x = grad_branch = None
        grad_alpha = torch.zeros_like(alpha) if need_factors else None
        grad_beta = torch.zeros_like(beta) if need_factors else None
        n = alpha.shape[1]
        recording = torch.is_grad_enabled()  # create_graph=True: no in-place writes into the factor chunk

        def reuse(f: torch.Tensor) -> torch.Tensor | None:
            return None if recording else f

        for start, rows, w, f in _chunks(weight, alpha, beta):
            g_c = g[:, start : start + rows]
            w32 = w.to(f.dtype)
            if need_x:
                if keep is None:
                    grad_x = accumulate(grad_x, g_c, torch.addcmul(w32, w32, f, value=scale, out=reuse(f)).to(g.dtype))
                else:
                    grad_x = accumulate(grad_x, g_c, w.to(g.dtype))
                    grad_branch = accumulate(grad_branch, g_c, torch.mul(f, w32, out=reuse(f)).to(g.dtype))
            if need_factors:
                # P = (Gᵀ X_branch) ⊙ W for these rows; dα_j = s Σ_i β_i P_i, dβ_i = s Σ_k P_ik α_jk
                prod = torch.mm(g_c.t(), x_branch, out=scratch("grad_w_eff", rows, n, x.dtype, x.device))
                _add_factor_grads(prod, w32, alpha, beta, start, grad_alpha, grad_beta)
        if need_x:
            if keep is not None:
                grad_x.add_(grad_branch.mul_(keep).mul_(scale / (1.0 - p)))
            grad_x = grad_x.view(x.shape)
        if need_factors:
            grad_alpha = grad_alpha.mul_(scale).to(alpha_in.dtype)
            grad_beta = grad_beta.mul_(scale).to(beta_in.dtype)
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (
            grad_x,
            None,
            grad_bias,
            grad_alpha if ctx.needs_input_grad[3] else None,
            grad_beta if ctx.needs_input_grad[4] else None,
            None,
            None,
        )


def spp_fused(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor, beta: torch.Tensor,
    scale: float, dropout_p: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Y = X Wᵀ + b + s·Dropout(X) W'ᵀ by `_FusedSPP` (W must be frozen: it gets no gradient there)."""
    if base_weight_trains(weight):
        raise ValueError(
            "The fused SPP path gives no gradient to the base weight (only to X, α, β and the bias): freeze the "
            "base weight (requires_grad_(False)), or call the SPPLinear layer, which takes the naive path while it trains."
        )
    return _FusedSPP.apply(x, weight, bias, alpha, beta, scale, dropout_p)


def spp_branch_naive(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """X W'ᵀ with W' = W ⊙ Repeat₀(α) ⊙ β materialised (Eq. 4), built in `compute_dtype`."""
    dtype = compute_dtype(weight.dtype, alpha.dtype)
    w_prime = weight.to(dtype) * repeat_alpha(alpha.to(dtype), weight.shape[0]) * beta.to(dtype)
    return F.linear(x, w_prime.to(x.dtype))


def spp_branch_blocked(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """X W'ᵀ by Eq. 7: [(X ⊙ α_j) W_jᵀ]_j ⊙ βᵀ as one batched GEMM over the r row blocks."""
    r, n = alpha.shape
    m = weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    xa = x2.unsqueeze(0) * alpha.to(x.dtype).unsqueeze(1)  # r × b × n
    blocks = weight.to(x.dtype).view(r, m // r, n).transpose(1, 2)  # r × n × m/r
    y = torch.bmm(xa, blocks)  # r × b × m/r
    y = y.transpose(0, 1).reshape(*lead, m)
    return y * beta.view(m).to(x.dtype)


def valid_r_message(name: str, out_features: int, r: int) -> str:
    """Error text for an r that does not divide out_features, listing the valid values."""
    valid = [d for d in range(1, min(out_features, 256) + 1) if out_features % d == 0]
    where = f"module {name!r} " if name else ""
    return (
        f"SPP r={r} does not divide out_features={out_features} of {where}(α rows each cover "
        f"out_features / r output rows). Valid r values up to 256: {valid}."
    )


def resolved_impl(impl: str) -> str:
    """The implementation "auto" means: fused needs the fewest weight-sized GEMMs and keeps the least for
    backward (only X), so it is the fastest correct choice for every config. The forward still takes
    naive while the base weight trains (fused gives W no gradient)."""
    return "fused" if impl == "auto" else impl


def _spp_settings(config: Any) -> dict[str, Any]:
    return dict(r=config.r, scale=config.scale, dropout=config.dropout, impl=config.impl, use_beta=config.use_beta)


def _spp_validate(in_features: int, out_features: int, config: Any, name: str) -> None:
    if out_features % config.r:
        raise ValueError(valid_r_message(name, out_features, config.r))


def _spp_trainable(settings: dict[str, Any]) -> tuple[str, ...]:
    return ("spp_alpha", "spp_beta") if settings["use_beta"] else ("spp_alpha",)


def _spp_init(layer: Any, config: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """α kaiming-uniform and β zero (the paper), or α zero and β kaiming/ones (zero_init="alpha")."""
    dtype = getattr(torch, config.adapter_dtype)
    alpha = torch.empty(config.r, layer.in_features, dtype=dtype, device=device)
    beta = torch.empty(layer.out_features, 1, dtype=dtype, device=device)
    if config.zero_init == "beta":
        nn.init.kaiming_uniform_(alpha, a=math.sqrt(5))
        nn.init.zeros_(beta)
    else:
        nn.init.zeros_(alpha)
        if config.use_beta:
            nn.init.kaiming_uniform_(beta, a=math.sqrt(5))
        else:
            nn.init.ones_(beta)
    return {"spp_alpha": alpha, "spp_beta": beta}


def _spp_forward(layer: Any, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    alpha, beta, scale = layer.spp_alpha[name], layer.spp_beta[name], layer.scale[name]
    impl = resolved_impl(layer.impl[name])
    weight = layer.weight
    dropout = layer.dropout[name] if layer.training else 0.0
    if impl == "fused" and not is_quantized(layer.base_layer) and not base_weight_trains(weight):
        return spp_fused(x, weight, layer.bias, alpha, beta, scale, dropout)
    # naive / blocked, a trainable base weight (autograd through the base layer gives its gradient), and
    # quantized bases: the base path stays 4/8-bit, the branch dequantizes W
    base_out = layer.base_layer(x, *args, **kwargs)
    x_branch = F.dropout(x, dropout, training=True) if dropout > 0 else x
    branch = (spp_branch_blocked if impl == "blocked" else spp_branch_naive)(x_branch, weight, alpha, beta)
    return base_out + scale * branch.to(base_out.dtype)


def _spp_merged_weight(layer: Any, name: str, weight: torch.Tensor) -> torch.Tensor:
    return effective_weight(weight, layer.spp_alpha[name], layer.spp_beta[name], layer.scale[name])


def _spp_parameter_count(config: Any, out_features: int, in_features: int) -> int:
    return config.r * in_features + (out_features if config.use_beta else 0)


def _spp_card_settings(config: Any) -> list[tuple[str, str]]:
    return [
        ("r (rows of α)", str(config.r)),
        ("scale s", f"{config.scale:g}"),
        ("dropout", f"{config.dropout:g}"),
        ("target modules", f"`{config.targets_text()}`"),
        ("trainable β", str(config.use_beta)),
        ("zero-initialised factor", config.zero_init),
        ("adapter dtype", config.adapter_dtype),
    ]


SPP_PAPER = "[Sparsity-Preserved Parameter-efficient fine-tuning](https://github.com/Lucky-Lance/SPP), Lu et al., ICML 2024"

SPP_KIND = register_adapter_kind(
    AdapterKind(
        name="spp",
        label="SPP",
        config_class=SPPConfig,
        param_names=("spp_alpha", "spp_beta"),
        setting_names=("r", "scale", "dropout", "impl", "use_beta"),
        settings=_spp_settings,
        validate=_spp_validate,
        init=_spp_init,
        trainable=_spp_trainable,
        forward=_spp_forward,
        merged_weight=_spp_merged_weight,
        parameter_count=_spp_parameter_count,
        card_settings=_spp_card_settings,
        adapter_description=(
            f"An **SPP adapter** ({SPP_PAPER}) for the pruned model {{base_link}}.\n"
            "It holds only the small SPP matrices α (r × in) and β (out × 1) of {num_layers} linear layers "
            "({adapter_params} parameters); merging them rescales the base weights element-wise, so every zero of "
            "the base stays zero."
        ),
        merged_description=(
            f"The pruned model {{base_link}} with an **SPP adapter** ({SPP_PAPER}) merged into its weights.\n"
            "Merging rescales the base weights element-wise, so this model has exactly the base's zeros "
            "({sparsity_summary} in the linear layers) and loads as a plain transformers model."
        ),
        merged_model_kind="spp-merged",
    )
)
