"""Uniform access to the dense (out, in) weight of the layer types SPP can wrap."""

from __future__ import annotations

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


def _bnb():
    try:
        import bitsandbytes as bnb

        return bnb
    except Exception:  # bitsandbytes missing or broken on this platform
        return None


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes 4-bit / 8-bit linear layers."""
    bnb = _bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_linear_like(module: nn.Module) -> bool:
    """Layers SPP can wrap: nn.Linear, GPT-2's Conv1D, bitsandbytes Linear4bit/Linear8bitLt."""
    return isinstance(module, nn.Linear) or (Conv1D and isinstance(module, Conv1D)) or is_quantized(module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense (out, in) tensor; Conv1D is transposed, 4/8-bit is dequantized.

    For Linear and Conv1D this is a view of the stored weight (no copy).
    """
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.t()
    bnb = _bnb()
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        data, state = module.weight.data, module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for its CPU kernel on the first eval-mode no-grad forward (on
            # CPUs with AVX-512 BF16); dequantize_4bit reads that layout as garbage, so undo the repacking on a copy.
            import copy

            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state)
    if bnb is not None and isinstance(module, bnb.nn.Linear8bitLt):
        state = module.state
        if state.SCB is None:  # weights not yet quantized (still on the CPU, before .cuda())
            return module.weight.data
        return module.weight.data.float() * state.SCB.float().unsqueeze(1) / 127.0
    return module.weight


QUANTIZED_MERGE_MESSAGE = (
    "Cannot merge SPP into a 4-bit/8-bit quantized base. Load the full-precision pruned base and "
    "merge there: SPPModel.from_pretrained(adapter, base_model=<full-precision base>)."
)


def set_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write a dense (out, in) weight back into a Linear or Conv1D layer in place."""
    if is_quantized(module):
        raise TypeError(QUANTIZED_MERGE_MESSAGE)
    target = module.weight.data.t() if (Conv1D and isinstance(module, Conv1D)) else module.weight.data
    target.copy_(weight.to(target.dtype))
