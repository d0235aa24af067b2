"""`report.md` and its PNG plots for a pipeline run: the methods side by side (table, perplexity bars,
loss curves, gap closed against trainable parameters and training seconds) and per-layer sparsity."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean
from typing import Any, Sequence

from safetensors import safe_open

from ..sparsity import fingerprint_modules, zero_mask_differences
from ..storage import atomic_write_text, read_sparsity_json, sparsity_fingerprint
from .config import PipelineConfig
from .layout import RunLayout
from .results import WIKITEXT2, EvalRecord, gap_closed
from .variants import BASELINES, Variant, variant_config

TEXT_LABELS = {WIKITEXT2: "WikiText-2", "wiki-validation": "Wikipedia val.", "c4-heldout": "C4 held-out"}


def _plt():
    import matplotlib  # slow to import, and only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def saved_fingerprint(model_dir: Path, modules: list[str]) -> dict:
    """Mask fingerprint of `modules` as saved in a checkpoint's safetensors (read without loading the model)."""
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            tensors.update({m: f.get_tensor(f"{m}.weight") for m in modules if f"{m}.weight" in keys})
    return fingerprint_modules((m, tensors[m]) for m in modules if m in tensors)


def _zero_ratios(fingerprint: dict) -> list[float]:
    return [m["zeros"] / math.prod(m["shape"]) for m in fingerprint["modules"].values()]


def gaps(results: dict[str, EvalRecord], variant: str) -> dict[str, float]:
    """{text: share of the pruned→dense log-perplexity gap that `variant` closes} (texts with both baselines)."""
    if not set(BASELINES) <= set(results):
        return {}
    dense, pruned, found = (results[v].perplexities() for v in ("dense", "pruned", variant))
    return {t: gap_closed(pruned[t], found[t], dense[t]) for t in found if t in dense and t in pruned and pruned[t] != dense[t]}


# --------------------------------------------------------------------------- plots
def plot_losses(layout: RunLayout, runs: Sequence[Variant], out: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for variant in runs:
        losses = _read_json(layout.loss_history(variant.name), [])
        if losses:
            ax.plot([s for s, _ in losses], [v for _, v in losses], label=variant.label, linewidth=1)
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")  # the KL to the dense model when distilling
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def plot_perplexity(results: dict[str, EvalRecord], labels: dict[str, str], out: Path) -> None:
    """Grouped bars: one group per evaluated text, one bar per model (log scale)."""
    plt = _plt()
    names = list(results)
    texts = list(results[names[0]].perplexities())
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) * len(texts) / 2), 4))
    for i, name in enumerate(names):
        ppl = results[name].perplexities()
        ax.bar([t + i * width for t in range(len(texts))], [ppl.get(t, math.nan) for t in texts], width, label=labels[name])
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(texts))], [TEXT_LABELS.get(t, t) for t in texts])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _by_method(points: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for point in points:
        grouped.setdefault(point["method"], []).append(point)
    return grouped


def plot_gap_vs_cost(points: list[dict], out: Path) -> bool:
    """Gap closed against trainable parameters (top row) and training seconds (bottom row), one column per
    evaluated text; every method is one point (the mean over its seeds, min–max as error bars) labelled
    with its name (no legend to decode). An axis is logarithmic
    only where its values span more than a factor of 20; parameters are shown in millions."""
    points = [p for p in points if p["gaps"]]
    if not points:
        return False
    plt = _plt()
    texts = [t for t in TEXT_LABELS if any(t in p["gaps"] for p in points)]
    fig, axes = plt.subplots(2, len(texts), figsize=(4.2 * len(texts), 6.4), squeeze=False)
    for row, (key, xlabel, scale) in enumerate((("params", "trainable parameters (M)", 1e-6), ("seconds", "training seconds", 1.0))):
        values = [p[key] * scale for p in points if p[key] is not None]
        for col, text in enumerate(texts):
            ax = axes[row][col]
            for method, runs in _by_method(points).items():
                runs = [r for r in runs if r[key] is not None and text in r["gaps"]]
                if not runs:
                    continue
                xs, ys = [r[key] * scale for r in runs], [100 * r["gaps"][text] for r in runs]
                x, y = sum(xs) / len(xs), sum(ys) / len(ys)
                label = method if len(runs) == 1 else f"{method} ({len(runs)} seeds)"
                ax.errorbar(x, y, yerr=[[y - min(ys)], [max(ys) - y]], xerr=[[x - min(xs)], [max(xs) - x]],
                            fmt="o", color=runs[0]["color"], capsize=3, markersize=5)  # fmt: skip
                ax.annotate(label, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7, color=runs[0]["color"])
            if values and min(values) > 0 and max(values) / min(values) > 20:
                ax.set_xscale("log")
            ax.margins(x=0.25, y=0.2)
            ax.set_xlabel(xlabel)
            ax.set_title(TEXT_LABELS[text], fontsize=9)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("gap closed (%)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_sparsity(before: list[float], after: list[float], label: str, out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(before, "o", markersize=4, label="pruned base")
    ax.plot(after, "x", markersize=4, label=f"{label} merged")
    ax.set_xlabel("linear layer (index)")
    ax.set_ylabel("zero ratio")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- text
def _objective(distill_weight: float, feature_weight: float = 0.0) -> str:
    if distill_weight <= 0:
        text = "language-modelling loss"
    elif distill_weight >= 1:
        text = "distilled from the dense model (KL loss)"
    else:
        text = f"loss {1 - distill_weight:g}·LM + {distill_weight:g}·KL to the dense model"
    if feature_weight > 0:
        text += f" + {feature_weight:g}·feature loss (normalised MSE to the dense model's hidden states)"
    return text


def _epochs(metrics: dict[str, dict]) -> str:
    found = sorted({round(m["epochs"], 2) for m in metrics.values() if m.get("epochs") is not None})
    return f" ({', '.join(f'{e:g}' for e in found)} epochs)" if found else ""


def _acc(score: dict | None) -> str:
    if not score or score.get("acc") is None:
        return " |"
    se = score.get("acc_stderr")
    return f" {score['acc']:.3f}{'' if se is None else f' ± {se:.3f}'} |"


def _count(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def _ppl(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _results_table(results: dict[str, EvalRecord], labels: dict[str, str], metrics: dict[str, dict]) -> list[str]:
    texts = list(next(iter(results.values())).perplexities())
    tasks = sorted({t for r in results.values() for t in r.zero_shot or {}})
    header = "| model |" + "".join(f" {TEXT_LABELS.get(t, t)} ppl | gap |" for t in texts)
    header += "".join(f" {t} acc |" for t in tasks) + " trainable | train s | peak memory |"
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for name, record in results.items():
        ppl, gap, m = record.perplexities(), gaps(results, name) if name not in BASELINES else {}, metrics.get(name, {})
        row = f"| {labels[name]} |" + "".join(f" {_ppl(ppl.get(t))} | {f'{100 * gap[t]:.1f}%' if t in gap else ''} |" for t in texts)
        row += "".join(_acc((record.zero_shot or {}).get(t)) for t in tasks)
        memory, secs = m.get("peak_memory_bytes"), m.get("train_seconds")
        row += f" {_count(m.get('trainable_parameters'))} | {'' if secs is None else f'{secs:.0f}'} |"
        row += f" {'' if memory is None else f'{memory / 2**30:.2f} GiB'} |"
        lines.append(row)
    return lines


def _summary_table(results: dict[str, EvalRecord], runs: Sequence[Variant]) -> list[str]:
    """Per `methods:` entry, mean perplexity (min–max over seeds) and mean gap closed, when some entry has several seeds."""
    groups: dict[str, list[str]] = {}
    for v in runs:
        if v.name in results:
            groups.setdefault(v.entry, []).append(v.name)
    if all(len(names) < 2 for names in groups.values()):
        return []
    texts = list(next(iter(results.values())).perplexities())
    header = "| method | seeds |" + "".join(f" {TEXT_LABELS.get(t, t)} ppl | gap |" for t in texts)
    lines = ["## Across seeds", "", "Mean perplexity over seeds (min–max) and mean gap closed.", "",
             header, "|" + " --- |" * (header.count("|") - 1)]  # fmt: skip
    for entry, names in groups.items():
        cells = ""
        for t in texts:
            values = [v for n in names if (v := results[n].perplexities().get(t)) is not None]
            if not values:
                cells += " | |"
                continue
            spread = f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""
            gap = [g[t] for g in (gaps(results, n) for n in names) if t in g]
            cells += f" {mean(values):.2f}{spread} | {f'{100 * mean(gap):.1f}%' if gap else ''} |"
        lines.append(f"| {entry} | {len(names)} |{cells}")
    return lines + [""]


def write_report(cfg: PipelineConfig, runs: Sequence[Variant], results: dict[str, EvalRecord], seconds: float) -> Path:
    """Write runs/<name>/report.md with tables and plots; returns its path."""
    layout = cfg.layout
    metrics = {v.name: _read_json(layout.train_metrics(v.name), {}) for v in runs}
    labels = {"dense": "dense", "pruned": f"pruned ({cfg.prune.method} {cfg.prune.sparsity})", **{v.name: v.label for v in runs}}
    lines = _settings(cfg, runs, metrics, seconds)
    if results:
        lines += _results_section(layout, runs, results, labels, metrics)
    lines += _loss_section(layout, runs)
    lines += _sparsity_section(layout, runs)
    atomic_write_text(layout.report, "\n".join(lines))
    return layout.report


def _objectives(cfg: PipelineConfig, runs: Sequence[Variant]) -> str:
    """The run's training loss, and each variant's where its `set:` changes it (e.g. `spp_kd05` distils)."""
    base = _objective(cfg.train.distill_weight, cfg.train.distill_feature_weight)
    own = {}
    for v in runs:
        t = variant_config(cfg, v.overrides, v.seed).train
        if (text := _objective(t.distill_weight, t.distill_feature_weight)) != base:
            own[v.entry] = text
    return base + "".join(f"; {entry}: {text}" for entry, text in sorted(own.items()))


def _settings(cfg: PipelineConfig, runs: Sequence[Variant], metrics: dict[str, dict], seconds: float) -> list[str]:
    rates = sorted({f"{v.entry} lr {m['learning_rate']:g}" for v in runs if (m := metrics[v.name])})
    return [f"# spp-hf run `{cfg.name}`", "",
            f"Model `{cfg.model}`, pruned with {cfg.prune.method} {cfg.prune.sparsity} "
            f"({cfg.prune.nsamples} × {cfg.prune.seqlen} calibration tokens of `{cfg.prune.calibration}`). "
            f"Every method: {cfg.train.max_steps} steps × {cfg.train.batch_size * cfg.train.grad_accum} × "
            f"{cfg.train.max_length} tokens of `{cfg.train.data}`{_epochs(metrics)}, {_objectives(cfg, runs)}; "
            f"SPP r={cfg.train.r}, s={cfg.train.scale}, dropout {cfg.train.dropout}; LoRA r={cfg.lora.r}, "
            f"alpha {cfg.lora.lora_alpha}; {', '.join(rates) or 'no method trained'}. "
            f"Wall time of this invocation: {seconds / 60:.1f} min.", ""]  # fmt: skip


def _windows(record: EvalRecord) -> str:
    """How the perplexities of `record` were measured, for the note under the table."""
    found = record.perplexity
    seqlen = next((r.get("seqlen") for r in found.values()), None)
    held = ", ".join(f"{TEXT_LABELS.get(n, n)} {r['windows']} windows" for n, r in found.items() if n != WIKITEXT2)
    wikitext = (f"WikiText-2 raw test {found[WIKITEXT2]['windows']} windows (rows joined with \"\\n\\n\")" if WIKITEXT2 in found
                else "WikiText-2 test not evaluated (eval.ppl_windows 0)")  # fmt: skip
    return f"Perplexity: windows of {seqlen} tokens; {wikitext}{'; ' + held if held else ''}. "


def _results_section(
    layout: RunLayout, runs: Sequence[Variant], results: dict[str, EvalRecord], labels: dict[str, str], metrics: dict[str, dict]
) -> list[str]:
    lines = _results_table(results, labels, metrics)
    lines += ["", _windows(next(iter(results.values()))) +
              "The held-out texts are never trained or calibrated on (`spp_hf.data.corpora`). "
              "Gap closed = (log ppl_pruned − log ppl) / (log ppl_pruned − log ppl_dense). "
              "Zero-shot: accuracy ± lm-eval's standard error. Trainable: the weights a method can change. "
              f"Peak memory: {next((m['peak_memory_kind'] for m in metrics.values() if m), 'n/a')} while the method "
              "was loaded and trained.", ""]  # fmt: skip
    lines += _summary_table(results, runs)
    plot_perplexity(results, labels, layout.plot("perplexity"))
    lines += [f"![perplexity]({layout.plot('perplexity').name})", ""]
    colors: dict[str, str] = {}
    points = []
    for v in runs:
        if v.name in results:
            colors.setdefault(v.entry, f"C{len(colors)}")
            m = metrics[v.name]
            points.append({"method": v.entry, "color": colors[v.entry], "gaps": gaps(results, v.name),
                           "params": m.get("trainable_parameters"), "seconds": m.get("train_seconds")})  # fmt: skip
    if plot_gap_vs_cost(points, layout.plot("gap_vs_cost")):
        lines += ["## Gap closed against cost", "",
                  f"![gap closed vs trainable parameters and training seconds]({layout.plot('gap_vs_cost').name})", ""]  # fmt: skip
    return lines


def _loss_section(layout: RunLayout, runs: Sequence[Variant]) -> list[str]:
    if not plot_losses(layout, runs, layout.plot("loss")):
        return []
    lines = ["## Training loss", "", f"![training loss]({layout.plot('loss').name})", ""]
    for v in runs:
        losses = _read_json(layout.loss_history(v.name), [])
        if losses:
            head = ", ".join(f"{x:.3f}" for _, x in losses[:3])
            tail = ", ".join(f"{x:.3f}" for _, x in losses[-3:])
            lines.append(f"- {v.label}: first {head} … last {tail}")
    return lines + [""]


def _sparsity_section(layout: RunLayout, runs: Sequence[Variant]) -> list[str]:
    """Each saved merged model's zero masks against the pruned base's, read back from the files (`zero_mask_differences`)."""
    merged = [v for v in runs if layout.has_merged(v.name)]
    recorded = sparsity_fingerprint(read_sparsity_json(layout.pruned))
    if not recorded or not merged:
        return []
    modules = list(recorded["modules"])  # the layers the pruning zeroed
    before = saved_fingerprint(layout.pruned, modules)
    ratios = _zero_ratios(before)
    lines = ["## Sparsity before and after merge", "",
             f"{len(modules)} pruned linear layers, mean zero ratio {mean(ratios):.4f}. Every merged model's zeros were checked "
             "bit for bit against the pruned base's before it was saved; read back from the saved files:", ""]  # fmt: skip
    for v in merged:
        problems = zero_mask_differences(before, saved_fingerprint(layout.merged(v.name), modules))
        verdict = "identical to the pruned base's" if not problems else f"DIFFER from the pruned base's in {len(problems)} layers ({problems[0]})"
        lines.append(f"- {v.label}: zero masks {verdict}")
    after = _zero_ratios(saved_fingerprint(layout.merged(merged[0].name), modules))
    plot_sparsity(ratios, after, merged[0].label, layout.plot("sparsity"))
    return lines + ["", f"![per-layer sparsity]({layout.plot('sparsity').name})", ""]
