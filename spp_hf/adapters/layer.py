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
  It gives gradients to X, α, β and the bias, not to W: while the base weight trains, `SPPLinear`
  takes the naive path.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_weights import QUANTIZED_MERGE_MESSAGE, dense_weight, in_out_features, is_linear_like, is_quantized, set_dense_weight


def repeat_alpha(alpha: torch.Tensor, out_features: int) -> torch.Tensor:
    """Repeat₀(α, m/r): each row of α repeated m/r times along dim 0 (m × n)."""
    return alpha.repeat_interleave(out_features // alpha.shape[0], dim=0)


def spp_factor(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """M = Repeat₀(α, m/r) ⊙ β as an (m × n) tensor, built with one broadcast multiply."""
    r, n = alpha.shape
    m = beta.shape[0]
    return (alpha.view(r, 1, n) * beta.view(r, m // r, 1)).view(m, n)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype SPP math runs in: the widest of the given dtypes and float32 (bf16 factors on an fp32
    base would otherwise round W_eff to bf16)."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def effective_weight(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float) -> torch.Tensor:
    """W_eff = W ⊙ (1 + s·Repeat₀(α)⊙β) = W + s·W' (the merged weight), in `compute_dtype` of the inputs."""
    dtype = compute_dtype(weight.dtype, alpha.dtype, beta.dtype)
    factor = spp_factor(alpha.to(dtype), beta.to(dtype))
    return factor.mul_(scale).add_(1.0).mul_(weight.to(dtype))


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
    # A buffer made under inference_mode is an inference tensor, which may not be written outside it
    # (and a normal one may not be a view target inside it): one buffer per mode.
    key = (slot, dtype, torch.is_inference_mode_enabled())
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(key)
    if buf is None or buf.numel() < rows * n:
        buf = buffers[key] = torch.empty(rows * n, dtype=dtype)
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


def base_weight_trains(weight: torch.Tensor) -> bool:
    """Whether autograd will want a gradient for the base weight (the fused functions give it none)."""
    return weight.requires_grad and torch.is_grad_enabled()


def spp_fused(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor, beta: torch.Tensor,
    scale: float, dropout_p: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Y = X Wᵀ + b + s·Dropout(X) W'ᵀ by `_FusedSPP` (W must be frozen: it gets no gradient there)."""
    if base_weight_trains(weight):
        raise ValueError(
            "The fused SPP path gives no gradient to the base weight (only to X, α, β and the bias): freeze the "
            "base weight (requires_grad_(False)), or call SPPLinear, which takes the naive path while it trains."
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


# --------------------------------------------------------------------------- adapter kinds
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def check_adapter_name(adapter_name: Any) -> str:
    """Refuse names that are not a plain identifier-like word (they become folder names and parameter keys)."""
    if not isinstance(adapter_name, str) or not ADAPTER_NAME_RE.fullmatch(adapter_name):
        raise ValueError(
            f"Invalid adapter name {adapter_name!r}: an adapter name is saved as a sub-folder name and a parameter "
            "key, so it must be 1-64 letters, digits, '_' or '-' (not starting with '-'), e.g. 'default' or 'task_a'."
        )
    return adapter_name


@dataclass(frozen=True)
class AdapterKind:
    """What one adapter type adds to a layer; `SPPLinear` dispatches on the adapter's config class.

    param_names: the layer's `nn.ParameterDict` attributes holding this kind's tensors (also the
        key suffixes in adapter files, ``<module>.<param_name>``).
    setting_names: per-adapter plain settings, kept in dicts of the same names on the layer.
    settings(config) -> {setting: value}.
    validate(in_features, out_features, config, module_name): raise if the config cannot fit such a
        layer (SPP: r must divide out_features); runs before anything is built or wrapped.
    init(layer, config, device) -> {param_name: tensor}: fresh tensors for a new adapter.
    trainable(settings) -> the param names that train, given `settings(config)` (others stay frozen).
    forward(layer, adapter_name, x, *args, **kwargs) -> Y with the adapter applied.
    merged_weight(layer, adapter_name, weight) -> W + s·ΔW for the dense (out, in) weight given in
        `compute_dtype` (the layer casts, checks zeros and finiteness, and keeps the original).
    """

    config_class: type
    param_names: tuple[str, ...]
    setting_names: tuple[str, ...]
    settings: Callable[[Any], dict[str, Any]]
    validate: Callable[[int, int, Any, str], None]
    init: Callable[["SPPLinear", Any, torch.device], dict[str, torch.Tensor]]
    trainable: Callable[[dict[str, Any]], tuple[str, ...]]
    forward: Callable[..., torch.Tensor]
    merged_weight: Callable[["SPPLinear", str, torch.Tensor], torch.Tensor]


ADAPTER_KINDS: dict[type, AdapterKind] = {}


def register_adapter_kind(kind: AdapterKind) -> None:
    """Make `SPPLinear` accept adapters configured by `kind.config_class`."""
    ADAPTER_KINDS[kind.config_class] = kind
    SPPLinear.adapter_layer_names = tuple(dict.fromkeys((*SPPLinear.adapter_layer_names, *kind.param_names)))
    SPPLinear.other_param_names = tuple(dict.fromkeys((*SPPLinear.other_param_names, *kind.setting_names)))


def adapter_kind(config: Any) -> AdapterKind:
    """The kind for a config, or a TypeError naming the accepted config classes."""
    kind = ADAPTER_KINDS.get(type(config))
    if kind is None:
        accepted = ", ".join(c.__name__ for c in ADAPTER_KINDS)
        raise TypeError(
            f"spp-hf layers take an adapter config of type {accepted}, not {type(config).__name__}. "
            "For LoRA and other PEFT methods use peft.get_peft_model; for SPP pass SPPConfig(...)."
        )
    return kind


# --------------------------------------------------------------------------- the layer
class SPPLinear(nn.Module):
    """A frozen linear layer (Linear, Conv1D or bitsandbytes 4/8-bit) with named adapters, as PEFT's tuner layers.

    ``SPPLinear(base_layer, adapter_name, config)`` wraps the base with one adapter; `update_layer` adds
    more. An SPP adapter's factors live in ``spp_alpha[name]`` (r × in_features) and ``spp_beta[name]``
    (out_features × 1), `nn.ParameterDict`s, so every adapter moves, casts and saves like any
    parameter; per-adapter settings (r, scale, dropout, impl, use_beta) are dicts keyed the same way.
    One adapter is active (`active_adapter`); only its parameters train.

    Merging writes W + s·ΔW into the base weight, refusing (weights untouched) if, after the cast to
    the base dtype, a value is not finite, a zero would become non-zero or a non-zero zero; zeros are
    written as +0.0. The original weight is kept while merged (one copy of the weight, a non-persistent
    buffer), so `unmerge` restores it bit for bit.
    """

    # ParameterDict / settings-dict attributes of every registered adapter kind (register_adapter_kind extends them)
    adapter_layer_names: tuple[str, ...] = ("spp_alpha", "spp_beta")
    other_param_names: tuple[str, ...] = ("r", "scale", "dropout", "impl", "use_beta")

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", config: Any = None) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(
                f"SPP can wrap nn.Linear, transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt, "
                f"not {type(base_layer).__name__}."
            )
        from .config import SPPConfig

        config = SPPConfig() if config is None else config
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        for name in self.other_param_names:
            setattr(self, name, {})
        self.adapter_kind: dict[str, AdapterKind] = {}
        self.merged_adapter: str | None = None
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.disabled = False
        self.update_layer(adapter_name, config)  # validates before the base is touched
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.active_adapter = adapter_name
        _register_sharded_weight(self)

    # ----------------------------------------------------------------- adapters
    def check_config(self, config: Any, name: str = "") -> AdapterKind:
        """Validate a config for this layer (type, r) without changing anything; returns its kind."""
        kind = adapter_kind(config)
        kind.validate(self.in_features, self.out_features, config, name)
        return kind

    def adapter_shapes(self, config: Any, name: str = "") -> dict[str, tuple[int, ...]]:
        """{param name: shape} an adapter with `config` has on this layer (checked; nothing allocated)."""
        kind = self.check_config(config, name)
        return {key: tuple(value.shape) for key, value in kind.init(self, config, torch.device("meta")).items()}

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Create adapter `adapter_name` from `config` (replacing an existing one of that name), freshly
        initialised and trainable; the active adapter does not change. Everything is checked first."""
        check_adapter_name(adapter_name)
        kind = self.check_config(config)
        if self.merged_adapter == adapter_name:
            raise RuntimeError(f"Adapter {adapter_name!r} is merged into the base weight; unmerge first.")
        device = self.base_layer.weight.device
        tensors = kind.init(self, config, torch.device("cpu") if device.type == "meta" else device)
        self._drop(adapter_name)
        settings = kind.settings(config)
        for key, value in settings.items():
            getattr(self, key)[adapter_name] = value
        for key, value in tensors.items():
            getattr(self, key)[adapter_name] = nn.Parameter(value, requires_grad=key in kind.trainable(settings))
        self.adapter_kind[adapter_name] = kind

    def _drop(self, adapter_name: str) -> None:
        kind = self.adapter_kind.pop(adapter_name, None)
        if kind is None:
            return
        for key in kind.param_names:
            del getattr(self, key)[adapter_name]
        for key in kind.setting_names:
            getattr(self, key).pop(adapter_name, None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_kind)

    def _name(self, adapter_name: str | None) -> str:
        name = self.active_adapter if adapter_name is None else adapter_name
        if name not in self.adapter_kind:
            raise KeyError(f"No adapter {name!r} on this layer; known adapters: {self.adapter_names}")
        return name

    def adapter_parameters(self, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
        """{param name: parameter} of one adapter (the active one by default), e.g. {"spp_alpha": α, "spp_beta": β}.
        The param name is the suffix of the key in adapter files (``<module>.spp_alpha``)."""
        name = self._name(adapter_name)
        return {key: getattr(self, key)[name] for key in self.adapter_kind[name].param_names}

    def set_trainable(self, trainable: bool, adapter_name: str | None = None) -> None:
        """Make one adapter (active by default) trainable or frozen; parameters its config keeps fixed
        (β when use_beta is False) stay frozen."""
        name = self._name(adapter_name)
        keep = self.adapter_kind[name].trainable(self.adapter_settings(name))
        for key, param in self.adapter_parameters(name).items():
            param.requires_grad_(trainable and key in keep)

    def adapter_settings(self, adapter_name: str | None = None) -> dict[str, Any]:
        """{setting: value} of one adapter (the active one by default), e.g. {"r": 16, "scale": 2.0, ...}."""
        name = self._name(adapter_name)
        return {key: getattr(self, key)[name] for key in self.adapter_kind[name].setting_names}

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` active; it becomes trainable if the layer's active adapter was, others are frozen."""
        name = self._name(adapter_name)
        if name == self.active_adapter:
            return
        if self.merged:
            raise RuntimeError(
                f"Adapter {self.merged_adapter!r} is merged into the base weights; unmerge first "
                "(model.unmerge_spp()), switch, then merge again."
            )
        trainable = any(p.requires_grad for p in self.adapter_parameters().values())
        for other in self.adapter_names:
            self.set_trainable(False, other)
        self.set_trainable(trainable, name)
        self.active_adapter = name

    def delete_adapter(self, adapter_name: str) -> None:
        name = self._name(adapter_name)
        if name == self.active_adapter:
            raise ValueError(f"Cannot delete the active adapter {name!r}; set_adapter another first.")
        self._drop(name)

    # ----------------------------------------------------------------- math
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's dense (out, in) weight (dequantized for 4/8-bit bases)."""
        return dense_weight(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def resolved_impl(self, adapter_name: str | None = None) -> str:
        """The implementation used for "auto": fused needs the fewest weight-sized GEMMs and keeps
        the least for backward (only X), so it is the fastest correct choice for every config. The
        forward still takes naive while the base weight trains (fused gives W no gradient)."""
        impl = self.impl[self._name(adapter_name)]
        return "fused" if impl == "auto" else impl

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapter_kind[self.active_adapter].forward(self, self.active_adapter, x, *args, **kwargs)

    # ----------------------------------------------------------------- merge
    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    @torch.no_grad()
    def merged_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """W + s·ΔW of an adapter as a dense (out, in) tensor in the base dtype, checked after the cast:
        all finite, every zero of W still zero (written +0.0), no non-zero of W turned into zero."""
        name = self._name(adapter_name)
        weight = self.weight
        if is_quantized(self.base_layer):
            raise TypeError(QUANTIZED_MERGE_MESSAGE)
        dtype = compute_dtype(weight.dtype, *(p.dtype for p in self.adapter_parameters(name).values()))
        merged = self.adapter_kind[name].merged_weight(self, name, weight.to(dtype)).to(weight.dtype)
        zero = weight == 0
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"Refusing to merge adapter {name!r}: the merged {weight.dtype} weight would not be finite (factors "
                "hold NaN/Inf, or the product overflows this dtype). The base weights were left untouched; check "
                "training for divergence, or merge onto a wider dtype (e.g. float32)."
            )
        if (merged[zero] != 0).any():
            raise ValueError("Refusing to merge: the merge would fill zeros of the pruned base. Weights left untouched.")
        if (merged[~zero] == 0).any():
            raise ValueError(
                f"Refusing to merge adapter {name!r}: {int((merged[~zero] == 0).sum())} non-zero weights would "
                f"become zero in {weight.dtype} (1 + s·ΔW factor at or near 0, or underflow), which would change the "
                "sparsity mask. The base weights were left untouched."
            )
        return merged.masked_fill_(zero, 0.0)

    @torch.no_grad()
    def merge(self, adapter_name: str | None = None) -> None:
        """Fold an adapter (the active one) into the base weight in place; the original is kept for `unmerge`."""
        name = self._name(adapter_name)
        if self.merged:
            if self.merged_adapter == name:
                return
            raise RuntimeError(f"Adapter {self.merged_adapter!r} is already merged; unmerge first.")
        merged = self.merged_weight(name)
        self._unmerged_weight = self.base_layer.weight.detach().clone()
        set_dense_weight(self.base_layer, merged)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit from the copy kept by `merge` (no division)."""
        if not self.merged:
            return
        self.base_layer.weight.data.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapter = None

    def extra_repr(self) -> str:
        name = self.active_adapter
        settings = ", ".join(f"{k}={v}" for k, v in self.adapter_settings(name).items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapter={name!r}, {settings}"


# --------------------------------------------------------------------------- the SPP kind
def _spp_settings(config: Any) -> dict[str, Any]:
    return dict(r=config.r, scale=config.scale, dropout=config.dropout, impl=config.impl, use_beta=config.use_beta)


def _spp_validate(in_features: int, out_features: int, config: Any, name: str) -> None:
    if out_features % config.r:
        raise ValueError(valid_r_message(name, out_features, config.r))


def _spp_trainable(settings: dict[str, Any]) -> tuple[str, ...]:
    return ("spp_alpha", "spp_beta") if settings["use_beta"] else ("spp_alpha",)


def _spp_init(layer: SPPLinear, config: Any, device: torch.device) -> dict[str, torch.Tensor]:
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


def _spp_forward(layer: SPPLinear, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    alpha, beta, scale = layer.spp_alpha[name], layer.spp_beta[name], layer.scale[name]
    impl = layer.resolved_impl(name)
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


def _spp_merged_weight(layer: SPPLinear, name: str, weight: torch.Tensor) -> torch.Tensor:
    return effective_weight(weight, layer.spp_alpha[name], layer.spp_beta[name], layer.scale[name])


def _register_spp_kind() -> None:
    from .config import SPPConfig

    register_adapter_kind(
        AdapterKind(
            config_class=SPPConfig,
            param_names=("spp_alpha", "spp_beta"),
            setting_names=("r", "scale", "dropout", "impl", "use_beta"),
            settings=_spp_settings,
            validate=_spp_validate,
            init=_spp_init,
            trainable=_spp_trainable,
            forward=_spp_forward,
            merged_weight=_spp_merged_weight,
        )
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



_register_spp_kind()
