"""The `spp-hf` command. Each subsystem registers its own sub-commands; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> it defines `register_cli(subparsers)`, adding sub-commands whose `func(args)` runs them
SUBCOMMAND_MODULES = ("spp_hf.pruning.cli", "spp_hf.hub_cli", "spp_hf.evaluation", "spp_hf.pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spp-hf", description="Prune, SPP-train, merge and evaluate sparse LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # that subsystem is not part of this build
                continue
            raise
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .cpu_memory import keep_freed_memory

    keep_freed_memory()  # CPU training and pruning reuse freed buffers instead of faulting them back in
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
