"""The evaluation record: the one schema `spp-hf eval --out` and the pipeline's eval/<name>.json are written
in (built by `spp_hf.pipeline.evaluation.evaluation_record`), read back here, old pipeline records included;
and the gap-closed measure the report ranks methods by."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WIKITEXT2 = "wikitext2"  # the perplexity key of WikiText-2 raw test

_OWN_KEYS = ("model", "perplexity", "zero_shot", "zero_shot_mean_acc", "zero_shot_limit", "seconds")


@dataclass
class EvalRecord:
    """One model's measurements. As JSON: {"model", <about...>, "perplexity": {text: {...}}, "zero_shot": {task:
    {...}}, "zero_shot_mean_acc", "zero_shot_limit", "seconds"}; "perplexity" and the zero-shot keys only when
    measured."""

    model: str  # the folder, repo id or model class evaluated
    about: dict[str, Any] = field(default_factory=dict)  # how it was loaded, what it is: kind, class, sparsity, variant, ...
    # text ("wikitext2" first when measured, then held-out corpora) -> {ppl, nll, seqlen, windows, tokens, total_tokens, source}
    perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)
    zero_shot: dict[str, dict[str, Any]] | None = None  # task -> {acc, acc_stderr, acc_norm, ..., n, num_fewshot}; None: not run
    zero_shot_limit: int | float | None = None
    seconds: float | None = None

    @property
    def zero_shot_mean_acc(self) -> float | None:
        accs = [s["acc"] for s in (self.zero_shot or {}).values() if s.get("acc") is not None]
        return sum(accs) / len(accs) if accs else None

    def perplexities(self) -> dict[str, float]:
        """{text: perplexity}, WikiText-2 first when it was evaluated."""
        return {text: found["ppl"] for text, found in self.perplexity.items()}

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model": self.model, **self.about}
        if self.perplexity:
            data["perplexity"] = self.perplexity
        if self.zero_shot is not None:
            data.update(zero_shot=self.zero_shot, zero_shot_mean_acc=self.zero_shot_mean_acc, zero_shot_limit=self.zero_shot_limit)
        data["seconds"] = self.seconds
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalRecord":
        """A record as `to_dict` wrote it, or as the pipeline wrote it before this schema ("path", "ppl", "heldout")."""
        if "model" not in data and "path" in data:
            return _from_pipeline_record(data)
        about = {k: v for k, v in data.items() if k not in _OWN_KEYS}
        return cls(data["model"], about, dict(data.get("perplexity", {})), data.get("zero_shot"),
                   data.get("zero_shot_limit"), data.get("seconds"))  # fmt: skip

    @classmethod
    def read(cls, path: str | os.PathLike) -> "EvalRecord":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _from_pipeline_record(data: dict[str, Any]) -> EvalRecord:
    """The record `spp-hf run` wrote before `spp-hf eval` and the pipeline shared one schema."""
    perplexity: dict[str, dict[str, Any]] = {}
    if "ppl" in data:
        perplexity[WIKITEXT2] = {"ppl": data["ppl"], "nll": data.get("nll"), "seqlen": data.get("ppl_seqlen"),
                                 "windows": data.get("ppl_windows"), "source": None}  # fmt: skip
    for name, found in data.get("heldout", {}).items():
        perplexity[name] = {"seqlen": data.get("ppl_seqlen"), **found, "source": name}
    about = {"kind": "checkpoint", "variant": data.get("variant")}
    return EvalRecord(data["path"], about, perplexity, data.get("zero_shot"))


def gap_closed(ppl_pruned: float, ppl_recovered: float, ppl_dense: float) -> float:
    """Share of the log-perplexity gap between pruned and dense that a recovery method closes."""
    return (math.log(ppl_pruned) - math.log(ppl_recovered)) / (math.log(ppl_pruned) - math.log(ppl_dense))
