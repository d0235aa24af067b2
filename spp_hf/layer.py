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
  W_eff and dW_eff only ever exist one bounded chunk of rows at a time.
  With dropout it saves X and the dropout mask and adds the branch GEMMs it then needs.
"""

from __future__ import annotations

import math
import threading

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


# Row chunks of W_eff / dW_eff: bounds the transient memory of a huge layer, while keeping every GEMM
# large (small chunks turn dX = Σ G_c W_c into many thin rank-k updates, which measured several × slower).
CHUNK_BYTES = 64 * 2**20


def _chunk_rows(m: int, r: int, n: int, elem_size: int) -> int:
    """Rows per chunk: about CHUNK_BYTES of W, and either a divisor or a multiple of the α block m/r."""
    block = m // r
    want = max(1, CHUNK_BYTES // (n * elem_size))
    if want >= block:
        blocks = max(d for d in range(1, r + 1) if r % d == 0 and d * block <= want)
        return blocks * block
    return max(d for d in range(1, block + 1) if block % d == 0 and d <= want)


def _scratch(slot: str, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A (rows × n) buffer for a transient W_eff / dW_eff chunk, reused across calls on the CPU.

    A freshly allocated tensor of tens of MiB is a fresh mmap on the CPU, and touching its pages
    costs about a quarter of a GEMM on it (measured: 20 ms vs 85 ms at 4096 × 4096); reusing one
    buffer per thread removes that. Other devices have caching allocators: a plain ``empty``.
    None while autograd records (a backward with create_graph=True): ``out=`` is not differentiable,
    so callers then let each op allocate its result.
    """
    if torch.is_grad_enabled():
        return None
    if device.type != "cpu":
        return torch.empty(rows, n, dtype=dtype, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < rows * n:
        buf = buffers[(slot, dtype)] = torch.empty(rows * n, dtype=dtype)
    return buf[: rows * n].view(rows, n)


_SCRATCH = threading.local()  # per thread: buffers are only ever in use inside one call


def _chunk_factor(alpha: torch.Tensor, beta: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """(Repeat₀(α) ⊙ β)[start:start+rows] as a (rows × n) tensor, written into the reused W_eff buffer."""
    r, n = alpha.shape
    block = beta.shape[0] // r
    first, nblocks, per = start // block, max(1, rows // block), min(rows, block)
    out = _scratch("w_eff", rows, n, alpha.dtype, alpha.device)
    a, b = alpha[first : first + nblocks].view(nblocks, 1, n), beta[start : start + rows].view(nblocks, per, 1)
    return torch.mul(a, b, out=None if out is None else out.view(nblocks, per, n)).view(rows, n)


def _chunks(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
    """Yield (start, rows, W chunk, factor chunk) over the rows of W."""
    m, n = weight.shape
    step = _chunk_rows(m, alpha.shape[0], n, 4)
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
    buf = _scratch("factor_grad_slice", step, n, alpha.dtype, alpha.device)
    for offset in range(0, rows, step):
        i = start + offset
        p = torch.mul(prod[offset : offset + step], w[offset : offset + step], out=buf)
        torch.mv(p, alpha[i // block], out=grad_beta[i : i + step, 0])
        grad_alpha[i // block].addmv_(p.t(), beta[i : i + step, 0])


def _accumulate(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """total + a @ b, starting from a plain product (no zero fill)."""
    return a @ b if total is None else total.addmm_(a, b)


class _FusedSPP(torch.autograd.Function):
    """Y = X W_effᵀ + b (dropout 0) or X Wᵀ + b + s·D(X) W'ᵀ (dropout p), with exact dα, dβ, dX.

    W_eff (or W') is built chunk by chunk of rows (at most CHUNK_BYTES each) right before the GEMM
    that reads it, in forward and again in backward; only X (plus the dropout mask) is kept.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, beta, scale, dropout_p):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        keep = None
        if dropout_p > 0.0:
            keep = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            x_branch = x2 * keep / (1.0 - dropout_p)
        outs = []
        for _, _, w, f in _chunks(weight, alpha, beta):
            w32 = w.to(f.dtype)
            if keep is None:  # W_eff = W + s·W⊙F
                y = x2 @ torch.addcmul(w32, w32, f, value=scale, out=f).to(dtype).t()
            else:  # base + s · branch, the branch on dropped-out inputs
                y = torch.addmm(x2 @ w.to(dtype).t(), x_branch, f.mul_(w32).to(dtype).t(), alpha=scale)
            outs.append(y)
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, keep, weight, alpha, beta)
        ctx.scale, ctx.dropout_p, ctx.has_bias = scale, dropout_p, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, weight, alpha, beta = ctx.saved_tensors
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
                    grad_x = _accumulate(grad_x, g_c, torch.addcmul(w32, w32, f, value=scale, out=reuse(f)).to(g.dtype))
                else:
                    grad_x = _accumulate(grad_x, g_c, w.to(g.dtype))
                    grad_branch = _accumulate(grad_branch, g_c, torch.mul(f, w32, out=reuse(f)).to(g.dtype))
            if need_factors:
                # P = (Gᵀ X_branch) ⊙ W for these rows; dα_j = s Σ_i β_i P_i, dβ_i = s Σ_k P_ik α_jk
                prod = torch.mm(g_c.t(), x_branch, out=_scratch("grad_w_eff", rows, n, x.dtype, x.device))
                _add_factor_grads(prod, w32, alpha, beta, start, grad_alpha, grad_beta)
        if need_x:
            if keep is not None:
                grad_x.add_(grad_branch.mul_(keep).mul_(scale / (1.0 - p)))
            grad_x = grad_x.view(x.shape)
        if need_factors:
            grad_alpha.mul_(scale)
            grad_beta.mul_(scale)
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
        _register_sharded_weight(self)

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


def _register_sharded_weight(layer: SPPLinear) -> None:
    """Under DeepSpeed ZeRO-3 the base weight is partitioned and gathered only for the forward of the
    module that owns it; the SPP layer reads it in its own forward and backward, so register it as
    an external parameter of the SPP layer (DeepSpeed then gathers it for both passes).

    FSDP needs nothing: it unshards a whole wrapped unit (a decoder layer) around its forward and
    backward, and the fused function saves the same weight tensor `F.linear` would.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        deepspeed.zero.register_external_parameter(layer, layer.base_layer.weight)


def valid_r_message(name: str, out_features: int, r: int) -> str:
    """Error text for an r that does not divide out_features, listing the valid values."""
    valid = [d for d in range(1, min(out_features, 256) + 1) if out_features % d == 0]
    where = f"module {name!r} " if name else ""
    return (
        f"SPP r={r} does not divide out_features={out_features} of {where}(α rows each cover "
        f"out_features / r output rows). Valid r values up to 256: {valid}."
    )

