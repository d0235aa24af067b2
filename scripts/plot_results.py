"""Plot the recovery comparison: share of the WikiText-2 gap closed against training time.

Reads docs/recovery_runs.csv (one row per training run, plus the dense and pruned reference rows) and
writes docs/recovery.png: one panel per sparsity, one point per method and learning rate (the mean over
seeds, with min–max bars in both directions where there are several seeds), each labelled by name.

    .venv/bin/python scripts/plot_results.py [--csv docs/recovery_runs.csv] [--out docs/recovery.png]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLORS = {
    "spp": "#1f77b4",
    "lora_star": "#d62728",
    "masked_lora": "#2ca02c",
    "masked_full": "#7f7f7f",
}
# Targets stated for SPP in docs/results.md (share of the WikiText-2 gap closed), per sparsity.
TARGETS = {"2:4": 65.0}
# Label placement for the points of the shipped CSV, so labels stay off each other and off the error
# bars: ("pt", dx, dy, ha) puts the label that many points from its marker; ("at", x, y, ha) puts it at
# those data coordinates with a thin leader line to its marker. Any other point gets the default.
PLACES = {
    ("2:4", "LoRA*", "3e-3"): ("at", 1150, 62.6, "left"),
    ("2:4", "SPP", "2e-2"): ("at", 1480, 63.6, "left"),
    ("2:4", "masked LoRA", "3e-3"): ("at", 1720, 62.0, "left"),
    ("2:4", "LoRA*", "6e-3"): ("at", 1150, 56.0, "left"),
    ("2:4", "masked full FT", "1e-3"): ("at", 1720, 57.6, "left"),
    ("2:4", "masked full FT", "1e-4"): ("at", 1720, 56.4, "left"),
    ("2:4", "masked LoRA", "6e-3"): ("pt", 8, 0, "left"),
    ("2:4", "SPP 320 steps", "2e-2"): ("pt", 0, 10, "center"),
    ("2:4", "SPP dropout 0.05", "2e-2"): ("at", 2520, 55.0, "center"),
    ("75%", "SPP", "2e-2"): ("pt", 10, 0, "left"),
    ("75%", "LoRA*", "3e-3"): ("pt", 0, 12, "center"),
    ("75%", "masked LoRA", "3e-3"): ("pt", -10, 0, "right"),
}
DEFAULT_PLACE = ("pt", 8, 4, "left")


def load(path: Path) -> dict[str, list[dict]]:
    """Group the training runs of the CSV by sparsity, then by (label, lr): mean and min–max."""
    runs: dict[str, dict[tuple[str, str], list[dict]]] = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row["train_s"]:  # dense and pruned reference rows
                continue
            runs[row["sparsity"]][(row["label"], row["lr"])].append(row)
    points: dict[str, list[dict]] = {}
    for sparsity, groups in runs.items():
        points[sparsity] = []
        for (label, lr), rows in groups.items():
            gaps = [float(r["wikitext2_gap"]) for r in rows]
            secs = [float(r["train_s"]) for r in rows]
            points[sparsity].append(
                {
                    "label": label,
                    "lr": lr,
                    "method": rows[0]["method"],
                    "seeds": len(rows),
                    "gap": sum(gaps) / len(gaps),
                    "gap_range": (min(gaps), max(gaps)),
                    "secs": sum(secs) / len(secs),
                    "secs_range": (min(secs), max(secs)),
                }
            )
    return points


def plot(points: dict[str, list[dict]], out: Path) -> None:
    order = [s for s in ("2:4", "75%") if s in points] + sorted(set(points) - {"2:4", "75%"})
    fig, axes = plt.subplots(1, len(order), figsize=(6.2 * len(order), 5.0), squeeze=False)
    for ax, sparsity in zip(axes[0], order):
        for p in points[sparsity]:
            color = COLORS.get(p["method"], "black")
            xerr = yerr = None
            if p["seeds"] > 1:
                xerr = [[p["secs"] - p["secs_range"][0]], [p["secs_range"][1] - p["secs"]]]
                yerr = [[p["gap"] - p["gap_range"][0]], [p["gap_range"][1] - p["gap"]]]
            ax.errorbar(
                p["secs"], p["gap"], xerr=xerr, yerr=yerr, fmt="o", color=color, ms=6,
                capsize=3, elinewidth=1.2,
            )
            kind, tx, ty, ha = PLACES.get((sparsity, p["label"], p["lr"]), DEFAULT_PLACE)
            seeds = f", {p['seeds']} seeds" if p["seeds"] > 1 else ", 1 seed"
            text = f"{p['label']} {p['lr']}{seeds}"
            if kind == "at":
                ax.annotate(
                    text, (p["secs"], p["gap"]), xytext=(tx, ty), textcoords="data", ha=ha,
                    va="center", fontsize=8.5, color=color,
                    arrowprops={"arrowstyle": "-", "color": color, "lw": 0.7, "shrinkA": 2, "shrinkB": 5},
                )
            else:
                ax.annotate(
                    text, (p["secs"], p["gap"]), xytext=(tx, ty), textcoords="offset points", ha=ha,
                    va="center", fontsize=8.5, color=color,
                )
        if sparsity in TARGETS:
            ax.axhline(TARGETS[sparsity], color="black", lw=0.8, ls="--")
            ax.annotate(
                f"SPP target {TARGETS[sparsity]:.0f}% (not met)", (0.02, TARGETS[sparsity]),
                xycoords=("axes fraction", "data"), xytext=(0, 3), textcoords="offset points",
                va="bottom", fontsize=8.5,
            )
        xs = [v for p in points[sparsity] for v in p["secs_range"]]
        ys = [v for p in points[sparsity] for v in p["gap_range"]] + [TARGETS.get(sparsity, float("nan"))]
        ys = [y for y in ys if y == y]
        pad_x = 0.12 * (max(xs) - min(xs) or 200)
        pad_y = 0.12 * (max(ys) - min(ys) or 4)
        ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
        ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
        ax.set_title(f"Wanda {sparsity} (SmolLM2-135M, 200 steps)")
        ax.set_xlabel("training time, seconds (2 CPU cores)")
        ax.set_ylabel("WikiText-2 log-perplexity gap closed (%)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        "Recovery against training time — labels: method, learning rate, seeds; points: mean over seeds, "
        "bars: min–max",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=ROOT / "docs" / "recovery_runs.csv")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "recovery.png")
    args = parser.parse_args()
    plot(load(args.csv), args.out)


if __name__ == "__main__":
    main()
