"""The training runs a pipeline config asks for: each `methods:` entry (a registered method, or a named
variant of one with other settings) at each of its seeds, checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass

from .config import PipelineConfig, with_overrides
from .layout import RunLayout
from .methods import METHODS, get_method

BASELINES = ("dense", "pruned")  # the models every run evaluates besides its variants


@dataclass(frozen=True)
class Variant:
    """One training run of the comparison: a registered method at one seed, with its settings."""

    name: str  # folder and evaluation name: <entry>_s<seed>
    entry: str  # the `methods:` entry (a method or a variant name)
    method: str  # the registered method
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        base = get_method(self.method).label if self.entry == self.method else self.entry
        return f"{base} s{self.seed}"


def variants(cfg: PipelineConfig) -> list[Variant]:
    """Every (method, seed) run the config asks for, checked before anything runs."""
    entries = [cfg.methods] if isinstance(cfg.methods, str) else list(cfg.methods)
    unknown_seeds = sorted(set(cfg.method_seeds) - set(entries) - set(METHODS) - set(cfg.variants))
    if unknown_seeds:
        raise ValueError(f"method_seeds names {unknown_seeds}, neither a method {sorted(METHODS)} nor a variant {sorted(cfg.variants)}.")
    found = []
    for entry in entries:
        spec = cfg.variants.get(entry, {"method": entry})
        extra = sorted(set(spec) - {"method", "set"})
        if extra or "method" not in spec:
            raise ValueError(f"variants.{entry} needs 'method' (and optionally 'set': [key=value, ...]); got keys {sorted(spec)}.")
        get_method(spec["method"])
        overrides = tuple([spec["set"]] if isinstance(spec.get("set"), str) else spec.get("set", []))
        variant_config(cfg, overrides, 0)  # unknown settings fail now, not after pruning
        for seed in cfg.method_seeds.get(entry, cfg.seeds):
            found.append(Variant(RunLayout.variant_name(entry, int(seed)), entry, spec["method"], int(seed), overrides))
    names = [v.name for v in found]
    if len(set(names)) != len(names) or set(names) & set(BASELINES):
        raise ValueError(f"Variant names must be unique and not {BASELINES}; got {names}.")
    return found


def variant_config(cfg: PipelineConfig, overrides: tuple[str, ...], seed: int) -> PipelineConfig:
    """The settings one variant trains with: the run's, its `set:` overrides, and its seed."""
    return with_overrides(cfg, [*overrides, f"train.seed={seed}"])
