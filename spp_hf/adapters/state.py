"""Adapter tensors by name: the state-dict keys (`<module>.<param>`) every save, load and trainer path uses,
and the checks a set of tensors must pass before it is copied into a model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def adapter_key(module_name: str, param_name: str) -> str:
    """The key of one adapter tensor in adapter files and state dicts: ``<module>.<param>`` (e.g.
    ``model.layers.0.self_attn.q_proj.spp_alpha``)."""
    return f"{module_name}.{param_name}"


def layer_state(layers: Iterable[tuple[str, Any]], adapter_name: str | None = None) -> dict[str, Any]:
    """{adapter_key: parameter} of one adapter (the active one by default) over `(module name, layer)` pairs."""
    return {
        adapter_key(name, key): param
        for name, layer in layers
        for key, param in layer.adapter_parameters(adapter_name).items()
    }


def check_tensor_values(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse adapter tensors that are not floating point or hold NaN/Inf, naming the tensor."""
    for key, value in state.items():
        if not torch.is_tensor(value) or not value.is_floating_point():
            raise ValueError(
                f"Adapter tensor {key} in {source} has dtype {getattr(value, 'dtype', type(value).__name__)}, not a "
                "floating-point dtype: the file is corrupt or not an SPP adapter. Save or download it again."
            )
        if not torch.isfinite(value).all():
            raise ValueError(
                f"Adapter tensor {key} in {source} holds NaN/Inf values (not finite): training diverged or the file "
                "is corrupt. Use an earlier checkpoint, or train again with a lower learning rate."
            )


def check_adapter_tensors(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], source: str) -> None:
    """Names, shapes, dtypes and finiteness of `state` against the shapes an adapter needs."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Adapter weights in {source} do not fit this model: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}. Was it trained on another "
            "architecture or with other target_modules?"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"Adapter tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(shape)} ({source}).")
    check_tensor_values(state, source)


def file_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors as they go into a file: detached, float64 stored as float32 (the one place that casts)."""
    return {key: value.detach().float() if value.dtype == torch.float64 else value.detach() for key, value in state.items()}
