"""`spp-hf prune`: prune a checkpoint into a pruned base (checkpoint + sparsity.json + card), optionally push it.

By default the checkpoint is streamed layer by layer (`pruning.streaming.prune_to_folder`): a model larger than
memory can be pruned, and a killed run resumes at the first unfinished layer. `--in-memory` loads it whole
(`pruning.prune` + `save_pruned`); both write the same folder, bit for bit.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..hub.transfer import push_folder
from ..pruning import PRUNING_METHODS, PruneReport, parse_sparsity, prune, save_pruned
from ..pruning.streaming import prune_to_folder
from ..storage import check_model_folder_target


def register_cli(subparsers: Any) -> None:
    """Add the `prune` sub-command to the `spp-hf` parser."""
    p = subparsers.add_parser(
        "prune",
        help="prune a model with magnitude, Wanda or SparseGPT and save it as a sparse base",
        description="Prune every linear layer of the decoder blocks (never embeddings or lm_head) and save a transformers "
        "checkpoint with exact zeros, sparsity.json and a model card. The checkpoint (safetensors) is streamed one decoder "
        "layer at a time, so it need not fit in memory; run the same command again to resume a killed run.",
    )
    p.add_argument("--model", required=True, help="model id on the Hub or local checkpoint folder")
    p.add_argument("--method", choices=PRUNING_METHODS, default="wanda")
    p.add_argument("--sparsity", default="0.5", help="fraction pruned per row (e.g. 0.5) or N:M (e.g. 2:4)")
    p.add_argument("--calib", default=None, help="calibration: local .jsonl/.json/.txt file or Hub dataset id (default: C4, needs internet)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modules", nargs="+", default=None, help="only these module names/suffixes (default: all linear layers in the decoder blocks)")
    p.add_argument("--device", default=None, help="run each decoder block on this device, e.g. cuda (default: where the model is)")
    p.add_argument("--dtype", default="float32", help="dtype to load the model in (default float32)")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening as a fraction of the mean Hessian diagonal")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier pruned base (other files in it are kept)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload the folder to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--revision", default=None, help="model revision to load")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole model instead of streaming it layer by layer (same output; needs memory for the model)")
    p.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    try:  # fail on a bad spec or an output folder spp-hf may not write before loading anything
        parse_sparsity(args.sparsity)
        check_model_folder_target(args.out, "pruned-base")
    except (ValueError, OSError) as err:
        raise SystemExit(f"spp-hf prune: {err}") from None
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SystemExit(f"--dtype {args.dtype!r} is not a torch dtype (e.g. float32, bfloat16).")
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    settings = dict(
        method=args.method, sparsity=args.sparsity, calibration=args.calib, tokenizer=tokenizer, nsamples=args.nsamples,
        seqlen=args.seqlen, seed=args.seed, modules=args.modules, device=args.device, blocksize=args.blocksize,
        percdamp=args.percdamp,
    )  # fmt: skip
    try:
        if args.in_memory:
            out, report = _prune_in_memory(args, dtype, tokenizer, settings)
        else:
            out = Path(args.out)
            report = prune_to_folder(args.model, out, dtype=dtype, revision=args.revision, **settings)
    except ValueError as err:  # bad input: nothing was saved
        raise SystemExit(f"spp-hf prune: {err}") from None
    print(f"{args.method} {report.sparsity}: {report.ratio:.2%} of {len(report.modules)} modules zero "
          f"({report.pattern or 'unstructured'}) in {report.seconds:.1f}s -> {out}")
    if args.push_to_hub:
        print(f"pushed to {push_folder(out, args.push_to_hub, private=args.private, commit_message='Upload pruned base with spp-hf')}")
    return 0


def _prune_in_memory(args: argparse.Namespace, dtype: torch.dtype, tokenizer: Any, settings: dict) -> tuple[Path, PruneReport]:
    """Load the whole model, prune it in place and save it (`--in-memory`)."""
    model = AutoModelForCausalLM.from_pretrained(args.model, revision=args.revision, dtype=dtype)
    report = prune(model, **settings)
    report.base_model = args.model
    return save_pruned(model, tokenizer, args.out, report), report
