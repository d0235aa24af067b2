"""`report.md` and its PNG plots for a pipeline run: loss curves, perplexities, per-layer sparsity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import atomic_write_text

if TYPE_CHECKING:
    from .pipeline import PipelineConfig

LABELS = {"dense": "dense", "pruned": "pruned", "spp": "SPP (merged)", "lora_star": "LoRA*"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def _layer_zeros(model_dir: Path) -> list[tuple[str, float]]:
    """Per-layer zero ratio of a saved checkpoint, read from its safetensors without loading the model."""
    from safetensors import safe_open

    rows = []
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith("proj.weight") or key.endswith(("c_attn.weight", "c_fc.weight")):
                    t = f.get_tensor(key)
                    rows.append((key.removesuffix(".weight"), (t == 0).float().mean().item()))
    return rows


def plot_losses(run_dir: Path, out: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for variant in ("spp", "lora_star"):
        losses = _read_json(run_dir / variant / "train" / "loss_history.json", [])
        if losses:
            ax.plot([s for s, _ in losses], [v for _, v in losses], label=LABELS[variant])
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")  # the KL to the dense model when distilling
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def plot_perplexity(results: dict[str, dict], out: Path) -> None:
    plt = _plt()
    names = [v for v in ("dense", "pruned", "spp", "lora_star") if v in results]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([LABELS[n] for n in names], [results[n]["ppl"] for n in names], color=["#4c72b0", "#c44e52", "#55a868", "#8172b2"][: len(names)])
    ax.set_yscale("log")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_sparsity(before: list[tuple[str, float]], after: list[tuple[str, float]], out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r for _, r in before], "o", markersize=4, label="pruned base")
    ax.plot([r for _, r in after], "x", markersize=4, label="SPP merged")
    ax.set_xlabel("linear layer (index)")
    ax.set_ylabel("zero ratio")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _objective(distill_weight: float) -> str:
    if distill_weight <= 0:
        return "language-modelling loss"
    if distill_weight >= 1:
        return "distilled from the dense model (KL loss)"
    return f"loss {1 - distill_weight:g}·LM + {distill_weight:g}·KL to the dense model"


def write_report(cfg: "PipelineConfig", results: dict[str, dict], seconds: float) -> Path:
    """Write runs/<name>/report.md with tables and plots; returns its path."""
    from .pipeline import gap_closed

    run_dir = cfg.run_dir
    lines = [f"# spp-hf run `{cfg.name}`", ""]
    lines += [f"Model `{cfg.model}`, pruned with {cfg.prune.method} {cfg.prune.sparsity} "
              f"({cfg.prune.nsamples} × {cfg.prune.seqlen} calibration tokens); SPP r={cfg.train.r}, s={cfg.train.scale}, "
              f"lr {cfg.train.learning_rate}; LoRA* r={cfg.lora.r}, lr {cfg.lora.learning_rate}; "
              f"{cfg.train.max_steps} steps × {cfg.train.batch_size} × {cfg.train.max_length} tokens of `{cfg.train.data}` "
              f"for each, {_objective(cfg.train.distill_weight)}. "
              f"Wall time of this invocation: {seconds / 60:.1f} min.", ""]  # fmt: skip
    if results:
        tasks = sorted({t for r in results.values() for t in r.get("zero_shot", {})})
        header = "| model | WikiText-2 ppl | gap closed |" + "".join(f" {t} acc |" for t in tasks) + " train s |"
        lines += [header, "|" + " --- |" * (header.count("|") - 1)]
        dense, pruned = results.get("dense", {}).get("ppl"), results.get("pruned", {}).get("ppl")
        for variant in ("dense", "pruned", "spp", "lora_star"):
            if variant not in results:
                continue
            r = results[variant]
            gap = f"{100 * gap_closed(pruned, r['ppl'], dense):.1f}%" if dense and pruned and variant in ("spp", "lora_star") else ""
            accs = "".join(f" {r.get('zero_shot', {}).get(t, {}).get('acc', float('nan')):.3f} |" for t in tasks)
            secs = _read_json(run_dir / variant / "train" / "train_seconds.json")
            lines.append(f"| {LABELS[variant]} | {r['ppl']:.2f} | {gap} |{accs} {'' if secs is None else f'{secs:.0f}'} |")
        some = next(iter(results.values()))
        lines += ["", f"Perplexity: {some.get('ppl_windows')} windows of {some.get('ppl_seqlen')} tokens "
                  "(WikiText-2 raw test, rows joined with \"\\n\\n\"). Gap closed = (log ppl_pruned − log ppl) / "
                  "(log ppl_pruned − log ppl_dense).", ""]  # fmt: skip
        plot_perplexity(results, run_dir / "perplexity.png")
        lines += ["![perplexity](perplexity.png)", ""]
    if plot_losses(run_dir, run_dir / "loss.png"):
        lines += ["## Training loss", "", "![training loss](loss.png)", ""]
        for variant in ("spp", "lora_star"):
            losses = _read_json(run_dir / variant / "train" / "loss_history.json", [])
            if losses:
                head = ", ".join(f"{v:.3f}" for _, v in losses[:3])
                tail = ", ".join(f"{v:.3f}" for _, v in losses[-3:])
                lines.append(f"- {LABELS[variant]}: first {head} … last {tail}")
        lines.append("")
    pruned_dir, merged_dir = run_dir / "pruned", run_dir / "spp" / "merged"
    if pruned_dir.exists() and merged_dir.exists():
        before, after = _layer_zeros(pruned_dir), _layer_zeros(merged_dir)
        plot_sparsity(before, after, run_dir / "sparsity.png")
        same = before == after
        overall = sum(r for _, r in before) / max(1, len(before))
        lines += ["## Sparsity before and after merge", "",
                  f"{len(before)} linear layers, mean zero ratio {overall:.4f}; per-layer zero ratios of the merged "
                  f"model {'are identical to' if same else 'DIFFER from'} the pruned base's.", "",
                  "![per-layer sparsity](sparsity.png)", ""]  # fmt: skip
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path

