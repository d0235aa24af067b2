"""Reading and writing SPP state when parameters are sharded (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions,
FSDP1 inside `summon_full_params`) as well as on a plain model: one place for every full-tensor access."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from torch.distributed.tensor import DTensor, distribute_tensor

from ..layer_weights import dense_weight
from ..sparsity import fingerprint_modules
from .state import adapter_key, check_adapter_tensors
from .layer import SPPLinear

_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_name(name: str) -> str:
    """Module name without FSDP1 / checkpoint / compile wrapper parts."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 DTensor shard (a collective: call it on every rank); others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextmanager
def _zero3_gathered(params: list[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """DeepSpeed ZeRO-3: gather partitioned parameters for the block (no-op for ordinary tensors)."""
    params = [p for p in params if is_zero3(p)]
    if not params:
        yield
        return
    import deepspeed  # optional: only present (and only needed) under DeepSpeed ZeRO-3

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, SPPLinear):
            yield _clean_name(name), module


def iter_full_base_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, dense (out, in) base weight) of every SPP layer, gathered in full one layer at a time.

    Works on a plain model, under DDP, FSDP2 (DTensor), DeepSpeed ZeRO-3 and, inside
    ``FSDP.summon_full_params``, FSDP1. Under sharding every rank must iterate (the gathers are collective).
    """
    for name, layer in adapter_layers(model):
        base = layer.base_layer
        with _zero3_gathered(list(base.parameters(recurse=False))):
            yield name, full_tensor(dense_weight(base)).detach()


def spp_mask_fingerprint(model: nn.Module) -> dict:
    """Mask fingerprint of the SPP base weights, gathering sharded weights (see `iter_full_base_weights`)."""
    with torch.no_grad():
        return fingerprint_modules(iter_full_base_weights(model))


def gather_spp_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's tensors, in full, on CPU, keyed as in adapter files (``<module>.spp_alpha`` / ``<module>.spp_beta``).

    Collective under FSDP2 / ZeRO-3: call it on every rank.
    """
    state = {}
    for name, layer in adapter_layers(model):
        params = layer.adapter_parameters()
        with _zero3_gathered(list(params.values())):
            for key, param in params.items():
                state[adapter_key(name, key)] = full_tensor(param).detach().cpu().clone()
    return state


def load_spp_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the active adapter, sharded or not; names, shapes and values are checked before any write."""
    own = {adapter_key(name, key): param for name, layer in adapter_layers(model) for key, param in layer.adapter_parameters().items()}
    shapes = {key: tuple(param.ds_shape) if is_zero3(param) else tuple(param.shape) for key, param in own.items()}
    check_adapter_tensors(shapes, state, "the SPP checkpoint (resume with the same base and spp_config: target_modules, r)")
    with torch.no_grad():
        for key, param in own.items():
            value = state[key].to(param.dtype)
            if isinstance(param, DTensor):
                param.copy_(distribute_tensor(value.to(param.device), param.device_mesh, param.placements))
            else:
                with _zero3_gathered([param], modifier_rank=0):
                    param.copy_(value.to(param.device))
