"""Zero masks, N:M detection, the mask fingerprint that keys an adapter to its base, `sparsity_report`, and
`model_sparsity_record` (the sparsity.json of a model folder)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .layer_weights import dense_weight, is_linear_like
from .storage import MODEL_KINDS, SPARSITY_FORMAT_VERSION

NM_CANDIDATE_M = (2, 4, 8, 16, 32)
PRUNING_METHODS = ("magnitude", "wanda", "sparsegpt")  # what `spp_hf.pruning.prune` runs and a sparsity.json names


def zero_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask of exact zeros of a (out, in) weight."""
    return weight == 0


def detect_nm(weight: torch.Tensor) -> str | None:
    """Return "N:M" if every group of M consecutive inputs of each row has at most N non-zeros.

    The smallest M whose pattern explains the layer's density is chosen, so a 2:8 layer is not
    reported as 2:4 (its density 0.25 is below 2/4).
    """
    out_f, in_f = weight.shape
    nonzero = weight != 0
    density = nonzero.float().mean().item()
    for m in NM_CANDIDATE_M:
        if in_f % m:
            continue
        n = int(nonzero.reshape(out_f, in_f // m, m).sum(-1).max().item())
        if n < m and density >= n / m - 0.01:
            return f"{n}:{m}"
    return None


def mask_hash(mask: torch.Tensor) -> str:
    """sha256 over the packed bits of a boolean mask (row-major)."""
    packed = np.packbits(mask.detach().cpu().contiguous().numpy().reshape(-1))
    return hashlib.sha256(packed.tobytes()).hexdigest()


def fingerprint_modules(named_weights: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """Mask fingerprint: per module shape, zero count and mask hash, plus one hash over all masks."""
    total = hashlib.sha256()
    modules = {}
    for name, weight in named_weights:
        mask = zero_mask(weight)
        h = mask_hash(mask)
        total.update(name.encode())
        total.update(bytes.fromhex(h))
        modules[name] = {"shape": list(weight.shape), "zeros": int(mask.sum().item()), "hash": h[:16]}
    return {"hash": total.hexdigest(), "modules": modules}


def zero_mask_differences(reference: dict, found: dict) -> list[str]:
    """Every module of `reference` whose zero mask differs in `found` (both `fingerprint_modules` outputs).

    One line per differing module: missing, another shape, or another mask (zero counts given). Modules
    `found` has beyond `reference` are not differences: a model may carry layers an adapter never touched.
    An empty list means the model has exactly the reference's zeros.
    """
    problems = []
    found_modules = found.get("modules", {})
    for name, ref in reference.get("modules", {}).items():
        got = found_modules.get(name)
        if got is None:
            problems.append(f"{name}: missing")
        elif list(got["shape"]) != list(ref["shape"]):
            problems.append(f"{name}: shape {list(got['shape'])} != {list(ref['shape'])}")
        elif got["hash"] != ref["hash"] or got["zeros"] != ref["zeros"]:
            problems.append(f"{name}: zero mask differs ({got['zeros']} zeros, expected {ref['zeros']})")
    return problems


@dataclass
class LayerSparsity:
    """Sparsity of one linear layer's weight."""

    name: str
    shape: tuple[int, int]
    zeros: int
    numel: int
    ratio: float
    pattern: str | None


@dataclass
class SparsityReport:
    """Per-layer sparsity of a model; `str()` gives a table, `to_dict()` JSON-able data."""

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def ratio(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def pattern(self) -> str | None:
        """The N:M pattern shared by every layer, else None."""
        patterns = {layer.pattern for layer in self.layers}
        return patterns.pop() if len(patterns) == 1 else None

    def to_dict(self) -> dict:
        return {
            "ratio": self.ratio,
            "zeros": self.zeros,
            "numel": self.numel,
            "pattern": self.pattern,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        lines = [f"{'layer':<48} {'shape':>12} {'zeros':>10} {'ratio':>7} {'N:M':>6}"]
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape))
            lines.append(
                f"{layer.name:<48} {shape:>12} {layer.zeros:>10} {layer.ratio:>7.4f} {layer.pattern or '-':>6}"
            )
        lines.append(f"{'total':<48} {'':>12} {self.zeros:>10} {self.ratio:>7.4f} {self.pattern or '-':>6}")
        return "\n".join(lines)


def iter_linear_weights(model: nn.Module, include_lm_head: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, dense (out, in) weight) for each linear-like layer; adapter wrappers (a module holding the
    linear layer as `base_layer`, as spp-hf's and PEFT's layers do) report their base under their own name."""
    skip = set()
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if is_linear_like(getattr(module, "base_layer", None)):
            skip.add(name)
            yield name, dense_weight(module.base_layer)
        elif is_linear_like(module):
            if module is output_embeddings and not include_lm_head:
                continue
            yield name, dense_weight(module)


@torch.no_grad()
def sparsity_report(model: nn.Module, include_lm_head: bool = False) -> SparsityReport:
    """Per-layer shape, zero count, ratio and detected N:M pattern of every linear layer."""
    report = SparsityReport()
    for name, weight in iter_linear_weights(model, include_lm_head):
        zeros = int((weight == 0).sum().item())
        report.layers.append(
            LayerSparsity(name, tuple(weight.shape), zeros, weight.numel(), zeros / weight.numel(), detect_nm(weight))
        )
    return report


def model_fingerprint(model: nn.Module, modules: Iterable[str] | None = None) -> dict:
    """The mask fingerprint of a model's linear layers: every one but the output embedding, or the named
    `modules` (an adapter's targets). The one way spp-hf fingerprints the weights of a model in memory."""
    with torch.no_grad():
        if modules is None:
            return fingerprint_modules(iter_linear_weights(model))
        names = list(modules)
        missing = [name for name in names if not is_linear_like(_submodule(model, name))]
        if missing:
            raise ValueError(f"The model has no linear layers {missing[:3]}; pass names from iter_linear_weights.")
        return fingerprint_modules((name, dense_weight(model.get_submodule(name))) for name in names)


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def model_sparsity_record(
    model: torch.nn.Module,
    kind: str,
    modules: list[str] | None = None,
    base_mask_fingerprint: dict | None = None,
    **provenance: Any,
) -> dict[str, Any]:
    """The sparsity.json of a model folder: kind, per-layer report, mask fingerprint, provenance.

    `modules` limits the fingerprint to those layers (a pruned base records the layers it pruned);
    default every linear layer but the output embedding. With `base_mask_fingerprint`, the model must
    have exactly those zeros (`zero_mask_differences`), else ValueError and nothing is written.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    found = model_fingerprint(model, modules)
    with torch.no_grad():
        report = sparsity_report(model).to_dict()
    if base_mask_fingerprint:
        problems = zero_mask_differences(base_mask_fingerprint, found)
        if problems:
            raise ValueError(
                f"The {kind} model lost its base's zero mask in {len(problems)} layers ({'; '.join(problems[:3])}); "
                "nothing was written. Re-apply the base's mask before saving."
            )
    record: dict[str, Any] = {"format_version": SPARSITY_FORMAT_VERSION, "kind": kind, **report}
    record.update(provenance)
    record["mask_fingerprint"] = found
    if base_mask_fingerprint:
        record["base_mask_fingerprint"] = base_mask_fingerprint
    return record
