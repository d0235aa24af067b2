"""`spp-hf eval`: WikiText-2 perplexity and zero-shot accuracy of a checkpoint or SPP adapter (logic in
`spp_hf.pipeline.evaluate_model`)."""

from __future__ import annotations

import argparse
import sys

import torch

from ..data.corpora import CORPORA
from ..pipeline.evaluate_model import evaluate_model


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `spp-hf eval MODEL_OR_ADAPTER ...`."""
    parser = subparsers.add_parser(
        "eval",
        help="WikiText-2 perplexity and zero-shot accuracy of a checkpoint or SPP adapter.",
        description="Evaluate a model folder / Hub repo id, or an SPP adapter (merged onto its pruned base).",
    )
    parser.add_argument("model", metavar="MODEL_OR_ADAPTER", help="checkpoint folder or repo id, or an SPP adapter folder or repo")
    parser.add_argument("--ppl-seqlen", type=int, default=None, help="perplexity window length (default: model context, at most 2048)")
    parser.add_argument("--ppl-windows", type=int, default=None, help="use only the first K windows (default: all)")
    parser.add_argument("--ppl-source", choices=("auto", "hub", "bundled"), default="auto", help="where WikiText-2 comes from")
    parser.add_argument("--heldout", nargs="*", default=[], choices=sorted(CORPORA),
                        help="also score perplexity on these bundled texts (e.g. wiki-validation c4-heldout)")  # fmt: skip
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    parser.add_argument("--tasks", nargs="+", default=["offline"],
                        help="lm-eval tasks or sets: offline (bundled subsets, default), paper, default, mmlu, none, or task names")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="at most N questions per task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="force the shots for every task (default: 0; 5 for mmlu)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="torch dtype to load the model in, or 'auto' (default float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else None, help="e.g. cuda, cpu (default: cuda when available)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    tasks = None if args.tasks == ["none"] else args.tasks
    try:
        evaluate_model(
            args.model, ppl=not args.no_ppl, ppl_seqlen=args.ppl_seqlen, ppl_windows=args.ppl_windows,
            ppl_source=args.ppl_source, heldout=args.heldout, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
            batch_size=args.batch_size, dtype=args.dtype, device=args.device, out=args.out,
        )  # fmt: skip
    except ValueError as err:
        print(f"spp-hf eval: {err}", file=sys.stderr)
        return 2
    return 0
