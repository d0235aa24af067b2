"""`spp-hf push`, `spp-hf publish` and `spp-hf merge`: put adapters, pruned bases and merged models on the Hub."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..adapters.merging import merge_to_folder
from ..hub.publish import publish_run
from ..hub.transfer import describe_folder, is_adapter_folder, push_adapter_folder, push_folder
from .common import add_hub_args


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    push = subparsers.add_parser("push", help="upload a saved adapter, pruned base or merged model to the Hub")
    push.add_argument("folder", help="folder written by save_pretrained / spp-hf prune / spp-hf merge")
    push.add_argument("repo_id", help="namespace/name of the Hub repo (created if missing)")
    push.add_argument("--base", default=None, metavar="ORG/NAME[@REV]",
                      help="adapters (SPP, masked LoRA, sparse PEFT) only: the pruned base on the Hub to key the adapter to (required when it was "
                           "trained on a local folder); its zeros are checked and its commit pinned")  # fmt: skip
    add_hub_args(push, revision_help="branch to push to (created from main if missing)")
    push.add_argument("--commit-message", default=None)
    push.set_defaults(func=_run_push)

    publish = subparsers.add_parser("publish", help="push a whole `spp-hf run` folder: base, adapter, merged models")
    publish.add_argument("run_dir", metavar="RUN_DIR", help="folder of a finished run, e.g. runs/default")
    publish.add_argument("repo_id", metavar="ORG/NAME", help="repo of the pruned base; the others get -spp, -spp-merged, ...")
    publish.add_argument("--merged", action=argparse.BooleanOptionalAction, default=True,
                         help="also push the merged models (default: yes)")  # fmt: skip
    publish.add_argument("--dense-model", default=None, help="Hub id of the model that was pruned, for the base's card")
    add_hub_args(publish)
    publish.set_defaults(func=_run_publish)

    merge = subparsers.add_parser(
        "merge", help="merge an adapter (SPP, masked LoRA, sparse PEFT) into its pruned base (zeros kept) and save it",
        description="Merge an adapter into its pruned base, one decoder layer at a time (the merged model need not fit in "
        "memory; run the same command again to resume a killed merge), and save a plain transformers checkpoint.",
    )  # fmt: skip
    merge.add_argument("adapter", help="adapter folder or Hub repo id")
    merge.add_argument("--out", required=True, help="folder for the merged model: new, empty, or an earlier merged model")
    merge.add_argument("--base", default=None, help="pruned base to merge into (default: the one the adapter names)")
    merge.add_argument("--base-revision", default=None, help="revision of --base (default: the adapter's pinned one)")
    merge.add_argument("--dtype", default=None, help="torch dtype of the base, e.g. float32, bfloat16 (default: as saved)")
    merge.add_argument("--eval-results", default=None, help="JSON file {data: {metric: value}} for the card's model-index")
    merge.add_argument("--dataset", default=None, help="dataset the adapter was trained on (for the card)")
    merge.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the merged folder to this repo")
    merge.add_argument("--in-memory", action="store_true",
                       help="load the whole base instead of merging it decoder layer by layer (same output; needs memory for the model)")
    add_hub_args(merge, revision_help="revision of the adapter repo")
    merge.set_defaults(func=_run_merge)


def _run_push(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    kind = describe_folder(folder)
    if not (folder / "README.md").is_file():
        print(f"warning: {folder} has no README.md; the repo will have no model card.", file=sys.stderr)
    if is_adapter_folder(folder):
        commit = push_adapter_folder(folder, args.repo_id, base=args.base, private=args.private, revision=args.revision,
                                     commit_message=args.commit_message, token=args.token)  # fmt: skip
    elif args.base:
        raise SystemExit(f"spp-hf push: --base applies to adapters only; {folder} holds a {kind}.")
    else:
        commit = push_folder(folder, args.repo_id, private=args.private, revision=args.revision,
                             commit_message=args.commit_message, token=args.token)  # fmt: skip
    print(f"pushed {kind} {folder} -> {args.repo_id}: {commit}")
    return 0


def _run_publish(args: argparse.Namespace) -> int:
    for repo in publish_run(args.run_dir, args.repo_id, merged=args.merged, private=args.private, token=args.token,
                            dense_model=args.dense_model):  # fmt: skip
        print(f"pushed {repo.role} {repo.folder} -> {repo.repo_id} @ {repo.commit[:12]}")
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    eval_results = json.loads(Path(args.eval_results).read_text()) if args.eval_results else None
    out = merge_to_folder(
        args.adapter, args.out, base_model=args.base, base_revision=args.base_revision, revision=args.revision,
        token=args.token, torch_dtype=args.dtype, eval_results=eval_results, dataset_name=args.dataset,
        push_to_hub=args.push_to_hub, private=args.private, in_memory=args.in_memory,
    )  # fmt: skip
    print(f"merged {args.adapter} -> {out}" + (f" (pushed to {args.push_to_hub})" if args.push_to_hub else ""))
    return 0
