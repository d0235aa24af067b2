"""Where a `spp-hf run` keeps what each stage writes: the one place that names the run folder's parts.

    runs/<name>/config.json                 the settings the run was started with
    runs/<name>/pruned/                     the pruned base (checkpoint + sparsity.json + card)
    runs/<name>/data/<corpus>.jsonl         the bundled calibration documents the pruning used
    runs/<name>/<entry>_s<seed>/train/      checkpoints, loss_history.json, metrics.json
    runs/<name>/<entry>_s<seed>/adapter/    the adapter (adapter methods: SPP, masked LoRA)
    runs/<name>/<entry>_s<seed>/merged/     the merged model, with the pruned base's exact zeros
    runs/<name>/eval/<name>.json            one evaluation record per model (`spp_hf.pipeline.results`)
    runs/<name>/report.md, <plot>.png       the report and its plots

The stages write through it, and `spp-hf publish` and the report read through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..storage import CONFIG_NAME, SPARSITY_NAME, is_sparse_peft_folder

_VARIANT_NAME = re.compile(r"^(?P<entry>.+)_s(?P<seed>\d+)$")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder; `root` is runs/<name>."""

    root: Path

    @staticmethod
    def variant_name(entry: str, seed: int) -> str:
        """The folder (and evaluation) name of a `methods:` entry trained at `seed`."""
        return f"{entry}_s{seed}"

    @staticmethod
    def entry_of(variant: str) -> str:
        """The `methods:` entry of a variant folder name (the name itself when it carries no seed)."""
        found = _VARIANT_NAME.match(variant)
        return found["entry"] if found else variant

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def pruned(self) -> Path:
        return self.root / "pruned"

    @property
    def pruned_done(self) -> Path:
        """The file the prune stage writes last: the pruned base is finished once it exists."""
        return self.pruned / SPARSITY_NAME

    @property
    def data(self) -> Path:
        return self.root / "data"

    def calibration_file(self, corpus: str) -> Path:
        return self.data / f"{corpus}.jsonl"

    def variant(self, variant: str) -> Path:
        """The folder of one trained variant (<entry>_s<seed>)."""
        return self.root / variant

    def train(self, variant: str) -> Path:
        return self.variant(variant) / "train"

    def loss_history(self, variant: str) -> Path:
        return self.train(variant) / "loss_history.json"

    def train_metrics(self, variant: str) -> Path:
        return self.train(variant) / "metrics.json"

    def adapter(self, variant: str) -> Path:
        return self.variant(variant) / "adapter"

    def merged(self, variant: str) -> Path:
        return self.variant(variant) / "merged"

    def has_adapter(self, variant: str) -> bool:
        return (self.adapter(variant) / CONFIG_NAME).is_file() or is_sparse_peft_folder(self.adapter(variant))

    def has_merged(self, variant: str) -> bool:
        """Whether the variant's merged model was saved (its config.json is written with the folder)."""
        return (self.merged(variant) / "config.json").is_file()

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_record(self, name: str) -> Path:
        """The evaluation record of a baseline ('dense', 'pruned') or a variant."""
        return self.eval / f"{name}.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def plot(self, name: str) -> Path:
        return self.root / f"{name}.png"

    def trained_variants(self) -> list[str]:
        """Variant folders holding an adapter or a merged model, sorted by name."""
        if not self.root.is_dir():
            return []
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and p != self.pruned)
        return [n for n in names if self.has_adapter(n) or self.has_merged(n)]
