"""Seconds per step and peak memory of SFT on SmolLM2-135M: SPP (naive / blocked / fused), PEFT LoRA
r=8, and full fine-tuning with the pruning mask re-applied after every optimizer step.

Every method runs the same SFT (TRL's SFTTrainer, or SPPSFTTrainer for SPP) on the same batches
(the bundled Alpaca sample packed into rows of exactly `--seq` tokens, same seed and order), on the
same targets (q/k/v/o/gate/up/down of SmolLM2 pruned 2:4 by magnitude), fp32, AdamW, no gradient
checkpointing, once per dropout in `--dropout` (default: 0, the SPPConfig and LoraConfig default, and
0.05, the paper's; with dropout the SPP branch sees other inputs than the base, which costs two more
weight-sized GEMMs per layer: five instead of three). Full fine-tuning trains those same target weights (embeddings and norms
stay frozen) and multiplies them by their masks after each step.

Each method runs in a fresh process, so peak memory is comparable: a thread samples the process's
resident set size (RSS) every 5 ms from the first to the last training step. The first `--warmup`
steps are not timed. Ratios are against LoRA (targets: SPP ≤ 1.3× LoRA time, ≤ 1.1× LoRA peak memory).

    python benchmarks/bench_train.py                      # 2 warm-up + 5 timed steps of 4 × 256 tokens, dropout 0 and 0.05
    python benchmarks/bench_train.py --steps 2 --warmup 1 --seq 64 --methods spp-fused lora   # smoke run
    python benchmarks/bench_train.py --methods spp-fused lora --dropout 0 --malloc glibc keep  # spp_hf.training.cpu_allocator
    python benchmarks/bench_train.py --methods spp-fused spp-fused-kd spp-fused-kd-feat --dropout 0   # distillation's cost

`spp-fused-kd` distils from the dense SmolLM2 (logit KL only, `distill_weight=1.0`), `spp-fused-kd-feat` adds
SquareHead's feature loss (`feature_weight=1.0`); their "time / no distillation" column is against `spp-fused`
(target: at most 1.35x).

`--malloc keep` (the default, what the `spp-hf` CLI does) calls `spp_hf.training.cpu_allocator.keep_freed_memory()`
in the worker; `glibc` leaves glibc's defaults. With both, the table adds each method's time and peak
memory against its own `glibc` run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

METHODS = ("spp-naive", "spp-blocked", "spp-fused", "lora", "full-masked", "spp-fused-kd", "spp-fused-kd-feat")
DISTILLED = {"spp-fused-kd": (1.0, 0.0), "spp-fused-kd-feat": (1.0, 1.0)}  # (distill_weight, feature_weight)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROOT = Path(__file__).resolve().parents[1]


class RSSSampler:
    """Peak resident set size of this process, sampled by a background thread while running."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def start(self) -> "RSSSampler":
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
        return self.peak


def pruned_smollm2():
    """SmolLM2-135M with every target weight pruned 2:4 by magnitude, and its masks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spp_hf.data.default_model import smollm2_path

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                w = module.weight
                groups = w.view(w.shape[0], -1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
                w.mul_(keep.view_as(w))
                masks[name] = keep.view_as(w)
    return model, AutoTokenizer.from_pretrained(path), masks


def run_worker(method: str, steps: int, warmup: int, batch: int, seq: int, dropout: float, out: Path) -> None:
    import torch
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from spp_hf import SPPConfig, SPPSFTTrainer
    from spp_hf.training.trainer import SPPSFTConfig

    model, tokenizer, masks = pruned_smollm2()
    data = load_dataset("json", data_files=str(ROOT / "spp_hf/data/alpaca/alpaca_sample_500.json"), split="train")
    data = data.map(lambda r: {"text": f"{r['instruction']}\n{r['input']}\n{r['output']}"}, remove_columns=data.column_names)
    args = SPPSFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-train-"), max_steps=warmup + steps, per_device_train_batch_size=batch,
        max_length=seq, packing=True, packing_strategy="wrapped", learning_rate=1e-4, logging_steps=1000,
        save_strategy="no", report_to="none", gradient_checkpointing=False, disable_tqdm=True, seed=0, bf16=False,
        dataloader_num_workers=0,
    )  # fmt: skip

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.sampler: RSSSampler | None = None

        def on_train_begin(self, *a, **k):
            self.sampler = RSSSampler().start()

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t)

    class ReapplyMask(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                for name, mask in masks.items():
                    model.get_submodule(name).weight.mul_(mask)

    timer = Timer()
    common = dict(args=args, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    if method.startswith("spp-"):
        spp = SPPConfig(r=16, scale=2.0, dropout=dropout, target_modules=TARGETS, impl=method.split("-")[1])
        if method in DISTILLED:
            from transformers import AutoModelForCausalLM

            from spp_hf.data.default_model import smollm2_path

            weight, feature = DISTILLED[method]
            teacher = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
            common.update(teacher_model=teacher, distill_weight=weight, feature_weight=feature)
        trainer = SPPSFTTrainer(model, spp_config=spp, **common)
    elif method == "lora":
        from peft import LoraConfig

        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
        trainer = SFTTrainer(model, peft_config=lora, **common)
    elif method == "full-masked":
        for name, param in model.named_parameters():
            param.requires_grad_(name.rsplit(".", 2)[-2] in TARGETS)
        common["callbacks"].append(ReapplyMask())
        trainer = SFTTrainer(model, **common)
    else:
        raise ValueError(method)
    before = RSSSampler().start().stop()
    trainer.train()
    peak = timer.sampler.stop()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if method == "full-masked":  # the mask really was kept
        assert all(bool((trainer.model.get_submodule(n).weight[~m] == 0).all()) for n, m in masks.items())
    timed = timer.times[warmup:]
    out.write_text(json.dumps({
        "method": method, "trainable": trainable, "step_s": statistics.median(timed), "step_s_all": timed,
        "rss_before_mb": before / 2**20, "rss_peak_mb": peak / 2**20, "threads": torch.get_num_threads(),
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05], help="SPP and LoRA dropout(s) (paper: 0.05)")
    parser.add_argument("--malloc", nargs="+", default=["keep"], choices=["glibc", "keep"],
                        help="keep: keep_freed_memory() in the worker (as the CLI); glibc: the defaults")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.malloc[0] == "keep":
            from spp_hf.training.cpu_allocator import keep_freed_memory

            keep_freed_memory()
        run_worker(args.worker, args.steps, args.warmup, args.batch, args.seq, args.dropout[0], args.out)
        return

    env = dict(os.environ, HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dropout in args.dropout:
            for method in args.methods:
                for malloc in args.malloc:
                    out = Path(tmp) / f"{method}-{dropout}-{malloc}.json"
                    cmd = [sys.executable, __file__, "--worker", method, "--out", str(out), "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
                           "--dropout", str(dropout), "--malloc", malloc]  # fmt: skip
                    print(f"running {method}, dropout {dropout}, malloc {malloc} ...", file=sys.stderr, flush=True)
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"{method} failed:\n{proc.stderr[-4000:]}")
                    results.append(dict(json.loads(out.read_text()), dropout=dropout, malloc=malloc))
    for dropout in args.dropout:
        print(table([r for r in results if r["dropout"] == dropout], args, dropout) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def table(results: list[dict], args: argparse.Namespace, dropout: float) -> str:
    lora = next((r for r in results if r["method"] == "lora" and r["malloc"] == args.malloc[0]), None)
    plain = next((r for r in results if r["method"] == "spp-fused" and r["malloc"] == args.malloc[0]), None)
    glibc = {r["method"]: r for r in results if r["malloc"] == "glibc"}
    lines = [
        f"SFT on SmolLM2-135M (2:4 magnitude-pruned), batch {args.batch} x {args.seq} tokens, dropout {dropout}, fp32, "
        f"{results[0]['threads']} threads; median of {args.steps} steps after {args.warmup} warm-up; one process per method",
        "",
        "| method | malloc | trainable params | s/step | peak RSS (MB) | RSS before training (MB) | time / LoRA | "
        "peak mem / LoRA | time / glibc | peak mem / glibc | time / no distillation |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratios = []
        for ref in (lora if r["malloc"] == args.malloc[0] else None, glibc.get(r["method"])):
            ratios += [f"{r['step_s'] / ref['step_s']:.2f}x", f"{r['rss_peak_mb'] / ref['rss_peak_mb']:.2f}x"] if ref else ["-", "-"]
        distilled = r["method"] in DISTILLED and plain is not None and r["malloc"] == args.malloc[0]
        ratios.append(f"{r['step_s'] / plain['step_s']:.2f}x" if distilled else "-")
        lines.append(
            f"| {r['method']} | {r['malloc']} | {r['trainable']:,} | {r['step_s']:.2f} | {r['rss_peak_mb']:.0f} | "
            f"{r['rss_before_mb']:.0f} | " + " | ".join(ratios) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
