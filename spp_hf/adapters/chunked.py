"""Helpers every adapter kind's math shares: the compute dtype, bounded row chunks and reused scratch buffers.

Adapter math that builds a weight-sized tensor (W_eff, dW_eff) does so one chunk of rows at a time, about
`CHUNK_BYTES` each, in buffers reused across calls on the CPU; `CHUNK_BYTES` is read at call time, so it
can be changed (tests make it tiny to exercise several chunks).
"""

from __future__ import annotations

import threading

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype adapter math runs in: the widest of the given dtypes and float32 (bf16 factors on an fp32
    base would otherwise round W_eff to bf16)."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


# Row chunks of W_eff / dW_eff: bounds the transient memory of a huge layer, while keeping every GEMM
# large (small chunks turn dX = Σ G_c W_c into many thin rank-k updates, which are much slower).
CHUNK_BYTES = 64 * 2**20


def scratch(slot: str, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A (rows × n) buffer for a transient W_eff / dW_eff chunk, reused across calls on the CPU.

    A freshly allocated tensor of tens of MiB is a fresh mmap on the CPU, and touching its pages
    costs a sizeable share of a GEMM on it (docs/results.md, speed); reusing one buffer per thread
    removes that. Other devices have caching allocators: a plain ``empty``.
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
    buffers = _BUFFERS.__dict__.setdefault("buffers", {})
    buf = buffers.get(key)
    if buf is None or buf.numel() < rows * n:
        buf = buffers[key] = torch.empty(rows * n, dtype=dtype)
    return buf[: rows * n].view(rows, n)


_BUFFERS = threading.local()  # per thread: buffers are only ever in use inside one call


def accumulate(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """total + a @ b, starting from a plain product (no zero fill)."""
    return a @ b if total is None else total.addmm_(a, b)


def base_weight_trains(weight: torch.Tensor) -> bool:
    """Whether autograd will want a gradient for the base weight (the fused functions give it none)."""
    return weight.requires_grad and torch.is_grad_enabled()
