"""`spp-hf run`: the whole pipeline, prune → train each recovery method → merge → evaluate → report
(logic in `spp_hf.pipeline`)."""

from __future__ import annotations

import argparse
import logging
import os

from ..pipeline.config import PipelineConfig, apply_overrides


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="prune → train each recovery method → merge → evaluate → report (default: SmolLM2-135M)")
    parser.add_argument("config", nargs="?", help="YAML pipeline config (default: the embedded SmolLM2 default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_steps=10")
    parser.add_argument("--skip", default="", help="comma-separated methods, variants or 'eval' to skip, e.g. lora_star,eval")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # The stages import TRL and PEFT, which are slow to import: only `spp-hf run` waits for them.
    from ..pipeline.run import run_pipeline

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if args.config:
        cfg = PipelineConfig.from_yaml(args.config, args.set)
    else:
        cfg = PipelineConfig.from_dict(apply_overrides({}, args.set))
    report = run_pipeline(cfg, {s for s in args.skip.split(",") if s})
    print(report.read_text())
    return 0
