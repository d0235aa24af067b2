"""`spp-hf run`: prune → train every recovery method → merge → evaluate → report.

Every method (`spp_hf.pipeline.builtin_methods`: SPP, LoRA*, masked full fine-tuning, ...) trains on the same pruned
base with the same data, steps and evaluation, at one or more seeds. The settings are
`spp_hf.pipeline.config.PipelineConfig`; the stages (`spp_hf.pipeline.stages`) write the folders of
`spp_hf.pipeline.layout` and skip what is already there, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from pathlib import Path

from ..storage import atomic_write_text
from . import builtin_methods  # noqa: F401 - registers the shipped methods (SPP, masked LoRA, LoRA*, masked full FT)
from .config import PipelineConfig, check_data_separation
from .report import write_report
from .stages import resolve_model, stage_eval, stage_method, stage_prune
from .variants import variants

logger = logging.getLogger(__name__)


def run_pipeline(cfg: PipelineConfig, skip: set[str] | None = None) -> Path:
    """Run every stage not skipped (`skip` may name 'eval', methods, `methods:` entries or variants); returns report.md."""
    skip = skip or set()
    runs = [v for v in variants(cfg) if not {v.name, v.entry, v.method} & skip]
    check_data_separation(cfg)
    layout = cfg.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.config, json.dumps(dataclasses.asdict(cfg), indent=2))
    start = time.perf_counter()
    pruned = stage_prune(cfg)
    paths = {"dense": Path(resolve_model(cfg.model)), "pruned": pruned}
    for variant in runs:
        paths[variant.name] = stage_method(cfg, pruned, variant)
        gc.collect()
    results = stage_eval(cfg, paths) if "eval" not in skip else {}
    report = write_report(cfg, runs, results, time.perf_counter() - start)
    logger.warning("report: %s", report)
    return report
