"""`spp-hf inspect`: show and verify an adapter, pruned base or merged model (logic in `spp_hf.hub.inspection`)."""

from __future__ import annotations

import argparse
import json

from ..hub.inspection import inspect_target
from .common import add_hub_args


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    inspect = subparsers.add_parser("inspect", help="show config, base, fingerprint and per-layer sparsity; verify zeros")
    inspect.add_argument("target", metavar="REPO_OR_DIR", help="adapter, pruned base or merged model (folder or repo id)")
    add_hub_args(inspect, revision_help="revision of the repo", private=False)
    inspect.add_argument("--json", action="store_true", help="print the result as JSON")
    inspect.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    result = inspect_target(args.target, revision=args.revision, token=args.token)
    print(json.dumps(result.to_dict(), indent=2, default=str) if args.json else result)
    return 0 if result.ok else 1
