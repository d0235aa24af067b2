"""Peak memory of `spp-hf prune` (streamed) against the size of the checkpoint it prunes (issue 26).

The check: a sharded 8-layer random Llama of about 400 MB (hidden 1024) pruned by the real CLI entry point
(`spp-hf prune`, streaming) must peak at less than half the checkpoint's size above a process that only imports
spp_hf.

Checkpoint (made once into --work, by a child process): LlamaForCausalLM, float32, random weights (seed 0),
hidden 1024, intermediate 2048, 8 decoder layers, 16 attention heads with 4 key/value heads (head dim 64), vocab
32000 with tied input/output embeddings (one 131 MB table; `--untied` adds a separate head: 547 MB), saved with
max_shard_size 100MB: 104.1 M parameters, 416 MB of safetensors in 4 shards, 35.6 MB per decoder layer. Its
tokenizer is a byte-level BPE trained on the bundled C4 sample (23.6k tokens: the corpus is too small for 32000),
so the CLI calibrates on real text: `--calib` the bundled `c4_demo.jsonl`, `--nsamples 8 --seqlen 512` (the
CLI's defaults, 128 x 2048, are 1 GiB of float32 hidden states by themselves: more than the checkpoint).

Each measurement is a fresh process whose peak resident set (ru_maxrss, from `os.wait4`) is read when it ends:

    import    `python -c "import spp_hf"`: the baseline
    wanda     `spp-hf prune --model CKPT --out OUT --method wanda --sparsity 2:4 --calib ... --nsamples 8 --seqlen 512`
    sparsegpt the same with --method sparsegpt

and the report is checkpoint MB, peak MB, peak above the import baseline, and that over the checkpoint's size
(the target: < 0.5). Peak memory does not depend on CPU load; the seconds printed are only for orientation.

    python benchmarks/bench_prune_memory.py                          # both methods
    python benchmarks/bench_prune_memory.py --methods wanda --check  # exit 1 if a ratio is >= 0.5
    python benchmarks/bench_prune_memory.py --trace                  # also the prune's RSS over time (every 0.1 s)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB, TIED = 1024, 2048, 8, 16, 4, 32000, True
SHARD = "100MB"
NSAMPLES, SEQLEN, SPARSITY = 8, 512, "2:4"
TARGET = 0.5
MB = 10**6


# --------------------------------------------------------------------------- the checkpoint (made once, in a child)
def make_checkpoint(folder: Path, tied: bool = TIED) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from spp_hf.data.corpora import C4_SAMPLE_FILE, read_jsonl

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                         tie_word_embeddings=tied, max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(0)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(staging, max_shard_size=SHARD)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [row["text"] for row in read_jsonl(C4_SAMPLE_FILE)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<|endoftext|>"], show_progress=False))  # fmt: skip
    assert bpe.get_vocab_size() <= VOCAB
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(staging)
    staging.rename(folder)


def checkpoint(work: Path, tied: bool = TIED) -> Path:
    folder = work / ("llama-8x1024-tied" if tied else "llama-8x1024-untied")
    if not (folder / "config.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--make", str(folder), *([] if tied else ["--untied"])], check=True, cwd=REPO)
    return folder


def checkpoint_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- measuring a fresh process
def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) * 1024 / MB
    except (OSError, StopIteration):
        return None


def peak(cmd: list[str], trace: bool = False) -> tuple[float, float, list[tuple[float, float]]]:
    """(peak RSS in MB, seconds, [(t, RSS MB)] when traced) of `cmd` run to its end; fails if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, float]] = []
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while True:  # os.wait4: this child's own rusage (ru_maxrss, KiB on Linux); Popen.poll/wait would reap it first
        done, status, usage = os.wait4(proc.pid, os.WNOHANG if trace else 0)
        if done == proc.pid:
            break
        if (value := rss_mb(proc.pid)) is not None:
            samples.append((time.perf_counter() - start, value))
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(output)[-3000:]}")
    return usage.ru_maxrss * 1024 / MB, time.perf_counter() - start, samples


def prune_cmd(ckpt: Path, out: Path, method: str, nsamples: int, seqlen: int) -> list[str]:
    from_venv = VENV_BIN / "spp-hf"
    entry = [str(from_venv)] if from_venv.is_file() else [sys.executable, "-c", "import sys; from spp_hf.cli import main; sys.exit(main())"]
    calib = REPO / "spp_hf" / "data" / "calib" / "c4_demo.jsonl"
    return [*entry, "prune", "--model", str(ckpt), "--out", str(out), "--method", method, "--sparsity", SPARSITY,
            "--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen)]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/spp-hf-bench-prune-memory"), help="checkpoint and outputs")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--nsamples", type=int, default=NSAMPLES)
    parser.add_argument("--seqlen", type=int, default=SEQLEN)
    parser.add_argument("--trace", action="store_true", help="print each prune's RSS over time")
    parser.add_argument("--check", action="store_true", help=f"exit 1 unless every ratio is < {TARGET}")
    parser.add_argument("--untied", action="store_true", help="a separate output head (the same layers: 547 MB)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_checkpoint(args.make, tied=not args.untied)
        return 0
    tied = not args.untied
    ckpt = checkpoint(args.work, tied)
    size = checkpoint_bytes(ckpt) / MB
    base, _, _ = peak([sys.executable, "-c", "import spp_hf"])
    print(f"checkpoint {ckpt}: {size:.0f} MB (hidden {HIDDEN}, intermediate {INTERMEDIATE}, {LAYERS} layers, "
          f"{HEADS}/{KV_HEADS} heads, vocab {VOCAB}, tied={tied}, float32, {SHARD} shards)")  # fmt: skip
    print(f"import spp_hf: peak {base:.0f} MB; calibration {args.nsamples} x {args.seqlen} tokens, sparsity {SPARSITY}")
    print(f"{'method':<10} {'peak MB':>8} {'above import MB':>16} {'/ checkpoint':>13} {'s (noisy)':>10}")
    results = {"checkpoint": ckpt.name, "checkpoint_mb": size, "import_mb": base, "nsamples": args.nsamples,
               "seqlen": args.seqlen, "methods": {}}  # fmt: skip
    for method in args.methods:
        out = args.work / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        for leftover in args.work.glob(f".out-{method}.spp-hf-*"):  # a killed earlier run's partial folder
            shutil.rmtree(leftover, ignore_errors=True)
        top, seconds, samples = peak(prune_cmd(ckpt, out, method, args.nsamples, args.seqlen), args.trace)
        ratio = (top - base) / size
        results["methods"][method] = {"peak_mb": top, "above_import_mb": top - base, "ratio": ratio}
        print(f"{method:<10} {top:>8.0f} {top - base:>16.0f} {ratio:>13.2f} {seconds:>10.1f}")
        if samples:
            print("  RSS over time (s: MB): " + ", ".join(f"{t:.1f}: {v:.0f}" for t, v in samples))
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    worst = max(r["ratio"] for r in results["methods"].values())
    print(f"worst ratio {worst:.2f} (target < {TARGET})")
    return 1 if args.check and worst >= TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
