"""`prune(model, method, sparsity, calibration, ...)`: one call that checks its inputs, then prunes in place."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..sparsity import PRUNING_METHODS, SparsityReport, sparsity_report
from ..layer_weights import dense_weight, in_out_features, is_linear_like, is_quantized
from .calibration import load_calibration
from .magnitude import prune_magnitude_
from .masks import SparsitySpec, parse_sparsity
from .sequential import find_decoder_layers, module_device, run_sequential, single_threaded
from .sparsegpt import DEFAULT_BLOCKSIZE, DEFAULT_PERCDAMP, Hessian, sparsegpt_prune_
from .wanda import InputNorms, prune_wanda_



@dataclass
class PruneReport:
    """What `prune` did: method, sparsity, calibration, the pruned modules' sparsity stats and the time taken."""

    method: str
    sparsity: str
    calibration: str | None
    nsamples: int | None
    seqlen: int | None
    seed: int | None
    seconds: float
    modules: list[str]
    stats: SparsityReport
    base_model: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.stats.ratio

    @property
    def pattern(self) -> str | None:
        return self.stats.pattern

    def to_dict(self) -> dict:
        return {
            "base_model": self.base_model,
            "method": self.method,
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "ratio": self.ratio,
            "calibration": self.calibration,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
            "modules": self.modules,
            **self.extra,
            "layers": self.stats.to_dict()["layers"],
        }

    def __str__(self) -> str:
        head = f"{self.method} {self.sparsity} on {len(self.modules)} modules in {self.seconds:.1f}s"
        if self.calibration:
            head += f" (calibration: {self.calibration})"
        return f"{head}\n{self.stats}"


def select_modules(model: nn.Module, modules: Sequence[str] | str | None = None) -> list[tuple[str, nn.Module]]:
    """(full name, module) of the linear layers to prune: inside the decoder blocks only, never embeddings or lm_head.

    `modules` narrows the choice to names equal to, or ending in ".<entry>" of, one of its entries
    (e.g. ["q_proj", "mlp.down_proj"]).
    """
    layers_name, layers = find_decoder_layers(model)
    prefix = f"{layers_name}." if layers_name else ""
    found = [
        (f"{prefix}{i}.{name}", name, module)
        for i, block in enumerate(layers)
        for name, module in block.named_modules()
        if name and is_linear_like(module)
    ]
    if modules is None:
        return [(full, module) for full, _, module in found]
    wanted = [modules] if isinstance(modules, str) else list(modules)
    if not wanted:
        raise ValueError("modules=[] selects nothing to prune; pass None for all linear layers of the decoder blocks.")

    def match(name: str, entry: str) -> bool:
        return name == entry or name.endswith("." + entry)

    unmatched = [e for e in wanted if not any(match(full, e) for full, _, _ in found)]
    if unmatched:
        available = sorted({rel for _, rel, _ in found})
        raise ValueError(f"modules {unmatched} match no linear layer inside the decoder blocks; available: {available}.")
    return [(full, module) for full, _, module in found if any(match(full, e) for e in wanted)]


def _default_tokenizer(model: nn.Module) -> Any:
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source:
        raise ValueError("Calibration text needs a tokenizer and the model does not say where it came from: pass tokenizer=.")
    return AutoTokenizer.from_pretrained(source)


@contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """eval mode and no KV cache while calibrating; both restored afterwards."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    was_training = model.training
    if config is not None and use_cache is not None:
        config.use_cache = False
    model.eval()
    try:
        yield
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        model.train(was_training)


def _method_fns(method: str, spec: SparsitySpec, blocksize: int, percdamp: float) -> tuple[Callable, Callable]:
    if method == "wanda":
        return InputNorms, lambda name, weight, stats: prune_wanda_(weight, stats, spec)
    return Hessian, lambda name, weight, stats: sparsegpt_prune_(weight, stats, spec, blocksize, percdamp)


@torch.no_grad()
def prune(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | str = 0.5,
    calibration: str | os.PathLike | Any | None = None,
    tokenizer: Any | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    modules: Sequence[str] | str | None = None,
    device: torch.device | str | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    progress: bool = True,
    batch_size: int | None = None,
) -> PruneReport:
    """Prune `model` in place with magnitude, Wanda or SparseGPT to a ratio (0.5) or N:M pattern ("2:4").

    Wanda and SparseGPT calibrate layer by layer on `nsamples` windows of `seqlen` tokens from
    `calibration` (a local text/jsonl file, a `datasets.Dataset`, a Hub dataset id, a token-id tensor, or
    None for the C4 shard Wanda uses). Every input is checked before any weight changes. `device` moves
    one decoder block at a time there (e.g. "cuda") while the model stays where it is. `batch_size` is the
    number of calibration samples per block call (default: about 4096 tokens per call).
    """
    start = time.perf_counter()
    if method not in PRUNING_METHODS:
        raise ValueError(f"Unknown pruning method {method!r}; choose one of {list(PRUNING_METHODS)}.")
    spec = parse_sparsity(sparsity)
    if method == "sparsegpt" and (blocksize < 1 or not 0 <= percdamp < 1):
        raise ValueError(f"SparseGPT needs blocksize >= 1 and 0 <= percdamp < 1 (got {blocksize}, {percdamp}).")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size}).")
    targets = select_modules(model, modules)
    for name, module in targets:
        if is_quantized(module):
            raise ValueError(f"{name!r} is a quantized layer; load the model in full precision to prune it.")
        spec.check_in_features(name, in_out_features(module)[0])

    calib = None
    if method != "magnitude":
        if tokenizer is None and not isinstance(calibration, torch.Tensor):
            tokenizer = _default_tokenizer(model)
        calib = load_calibration(calibration, tokenizer, nsamples, seqlen, seed)
        vocab = model.get_input_embeddings().num_embeddings
        if int(calib.input_ids.max()) >= vocab or int(calib.input_ids.min()) < 0:
            raise ValueError(f"Calibration token ids fall outside the model's vocabulary of {vocab}: wrong tokenizer?")

    selected_names = {name for name, _ in targets}
    with _calibration_mode(model):
        if calib is None:
            with single_threaded(module_device(model)):
                for name, module in tqdm(targets, desc=f"magnitude {spec}", unit="module", disable=not progress):
                    prune_magnitude_(dense_weight(module), spec)
        else:
            layers_name, layers = find_decoder_layers(model)
            make_stats, prune_module = _method_fns(method, spec, blocksize, percdamp)
            run_sequential(
                model, layers_name, layers, calib.input_ids, selected_names.__contains__, make_stats, prune_module,
                device=device, progress=progress, desc=f"{method} {spec}", batch_size=batch_size,
            )

    with single_threaded(module_device(model)):
        full = sparsity_report(model)
    stats = SparsityReport([layer for layer in full.layers if layer.name in selected_names])
    return PruneReport(
        method=method,
        sparsity=str(spec),
        calibration=calib.description if calib else None,
        nsamples=nsamples if calib else None,
        seqlen=seqlen if calib else None,
        seed=seed if calib else None,
        seconds=time.perf_counter() - start,
        modules=[name for name, _ in targets],
        stats=stats,
        base_model=getattr(model, "name_or_path", None) or None,
        extra={"blocksize": blocksize, "percdamp": percdamp} if method == "sparsegpt" else {},
    )
