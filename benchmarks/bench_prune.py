"""Wall time and peak memory of magnitude / Wanda / SparseGPT on SmolLM2-135M, and (with --ppl) the quality table.

Each method runs in its own process so peak memory is its own. Memory is the process's resident set
(sampled every 50 ms by a thread, plus getrusage's max RSS); "over model" subtracts the RSS right after
loading the model (and paging its weights in). As a floor for the layer-by-layer methods the script also times one plain forward pass
of the decoder blocks over the same calibration tokens (Wanda needs about two such passes, SparseGPT about
two plus its Hessian products and OBS updates).

    python benchmarks/bench_prune.py                          # timing table, 128 x 512 calibration tokens
    python benchmarks/bench_prune.py --nsamples 16 --seqlen 256   # a quick run
    python benchmarks/bench_prune.py --ppl                    # + WikiText-2 perplexity: dense and every
                                                              #   method x {50%, 2:4, 4:8}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "spp_hf" / "data" / "calib" / "c4_demo.jsonl"
METHODS = ("magnitude", "wanda", "sparsegpt")


class PeakRSS:
    """Samples this process's RSS in a background thread; `.peak` is the highest seen."""

    def __init__(self, interval: float = 0.05):
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spp_hf.data.default_model import smollm2_path

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def wikitext2_ppl(model, tok, args: argparse.Namespace) -> float:
    """spp-hf's WikiText-2 perplexity (bundled test split, SparseGPT protocol) on the first windows."""
    from spp_hf.pipeline.evaluation import perplexity

    return perplexity(model, tok, seqlen=args.ppl_seqlen, max_windows=args.ppl_windows)


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process: prune (or the forward floor) and report time and memory."""
    from spp_hf.pruning import load_calibration, prune

    from spp_hf.pruning.sequential import batch_size_for

    model, tok = load_smollm2()
    model.config.use_cache = False
    with torch.no_grad():  # page the (memory-mapped) weights in, so neither time nor memory counts loading
        sum(float(p.sum()) for p in model.parameters())
        model(torch.zeros(1, 8, dtype=torch.long))
    base_rss = psutil.Process().memory_info().rss
    result: dict = {"method": args.worker, "sparsity": args.sparsity, "threads": torch.get_num_threads()}
    if args.worker == "forward":
        calib = load_calibration(CALIB, tok, args.nsamples, args.seqlen, seed=0)
        with PeakRSS() as rss:
            start = time.perf_counter()
            with torch.no_grad():  # the same number of samples per call as prune() uses
                for batch in calib.input_ids.split(batch_size_for(args.seqlen, block=model.model.layers[0])):
                    model.model(batch)
            result["seconds"] = time.perf_counter() - start
    else:
        with PeakRSS() as rss:
            report = prune(model, args.worker, args.sparsity, calibration=CALIB, tokenizer=tok,
                           nsamples=args.nsamples, seqlen=args.seqlen, progress=False)  # fmt: skip
        result["seconds"] = report.seconds
        result["ratio"] = report.ratio
        if args.ppl:
            result["ppl"] = wikitext2_ppl(model, tok, args)
    result["load_avg_1m"] = os.getloadavg()[0]  # other processes on the machine skew the timings
    result["peak_rss_mb"] = max(rss.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    result["over_model_mb"] = (rss.peak - base_rss) / 2**20
    return result


def run_worker(name: str, sparsity: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--sparsity", sparsity, "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--ppl-seqlen", str(args.ppl_seqlen), "--ppl-windows", str(args.ppl_windows)]  # fmt: skip
    if args.ppl:
        cmd.append("--ppl")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{name} {sparsity} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_ppl(args: argparse.Namespace) -> float:
    return wikitext2_ppl(*load_smollm2(), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--sparsity", default="0.5", help="sparsity of the timing run (default 0.5)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ppl", action="store_true", help="also WikiText-2 perplexity for 50%%, 2:4 and 4:8")
    parser.add_argument("--ppl-seqlen", type=int, default=1024)
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    sparsities = ["0.5", "2:4", "4:8"] if args.ppl else [args.sparsity]
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, calibration {args.nsamples} x {args.seqlen} tokens "
          f"of {CALIB.name}" + (f"; WikiText-2 ppl over {args.ppl_windows} x {args.ppl_seqlen} tokens" if args.ppl else ""))
    rows = [run_worker("forward", args.sparsity, args)]
    floor = rows[0]["seconds"]
    if args.ppl:
        rows[0]["ppl"] = dense_ppl(args)
    print(f"{'method':<12} {'sparsity':>8} {'seconds':>9} {'x forward':>10} {'peak RSS MB':>12} {'over model MB':>14} {'load':>5}" + (f" {'ppl':>9}" if args.ppl else ""))

    def show(row: dict) -> None:
        name = "dense fwd" if row["method"] == "forward" else row["method"]
        sp = "-" if row["method"] == "forward" else row["sparsity"]
        line = f"{name:<12} {sp:>8} {row['seconds']:>9.1f} {row['seconds'] / floor:>10.2f} {row['peak_rss_mb']:>12.0f} {row['over_model_mb']:>14.0f} {row['load_avg_1m']:>5.1f}"
        print(line + (f" {row['ppl']:>9.2f}" if args.ppl else ""), flush=True)

    show(rows[0])
    for sparsity in sparsities:
        for method in args.methods:
            rows.append(run_worker(method, sparsity, args))
            show(rows[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
