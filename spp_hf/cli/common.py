"""Arguments several command groups share."""

from __future__ import annotations

import argparse


def add_hub_args(parser: argparse.ArgumentParser, revision_help: str | None = None, private: bool = True) -> None:
    """--revision (when `revision_help`), --token and --private."""
    if revision_help:
        parser.add_argument("--revision", default=None, help=revision_help)
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    if private:
        parser.add_argument("--private", action="store_true", help="create the repo as private")
