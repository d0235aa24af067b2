"""Layer-by-layer calibration that works on any decoder stack without per-model code.

1. `find_decoder_layers` takes the nn.ModuleList of identical blocks holding the most parameters.
2. `capture_layer_inputs` runs the model on each calibration sample until the first block is called; a
   forward pre-hook (with_kwargs=True) records the block's hidden states and every other argument the model
   passes (position embeddings, attention mask, position ids, cache flags, ...) and raises to stop.
3. `run_sequential` then, for each block: collects statistics of the inputs of its target linear layers,
   lets the method prune them, and recomputes the block's outputs with the pruned weights, which become
   the next block's inputs. One buffer of activations is held (each batch's outputs replace its inputs), and
   with `device` set only the current block is moved there.

The steps (`capture_layer_inputs` + `calibration_batches` = `start_sequential`, `prune_block`, `advance`) are
shared with `streaming.py`, which runs them on decoder blocks read one at a time from a checkpoint.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layer_weights import dense_weight, in_out_features, is_linear_like


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class LayerCall:
    """The first decoder block's inputs: one hidden-state tensor per sample plus the shared other arguments."""

    hidden: torch.Tensor  # (nsamples, seqlen, hidden)
    args: tuple  # positional arguments after the hidden states
    kwargs: dict  # keyword arguments (position_embeddings, attention_mask, ...)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the model's decoder blocks: the list of same-type blocks with linear layers and most parameters."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not all(any(is_linear_like(m) for m in block.modules()) for block in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"No decoder layers found in {type(model).__name__}: pruning looks for an nn.ModuleList of identical blocks "
            "that contain linear layers (e.g. model.layers or transformer.h)."
        )
    return best[1], best[2]


def move_to(obj: Any, device: torch.device | str | None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to `device`."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [move_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, first_layer: nn.Module, input_ids: torch.Tensor, device: torch.device | str | None = None
) -> LayerCall:
    """Run `model` on each row of `input_ids` up to `first_layer` and record that block's call arguments."""
    device = torch.device(device) if device is not None else module_device(first_layer)
    model_device = module_device(model)
    hidden = None
    filled = 0
    call: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal hidden, filled
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        if hidden is None:  # samples share their length, so the other arguments are the same for all
            hidden = torch.empty((input_ids.shape[0], *x.shape[1:]), dtype=x.dtype, device=device)
            call["args"] = move_to(tuple(args[1:]), device)
            call["kwargs"] = move_to(kwargs, device)
        hidden[filled] = x[0].to(device)
        filled += 1
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in input_ids:
            try:
                model(row.unsqueeze(0).to(model_device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    if filled != input_ids.shape[0]:
        raise RuntimeError(
            f"The model's forward did not call its first decoder block for every sample "
            f"({filled} of {input_ids.shape[0]}); its blocks cannot be calibrated layer by layer."
        )
    return LayerCall(hidden, call["args"], call["kwargs"])


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """One CPU thread for the per-module pruning step (restored afterwards).

    Its operations (a column update, a top-k over a row block) are too small to gain from threads, and on
    a busy CPU the threads' synchronisation made SparseGPT's column loop many times slower.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_block(block: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """Call a decoder block with the captured arguments; blocks may return a tensor or a tuple."""
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _InputCollector:
    """Forward pre-hooks feeding each target module's input to its statistics object.

    Modules called on the very same input tensor (q/k/v, gate/up) share one statistics object, since their
    input statistics are identical. After the first sample, once every target has seen its input the
    block's forward is stopped, skipping work no statistic needs. (A "sample" here is one block call, which
    may hold several calibration samples.) Inputs are recognised by weak references, so the collector keeps no
    activation alive past its use.
    """

    def __init__(self, targets: dict[str, nn.Module], make_stats: Callable[[int, torch.device], Any], device: torch.device):
        self.targets = targets
        self.make_stats = make_stats
        self.device = device
        self.stats: dict[str, Any] = {}
        self.first_sample = True
        self.calls: dict[str, int] = {}
        self.seen_inputs: dict[int, tuple[weakref.ref, str]] = {}
        self.early_stop = False
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in targets.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.first_sample:
                owner = self.seen_inputs.get(id(x))
                if owner is not None and owner[0]() is x and self.calls[name] == 1:
                    self.stats[name] = self.stats[owner[1]]  # same input tensor: share the statistics
                else:
                    self.stats.setdefault(name, self.make_stats(in_out_features(module)[0], self.device))
                    self.seen_inputs[id(x)] = (weakref.ref(x), name)
                    self.stats[name].add_batch(x)
            elif self.owner_of[name] == name:
                self.stats[name].add_batch(x)
            if self.early_stop and len(self.calls) == len(self.targets):
                raise _StopForward

        return hook

    def end_batch(self) -> None:
        if self.first_sample:
            self.first_sample = False
            self.seen_inputs.clear()
            self.owner_of = {name: next(n for n in self.stats if self.stats[n] is s) for name, s in self.stats.items()}
            self.early_stop = set(self.calls) == set(self.targets) and all(c == 1 for c in self.calls.values())
        self.calls = {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def block_targets(block: nn.Module, block_name: str, selected: Callable[[str], bool]) -> dict[str, nn.Module]:
    """Full name -> module of the selected linear-like layers inside one block, in module order."""
    return {
        f"{block_name}.{name}": module
        for name, module in block.named_modules()
        if name and is_linear_like(module) and selected(f"{block_name}.{name}")
    }


ACTIVATION_SHARE = 4  # a block call's widest activation is kept to 1/4 of the block's parameters


def batch_size_for(seqlen: int, tokens_per_call: int = 4096, block: nn.Module | None = None) -> int:
    """Samples per block call: about `tokens_per_call` tokens (8 x 512, 2 x 2048), never fewer than one sample.

    With `block`, fewer when its activations are large against its weights: a call's widest activation (tokens x
    the widest input or output of its linear layers) is kept to a quarter of the block's parameters, since a call
    holds about four such activations at once (an MLP's gate, up, activation and product). A call then needs
    about one block's weights of memory on top of the block, whatever the width: LLaMA-7B's blocks keep 4096
    tokens, a block of hidden size 1024 and MLP width 2048 gets 1024 (a 4096-token call of it took about five
    times the block's 36 MB). The same batches in memory and streamed keep the two bit for bit equal.
    """
    if block is not None:
        widths = [max(in_out_features(m)) for m in block.modules() if is_linear_like(m)]
        params = sum(p.numel() for p in block.parameters())
        if widths and params:
            tokens_per_call = min(tokens_per_call, params // (ACTIVATION_SHARE * max(widths)))
    return max(1, tokens_per_call // max(seqlen, 1))


@torch.no_grad()
def batching_works(block: nn.Module, hidden: torch.Tensor, call: LayerCall, batch_size: int) -> bool:
    """Whether calling the block on several samples with the (batch-1) captured arguments gives the per-sample result.

    Arguments captured for one sample (rotary tables, a (1, 1, L, L) mask) broadcast over a batch in the
    transformers models; this check keeps unknown architectures correct by falling back to one sample per call.
    """
    if batch_size <= 1 or hidden.shape[0] < 2:
        return False
    try:
        batched = run_block(block, hidden[: min(batch_size, hidden.shape[0])], call)[:1]
    except Exception:  # arguments that do not broadcast
        return False
    single = run_block(block, hidden[:1], call)
    return batched.shape == single.shape and torch.allclose(batched, single, rtol=1e-3, atol=1e-5 * single.abs().max().item())


@dataclass
class BlockInputs:
    """What every block of a sequential calibration shares: the captured call, the current block's inputs (the
    model's dtype; `advance` overwrites them with its outputs), the sample batches of one block call, the device."""

    call: LayerCall
    inps: torch.Tensor  # (nsamples, seqlen, hidden)
    batches: list[slice]
    device: torch.device


@torch.no_grad()
def start_sequential(
    model: nn.Module,
    first_block: nn.Module,
    input_ids: torch.Tensor,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> BlockInputs:
    """Capture the first block's inputs and choose the batches every block is called on (`capture_layer_inputs`
    then `calibration_batches`). `first_block` must hold its weights; the rest of the model only what runs before
    it."""
    work_device = torch.device(device) if device is not None else module_device(first_block)
    call = capture_layer_inputs(model, first_block, input_ids, work_device)
    return calibration_batches(first_block, call, work_device, batch_size)


@torch.no_grad()
def calibration_batches(
    first_block: nn.Module, call: LayerCall, device: torch.device, batch_size: int | None = None
) -> BlockInputs:
    """The calibration state for the captured inputs `call`: the batches every block is called on.

    Blocks are called on `batch_size` samples at a time (default: `batch_size_for` the first block: about 4096
    tokens per call, fewer for blocks narrow against their activations) when that reproduces the per-sample
    outputs on the first block (still unpruned: checked before any weight changes), else on one sample at a
    time. Only `first_block` needs its weights (the streamed prune has released the embeddings by now).
    """
    nsamples = call.hidden.shape[0]
    batch_size = batch_size_for(call.hidden.shape[1], block=first_block) if batch_size is None else batch_size
    home = module_device(first_block)
    first_block.to(device)
    if not batching_works(first_block, call.hidden, call, batch_size):
        batch_size = 1
    first_block.to(home)
    batches = [slice(j, min(j + batch_size, nsamples)) for j in range(0, nsamples, batch_size)]
    return BlockInputs(call, call.hidden, batches, device)


@torch.no_grad()
def prune_block(
    block: nn.Module,
    block_name: str,
    state: BlockInputs,
    selected: Callable[[str], bool],
    make_stats: Callable[[int, torch.device], Any],
    prune_module: Callable[[str, torch.Tensor, Any], None],
) -> None:
    """Collect the input statistics of the block's selected linear layers on `state.inps` and prune them in place
    (the one per-block step of every sequential path, in memory or streamed). The block is on `state.device`."""
    targets = block_targets(block, block_name, selected)
    if not targets:
        return
    collector = _InputCollector(targets, make_stats, state.device)
    try:
        for batch in state.batches:
            try:
                run_block(block, state.inps[batch], state.call)
            except _StopForward:
                pass
            collector.end_batch()
    finally:
        collector.remove()
    missing = [name for name in targets if name not in collector.stats]
    if missing:
        raise RuntimeError(f"{missing} were never called in their block's forward, so they cannot be calibrated.")
    stats = collector.stats
    with single_threaded(state.device):
        for name, module in targets.items():
            prune_module(name, dense_weight(module), stats.pop(name))  # statistics go with the last module sharing them


@torch.no_grad()
def advance(block: nn.Module, state: BlockInputs) -> None:
    """Run the (pruned) block on its inputs; its outputs become the next block's inputs, written over them batch by
    batch (a batch's outputs depend on its own inputs only), so no second buffer of activations is needed."""
    for batch in state.batches:
        state.inps[batch] = run_block(block, state.inps[batch], state.call)


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    layers_name: str,
    layers: nn.ModuleList,
    input_ids: torch.Tensor,
    selected: Callable[[str], bool],
    make_stats: Callable[[int, torch.device], Any],
    prune_module: Callable[[str, torch.Tensor, Any], None],
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "pruning",
    batch_size: int | None = None,
) -> None:
    """Prune every selected linear layer block by block, each block seeing the outputs of the pruned ones before it.

    `make_stats(in_features, device)` makes a statistics object with `add_batch(x)`; `prune_module(name,
    weight, stats)` prunes a dense (out, in) weight (a view that writes through) in place. Batches as in
    `start_sequential`.
    """
    state = start_sequential(model, layers[0], input_ids, device, batch_size)
    for index, block in enumerate(tqdm(layers, desc=desc, unit="layer", disable=not progress)):
        home = module_device(block)
        block.to(state.device)
        prune_block(block, block_name(layers_name, index), state, selected, make_stats, prune_module)
        if index + 1 < len(layers):
            advance(block, state)
        block.to(home)


def block_name(layers_name: str, index: int) -> str:
    """The full module name of decoder block `index` (e.g. "model.layers.3")."""
    return f"{layers_name}.{index}" if layers_name else str(index)
