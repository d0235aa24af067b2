"""How spp-hf's stages scale with the size of a decoder layer: seconds per layer and peak memory, Llama shapes.

Checkpoints of growing size: SmolLM2-135M (the real weights, `smollm2_path()`), and random-weight Llama models with
the shapes of SmolLM2-360M, a 1B model (TinyLlama-1.1B) and LLaMA-7B, each with only a few decoder layers so they
run on a small machine (per-layer cost does not depend on depth). All float32. Stages, each in its own process
(so its peak resident memory is its own; the process keeps freed memory as the CLI does):

    wanda / sparsegpt         streamed prune (`prune_to_folder`), 8 x 512 random calibration tokens
    wanda-mem / sparsegpt-mem the same checkpoint pruned in memory (`prune`), for the per-layer comparison
    train                     one SPP training step at 1 x 512 tokens with gradient checkpointing (model in memory);
                              per layer = (step with all layers - step with one layer) / (layers - 1)
    merge / merge-mem         an SPP adapter merged into the pruned base, streamed / in memory (`merge_to_folder`)
    save                      `save_pruned` of the pruned base loaded in memory

Prune stages time the layer loop (pruning, reading and writing the layers) without its one-time start (capturing the
first layer's inputs; streamed, also reading the embeddings), reported apart as `start_s`; merge and save time the
whole call. "peak" is the process's maximum resident set; "over import" subtracts the resident set right after
the imports. The exponent is the slope of log(seconds per layer) against log(parameters per layer).

    python benchmarks/bench_scale.py                                  # everything: table + docs/scale.png
    python benchmarks/bench_scale.py --models smollm2-135m llama-7b --stages wanda wanda-mem
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, intermediate, heads, kv heads, vocab, tied, decoder layers kept
    "smollm2-360m": (960, 2560, 15, 5, 49152, True, 4),
    "llama-1b": (2048, 5632, 32, 4, 32000, False, 3),
    "llama-7b": (4096, 11008, 32, 32, 32000, False, 2),
}
MODELS = ("smollm2-135m", *SHAPES)
STAGES = ("wanda", "wanda-mem", "sparsegpt", "sparsegpt-mem", "train", "merge", "merge-mem", "save")
NSAMPLES, SEQLEN = 8, 512


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- checkpoints (made once, in a child)
def make_checkpoint(name: str, folder: Path) -> None:
    """A random-weight float32 Llama of `name`'s shape, saved as a sharded safetensors checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv, vocab, tied, layers = SHAPES[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                         vocab_size=vocab, tie_word_embeddings=tied, num_hidden_layers=layers, max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="1GB")


def checkpoint(name: str, work: Path) -> Path:
    if name == "smollm2-135m":
        from spp_hf.data.default_model import smollm2_path

        return smollm2_path()
    folder = work / name
    if not (folder / "config.json").is_file():
        child(["--make", name, "--path", str(folder)])
    return folder


def layer_params(folder: Path) -> tuple[int, int]:
    """(decoder layers, parameters per decoder layer) from a checkpoint's config."""
    config = json.loads((folder / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    kv_dim = h // config["num_attention_heads"] * config["num_key_value_heads"]
    return config["num_hidden_layers"], 2 * h * h + 2 * h * kv_dim + 3 * h * i + 2 * h


# --------------------------------------------------------------------------- stages (each in a child process)
def calibration():
    import torch

    return torch.randint(0, 1000, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))


def timed(module, name: str, box: list) -> None:
    """Wrap `module.name` so its wall time is appended to `box`."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            box.append(time.perf_counter() - start)

    setattr(module, name, wrapper)


def stage_prune(stage: str, folder: Path, out: Path) -> tuple[float, float]:
    """(seconds of the layer loop, seconds of its one-time start) of a streamed or in-memory prune. The start
    captures the first layer's inputs (streamed: it also reads the embeddings and the first layer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from spp_hf.pruning import api, prune, sequential, streaming

    method, loop, start = stage.removesuffix("-mem"), [], []
    shutil.rmtree(out, ignore_errors=True)
    if stage.endswith("-mem"):
        timed(api, "run_sequential", loop)
        timed(sequential, "start_sequential", start)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        prune(model, method, "2:4", calibration=calibration(), nsamples=NSAMPLES, seqlen=SEQLEN, progress=False)
    else:
        timed(streaming, "_prune_layers", loop)
        timed(streaming, "_start_calibration", start)
        streaming.prune_to_folder(folder, out, method, "2:4", calibration=calibration(), nsamples=NSAMPLES, seqlen=SEQLEN,
                                  dtype=torch.float32, progress=False)  # fmt: skip
    return loop[0], start[0]


def stage_train(folder: Path) -> float:
    """(step with all layers - step with one) / (layers - 1): one SPP step, 1 x 512 tokens, gradient checkpointing."""
    import torch
    from transformers import AutoModelForCausalLM

    from spp_hf import SPPConfig, get_spp_model

    model = get_spp_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), SPPConfig(r=16, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(0))
    layers, inner = model.model.layers, model.model

    def step_seconds(count: int) -> float:
        inner.layers = layers[:count]
        times = []
        for _ in range(2):  # a warm-up step, then the timed one
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        return times[-1]

    full, one = step_seconds(len(layers)), step_seconds(1)
    inner.layers = layers
    return (full - one) / (len(layers) - 1)


def stage_merge(stage: str, base: Path, adapter: Path, out: Path) -> float:
    from spp_hf.adapters.merging import merge_to_folder

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    merge_to_folder(adapter, out, base_model=str(base), in_memory=stage == "merge-mem", progress=False)
    return time.perf_counter() - start


def stage_save(base: Path, out: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from spp_hf.pruning import PruneReport, save_pruned
    from spp_hf.sparsity import SparsityReport

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    report = PruneReport("magnitude", "2:4", None, None, None, None, 0.0, [], SparsityReport())
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    save_pruned(model, None, out, report)
    return time.perf_counter() - start


def make_adapter(base: Path, adapter: Path) -> None:
    """An SPP adapter (all linear layers, r = 16, random factors) trained on `base`, saved to `adapter`."""
    import torch
    from transformers import AutoModelForCausalLM

    from spp_hf import SPPConfig, get_spp_model

    model = get_spp_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), SPPConfig(r=16, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in model.spp_layers():
            for param in layer.adapter_parameters().values():
                param.normal_(0, 0.01)
    model.save_pretrained(adapter)


def run_stage(args: argparse.Namespace) -> None:
    """Child: run one stage and print its result as JSON on the last line."""
    from spp_hf.training.cpu_allocator import keep_freed_memory

    keep_freed_memory()  # as the CLI does
    import spp_hf.adapters.merging  # noqa: F401 - imports counted in the baseline, not in the stage
    import spp_hf.pruning.streaming  # noqa: F401

    baseline = rss_mb()
    folder, work = Path(args.path), Path(args.work)
    layers = layer_params(folder)[0]
    name = "smollm2-135m" if folder.name.startswith("SmolLM2") else folder.name
    start = 0.0
    if args.stage in ("wanda", "wanda-mem", "sparsegpt", "sparsegpt-mem"):
        loop, start = stage_prune(args.stage, folder, work / f"{name}-{args.stage}")
        per_layer = (loop - start) / layers
    elif args.stage == "train":
        per_layer = stage_train(folder)
    elif args.stage in ("merge", "merge-mem"):
        per_layer = stage_merge(args.stage, work / f"{name}-base", work / f"{name}-adapter", work / f"{name}-{args.stage}") / layers
    else:
        per_layer = stage_save(work / f"{name}-base", work / f"{name}-saved") / layers
    print(json.dumps({"per_layer": per_layer, "start_s": start, "peak_mb": peak_mb(), "baseline_mb": baseline}))


# --------------------------------------------------------------------------- the parent
def evict(folder: Path) -> None:
    """Drop `folder`'s safetensors files from the page cache (`--cold`: the checkpoint is read from the disk, as a
    checkpoint larger than memory is)."""
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(argv: list[str]) -> dict | None:
    done = subprocess.run([sys.executable, __file__, *argv], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{done.stderr[-3000:]}")
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return json.loads(last) if last.startswith("{") else None


def prepare_base(model: str, folder: Path, work: Path) -> None:
    """The pruned base (streamed magnitude 2:4) and an adapter on it, for the merge and save stages."""
    base, adapter = work / f"{model}-base", work / f"{model}-adapter"
    if not (base / "sparsity.json").is_file():
        from spp_hf.pruning.streaming import prune_to_folder

        prune_to_folder(folder, base, "magnitude", "2:4", dtype="float32", progress=False)
    if not (adapter / "spp_config.json").is_file():
        child(["--make-adapter", str(base), "--path", str(adapter)])


def fit_exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) on log(x)."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def report(rows: list[dict], plot: Path) -> str:
    """A markdown table (seconds per layer, peak / over import in MB, exponents) and a log-log plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if any(r["stage"] == s for r in rows)]
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    cell = {(r["model"], r["stage"]): r for r in rows}
    lines = ["| model | params / layer | " + " | ".join(stages) + " |", "|---|---:|" + "---:|" * len(stages)]
    for model in models:
        params = next(r["layer_params"] for r in rows if r["model"] == model)
        values = [f"{cell[model, s]['per_layer']:.3g} s, {cell[model, s]['peak_mb'] / 1024:.2f} / "
                  f"{(cell[model, s]['peak_mb'] - cell[model, s]['baseline_mb']) / 1024:.2f} GB" if (model, s) in cell else "-"
                  for s in stages]  # fmt: skip
        lines.append(f"| {model} | {params / 1e6:.1f} M | " + " | ".join(values) + " |")
    exponents = {s: fit_exponent([(r["layer_params"], r["per_layer"]) for r in rows if r["stage"] == s]) for s in stages}
    lines.append("| exponent | | " + " | ".join(f"{e:.2f}" if e is not None else "-" for e in exponents.values()) + " |")
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for stage in stages:
        points = sorted((r["layer_params"], r["per_layer"]) for r in rows if r["stage"] == stage)
        axis.plot(*zip(*points), marker="o", label=f"{stage} (slope {exponents[stage]:.2f})" if exponents[stage] else stage)
    axis.set(xscale="log", yscale="log", xlabel="parameters per decoder layer", ylabel="seconds per decoder layer",
             title="spp-hf stages against layer size (float32, CPU)")  # fmt: skip
    axis.legend(fontsize=7)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(plot, dpi=120)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--work", default="/tmp/spp-bench-scale", help="folder for the checkpoints and outputs")
    parser.add_argument("--plot", default=str(REPO / "docs" / "scale.png"))
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--cold", action="store_true", help="drop the checkpoints from the page cache before each stage")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    parser.add_argument("--make-adapter", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        return make_checkpoint(args.make, Path(args.path))
    if args.make_adapter:
        return make_adapter(Path(args.make_adapter), Path(args.path))
    if args.stage:
        return run_stage(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        folder = checkpoint(model, work)
        layers, params = layer_params(folder)
        if {"merge", "merge-mem", "save"} & set(args.stages):
            prepare_base(model, folder, work)
        for stage in args.stages:
            if args.cold:
                evict(folder)
                evict(work / f"{model}-base")
            result = child(["--stage", stage, "--path", str(folder), "--work", str(work)])
            row = {"model": model, "stage": stage, "layers": layers, "layer_params": params, **result}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(report(rows, Path(args.plot)))


if __name__ == "__main__":
    main()
