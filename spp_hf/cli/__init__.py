"""The `spp-hf` command: one module per command group registers its sub-commands; this file only dispatches."""

from __future__ import annotations

import argparse
import sys

from ..training.cpu_allocator import keep_freed_memory
from . import eval as evaluate
from . import hub, inspect, prune, run

# each has `register_cli(subparsers)`, adding sub-commands whose `func(args)` runs them
COMMAND_GROUPS = (prune, hub, inspect, evaluate, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spp-hf", description="Prune, SPP-train, merge, evaluate and publish sparse LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # CPU training and pruning reuse freed buffers instead of faulting them back in
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
