"""`SPPLinear` and the SPP branch math (paper Sec. 3.2).

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
  With dropout it saves X and the dropout mask and adds the branch GEMMs it then needs.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .weights import dense_weight, in_out_features, is_linear_like, is_quantized


def repeat_alpha(alpha: torch.Tensor, out_features: int) -> torch.Tensor:
    """Repeat₀(α, m/r): each row of α repeated m/r times along dim 0 (m × n)."""
    return alpha.repeat_interleave(out_features // alpha.shape[0], dim=0)


def spp_factor(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """M = Repeat₀(α, m/r) ⊙ β as an (m × n) tensor, built with one broadcast multiply."""
    r, n = alpha.shape
    m = beta.shape[0]
    return (alpha.view(r, 1, n) * beta.view(r, m // r, 1)).view(m, n)


def effective_weight(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float) -> torch.Tensor:
    """W_eff = W ⊙ (1 + s·Repeat₀(α)⊙β) = W + s·W' (the merged weight), computed in α's dtype."""
    factor = spp_factor(alpha, beta)
    return factor.mul_(scale).add_(1.0).mul_(weight.to(factor.dtype))


def _factor_grads(
    weight: torch.Tensor, grad_w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dα, dβ from G_W = Gᵀ·X_branch (m × n), the gradient w.r.t. the effective weight.

    With P = G_W ⊙ W, ∂L/∂(A⊙β) = s·P, so dα_j = s·Σ_{i∈block j} β_i P_i and
    dβ_i = s·Σ_k P_ik α_{j(i),k}: two batched reductions, no m × n temporaries. G_W is overwritten.
    """
    r, n = alpha.shape
    m = beta.shape[0]
    p = grad_w.mul_(weight).view(r, m // r, n)
    grad_alpha = torch.bmm(beta.view(r, 1, m // r).to(p.dtype), p).view(r, n).mul_(scale)
    grad_beta = torch.bmm(p, alpha.view(r, n, 1).to(p.dtype)).view(m, 1).mul_(scale)
    return grad_alpha, grad_beta


class _FusedSPP(torch.autograd.Function):
    """Y = X W_effᵀ + b (dropout 0) or X Wᵀ + b + s·D(X) W'ᵀ (dropout p), with exact dα, dβ, dX."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, beta, scale, dropout_p):
        compute_dtype = x.dtype
        if dropout_p > 0.0:
            keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            x_drop = x * keep / (1.0 - dropout_p)
            w_prime = spp_factor(alpha, beta).mul_(weight.to(alpha.dtype)).to(compute_dtype)
            y = F.linear(x, weight.to(compute_dtype), bias) + scale * F.linear(x_drop, w_prime)
            ctx.save_for_backward(x, keep, weight, alpha, beta)
        else:
            w_eff = effective_weight(weight, alpha, beta, scale).to(compute_dtype)
            y = F.linear(x, w_eff, bias)
            ctx.save_for_backward(x, None, weight, alpha, beta)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, weight, alpha, beta = ctx.saved_tensors
        scale, p = ctx.scale, ctx.dropout_p
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_alpha = grad_beta = grad_bias = None
        if p > 0.0:
            x_in = x2 * keep.reshape(x2.shape) / (1.0 - p)
        else:
            x_in = x2
        if ctx.needs_input_grad[0]:
            if p > 0.0:
                w_prime = spp_factor(alpha, beta).mul_(weight.to(alpha.dtype)).to(g.dtype)
                grad_branch = (g @ w_prime).mul_(keep.reshape(x2.shape)).mul_(scale / (1.0 - p))
                grad_x = (g @ weight.to(g.dtype)).add_(grad_branch)
            else:
                grad_x = g @ effective_weight(weight, alpha, beta, scale).to(g.dtype)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_w = (g.t() @ x_in).to(alpha.dtype)  # ∂L/∂W_eff restricted to the branch input, m × n
            grad_alpha, grad_beta = _factor_grads(weight.to(alpha.dtype), grad_w, alpha, beta, scale)
            grad_alpha = grad_alpha if ctx.needs_input_grad[3] else None
            grad_beta = grad_beta if ctx.needs_input_grad[4] else None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_alpha, grad_beta, None, None


def spp_branch_naive(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """X W'ᵀ with W' = W ⊙ Repeat₀(α) ⊙ β materialised (Eq. 4)."""
    w_prime = weight.to(alpha.dtype) * repeat_alpha(alpha, weight.shape[0]) * beta
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


class SPPLinear(nn.Module):
    """A frozen linear layer (Linear, Conv1D or bitsandbytes 4/8-bit) with SPP factors α and β.

    The trainable parameters are exactly ``spp_alpha`` (r × in_features) and ``spp_beta``
    (out_features × 1). Further named adapters are kept aside and swapped in by `set_adapter`.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 16,
        scale: float = 2.0,
        dropout: float = 0.0,
        impl: str = "auto",
        use_beta: bool = True,
        zero_init: str = "beta",
        adapter_dtype: torch.dtype = torch.float32,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(
                f"SPP can wrap nn.Linear, transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt, "
                f"not {type(base_layer).__name__}."
            )
        self.base_layer = base_layer
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.merged = False
        self.disabled = False
        self.active_adapter = adapter_name
        self._inactive: dict[str, dict] = {}
        self._install(r, scale, dropout, impl, use_beta, zero_init, adapter_dtype)

    def _install(self, r, scale, dropout, impl, use_beta, zero_init, adapter_dtype) -> None:
        if self.out_features % r:
            raise ValueError(valid_r_message("", self.out_features, r))
        device = self.base_layer.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        alpha = torch.empty(r, self.in_features, dtype=adapter_dtype, device=device)
        beta = torch.empty(self.out_features, 1, dtype=adapter_dtype, device=device)
        if zero_init == "beta":
            nn.init.kaiming_uniform_(alpha, a=math.sqrt(5))
            nn.init.zeros_(beta)
        else:
            nn.init.zeros_(alpha)
            if use_beta:
                nn.init.kaiming_uniform_(beta, a=math.sqrt(5))
            else:
                nn.init.ones_(beta)
        self.spp_alpha = nn.Parameter(alpha)
        self.spp_beta = nn.Parameter(beta, requires_grad=use_beta)
        self.r, self.scale, self.dropout_p, self.impl, self.use_beta = r, scale, dropout, impl, use_beta

    # ----------------------------------------------------------------- adapters
    def _state(self) -> dict:
        return dict(
            alpha=self.spp_alpha, beta=self.spp_beta, r=self.r, scale=self.scale,
            dropout=self.dropout_p, impl=self.impl, use_beta=self.use_beta,
        )  # fmt: skip

    def add_adapter(self, adapter_name: str, **kwargs) -> None:
        """Add a named adapter (freshly initialised) and make it active."""
        if adapter_name == self.active_adapter or adapter_name in self._inactive:
            raise ValueError(f"Adapter {adapter_name!r} already exists on this layer.")
        self._inactive[self.active_adapter] = self._state()
        self.active_adapter = adapter_name
        dtype = kwargs.pop("adapter_dtype", self.spp_alpha.dtype)
        self._install(adapter_dtype=dtype, **kwargs)

    def set_adapter(self, adapter_name: str) -> None:
        """Make a named adapter the active one (its α/β become ``spp_alpha``/``spp_beta``)."""
        if adapter_name == self.active_adapter:
            return
        if adapter_name not in self._inactive:
            known = [self.active_adapter, *self._inactive]
            raise KeyError(f"No adapter {adapter_name!r} on this layer; known adapters: {known}")
        if self.merged:
            raise RuntimeError("Unmerge (model.unmerge_spp()) before switching adapters.")
        self._inactive[self.active_adapter] = self._state()
        state = self._inactive.pop(adapter_name)
        self.spp_alpha, self.spp_beta = state.pop("alpha"), state.pop("beta")
        self.r, self.scale, self.dropout_p = state["r"], state["scale"], state["dropout"]
        self.impl, self.use_beta = state["impl"], state["use_beta"]
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name == self.active_adapter:
            raise ValueError(f"Cannot delete the active adapter {adapter_name!r}; set_adapter another first.")
        del self._inactive[adapter_name]

    @property
    def adapter_names(self) -> list[str]:
        return [self.active_adapter, *self._inactive]

    # ----------------------------------------------------------------- math
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's dense (out, in) weight (dequantized for 4/8-bit bases)."""
        return dense_weight(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def resolved_impl(self) -> str:
        """The implementation used for "auto": fused needs the fewest weight-sized GEMMs and keeps
        the least for backward (only X), so it is the fastest correct choice for every config."""
        return "fused" if self.impl == "auto" else self.impl

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        impl = self.resolved_impl()
        weight = self.weight
        dropout = self.dropout_p if self.training else 0.0
        if impl == "fused" and not is_quantized(self.base_layer):
            return _FusedSPP.apply(x, weight, self.bias, self.spp_alpha, self.spp_beta, self.scale, dropout)
        # naive / blocked, and quantized bases: the base path stays 4/8-bit, the branch dequantizes W
        base_out = self.base_layer(x, *args, **kwargs)
        x_branch = F.dropout(x, dropout, training=True) if dropout > 0 else x
        if impl == "blocked":
            branch = spp_branch_blocked(x_branch, weight, self.spp_alpha, self.spp_beta)
        else:
            branch = spp_branch_naive(x_branch, weight, self.spp_alpha, self.spp_beta)
        return base_out + self.scale * branch.to(base_out.dtype)

    # ----------------------------------------------------------------- merge
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + s·W' in float32, checked: every zero of W stays zero and all values are finite."""
        weight = self.weight.float()
        merged = effective_weight(weight, self.spp_alpha.float(), self.spp_beta.float(), self.scale)
        if not torch.isfinite(merged).all():
            raise ValueError(
                "Refusing to merge: α or β hold NaN/Inf (the merged weight is not finite). "
                "The base weights were left untouched; check training for divergence."
            )
        if (merged[weight == 0] != 0).any():
            raise ValueError("Refusing to merge: the merge would fill zeros of the pruned base.")
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·W' into the base weight in place (computed in float32, cast back)."""
        if self.merged:
            return
        from .weights import set_dense_weight

        set_dense_weight(self.base_layer, self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight: W = W_merged / (1 + s·Repeat₀(α)⊙β) (zeros stay exact)."""
        if not self.merged:
            return
        from .weights import set_dense_weight

        factor = spp_factor(self.spp_alpha.float(), self.spp_beta.float()).mul_(self.scale).add_(1.0)
        set_dense_weight(self.base_layer, self.weight.float() / factor)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scale={self.scale}, dropout={self.dropout_p}, impl={self.resolved_impl()}"
        )


def valid_r_message(name: str, out_features: int, r: int) -> str:
    """Error text for an r that does not divide out_features, listing the valid values."""
    valid = [d for d in range(1, min(out_features, 256) + 1) if out_features % d == 0]
    where = f"module {name!r} " if name else ""
    return (
        f"SPP r={r} does not divide out_features={out_features} of {where}(α rows each cover "
        f"out_features / r output rows). Valid r values up to 256: {valid}."
    )

