"""Plot the recovery comparison: share of the WikiText-2 gap closed against training time and against trainable
parameters.

Reads docs/recovery_runs.csv (one row per training run, plus the dense and pruned reference rows) and
writes docs/recovery.png: one column per pruned base (pruner and sparsity: the gap closed is measured against
that base), training seconds in the top row and trainable parameters in the bottom row, one point per method
and learning rate (the mean over seeds, with min–max bars in both directions where there are several seeds),
each labelled by name. The parameter panels show each method once, at its
chosen settings (`main` 1: the rate the validation split picked, default dropout and steps). Runs timed on one
core (`train_cores` 1: pinned to one core while another run used the other) are drawn hollow, as the axis label
says: their seconds are not 2-core seconds.

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
import matplotlib.ticker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLORS = {
    "spp": "#1f77b4",
    "lora_star": "#d62728",
    "masked_lora": "#2ca02c",
    "masked_full": "#7f7f7f",
    "hira": "#9467bd",
    "ia3": "#ff7f0e",
    "masked_lokr": "#8c564b",
}
PRUNERS = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}
# Targets stated for SPP in docs/results.md (share of the WikiText-2 gap closed), per pruned base.
TARGETS = {"Wanda 2:4": 65.0}
# Label placement for the points of the shipped CSV, so labels stay off each other and off the error
# bars: ("pt", dx, dy, ha) puts the label that many points from its marker; ("at", x, y, ha) puts it at
# those data coordinates with a thin leader line to its marker. Any other point gets the default.
PLACES = {
    ("Wanda 2:4", "LoRA*", "3e-3"): ("at", 1150, 62.6, "left"),
    ("Wanda 2:4", "SPP", "2e-2"): ("at", 1480, 63.6, "left"),
    ("Wanda 2:4", "masked LoRA", "3e-3"): ("at", 1720, 62.0, "left"),
    ("Wanda 2:4", "LoRA*", "6e-3"): ("at", 1150, 56.0, "left"),
    ("Wanda 2:4", "masked full FT", "1e-3"): ("at", 1720, 57.6, "left"),
    ("Wanda 2:4", "masked full FT", "1e-4"): ("at", 1720, 56.4, "left"),
    ("Wanda 2:4", "masked LoRA", "6e-3"): ("pt", 8, 0, "left"),
    ("Wanda 2:4", "SPP 320 steps", "2e-2"): ("pt", 0, 10, "center"),
    ("Wanda 2:4", "SPP dropout 0.05", "2e-2"): ("at", 3600, 57.9, "right"),
    ("Wanda 2:4", "SPP + 0.5 KL", "2e-2"): ("at", 1750, 64.5, "left"),
    ("Wanda 2:4", "SPP + 0.5 KL + feature", "2e-2"): ("at", 3000, 63.9, "left"),
    ("Wanda 2:4", "masked LoRA + 0.5 KL", "3e-3"): ("at", 4230, 59.0, "right"),
    ("Wanda 2:4", "HiRA + 0.5 KL", "2e-2"): ("at", 4230, 61.7, "right"),
    ("Wanda 2:4", "HiRA", "2e-2"): ("at", 3560, 54.6, "right"),
    ("Wanda 2:4", "IA³", "1e-2"): ("at", 1800, 50.3, "left"),
    ("Wanda 2:4", "masked LoKr", "1e-2"): ("at", 2380, 53.2, "left"),
    ("Wanda 75%", "SPP", "2e-2"): ("pt", 10, 0, "left"),
    ("Wanda 75%", "LoRA*", "3e-3"): ("pt", 0, 12, "center"),
    ("Wanda 75%", "masked LoRA", "3e-3"): ("pt", -10, 0, "right"),
    ("Wanda 75%", "HiRA", "2e-2"): ("at", 1900, 66.9, "left"),
}
DEFAULT_PLACE = ("pt", 8, 4, "left")


def load(path: Path) -> dict[str, list[dict]]:
    """Group the training runs of the CSV by pruned base ("Wanda 2:4"), then by (label, lr): mean and min–max."""
    runs: dict[str, dict[tuple[str, str], list[dict]]] = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row["train_s"]:  # dense and pruned reference rows
                continue
            base = f"{PRUNERS[row['pruner']]} {row['sparsity']}"
            runs[base][(row["label"], row["lr"], row.get("train_cores") or "2")].append(row)
    points: dict[str, list[dict]] = {}
    for base, groups in runs.items():
        points[base] = []
        for (label, lr, cores), rows in groups.items():
            gaps = [float(r["wikitext2_gap"]) for r in rows]
            secs = [float(r["train_s"]) for r in rows]
            points[base].append(
                {
                    "label": label,
                    "lr": lr,
                    "method": rows[0]["method"],
                    "seeds": len(rows),
                    "gap": sum(gaps) / len(gaps),
                    "gap_range": (min(gaps), max(gaps)),
                    "secs": sum(secs) / len(secs),
                    "secs_range": (min(secs), max(secs)),
                    "params": float(rows[0]["trainable_params_m"]),
                    "cores": int(cores),
                    "main": rows[0].get("main", "1") == "1",
                }
            )
    return points


def _label(ax, p: dict, x: float, place: tuple, color: str) -> None:
    kind, tx, ty, ha = place
    seeds = f", {p['seeds']} seeds" if p["seeds"] > 1 else ""
    text = f"{p['label']} {p['lr']}{seeds}"
    arrow = {"arrowstyle": "-", "color": color, "lw": 0.7, "shrinkA": 2, "shrinkB": 5} if kind == "at" else None
    ax.annotate(text, (x, p["gap"]), xytext=(tx, ty), textcoords="data" if kind == "at" else "offset points", ha=ha,
                va="center", fontsize=8.5, color=color, arrowprops=arrow)  # fmt: skip


def _fanned(points: list[dict], low: float, high: float, log: bool, span: float) -> dict[int, tuple]:
    """Label places for a parameter panel, where methods of nearly the same size stack up: the points within a
    factor 1.5 of each other get one column of labels just right of the group, in their order of gap closed, one
    row apart (the largest group's column fills `low`..`high`), near the group's mean gap so a small group's labels
    stay beside its points, and between the largest column's rows so that neighbouring columns' labels do not run
    into each other. A smaller group whose gaps are half a row apart or more, and every other point, keeps the
    default place."""
    places: dict[int, tuple] = {}
    by_size = sorted(range(len(points)), key=lambda i: points[i]["params"])
    groups: list[list[int]] = []
    for i in by_size:
        if groups and points[i]["params"] <= 1.5 * points[groups[-1][0]]["params"]:
            groups[-1].append(i)
        else:
            groups.append([i])
    stacked = [g for g in groups if len(g) > 1]
    largest = max(stacked, key=len, default=[])
    slot = (high - low) / max(len(largest) - 1, 1)
    for group in stacked:
        gaps = sorted(points[i]["gap"] for i in group)
        if group is not largest and min(b - a for a, b in zip(gaps, gaps[1:])) >= slot / 2:
            continue  # far enough apart for the default places
        edge = max(points[i]["params"] for i in group)
        x = edge * 1.8 if log else edge + 0.15 * span
        order = sorted(group, key=lambda i: -points[i]["gap"])
        shift = 0.0 if group is largest else 0.5  # other columns' labels fall between the largest column's rows
        mean_row = (high - sum(gaps) / len(gaps)) / slot  # the group's mean gap, in rows below `high`
        first = round(mean_row - (len(order) - 1) / 2 - shift) + shift
        first = min(max(first, shift), (high - low) / slot - (len(order) - 1) - shift)
        places.update({i: ("at", x, high - (first + rank) * slot, "left") for rank, i in enumerate(order)})
    return places


def _panel(ax, base: str, points: list[dict], by: str) -> None:
    """One pruned base's points against training seconds (`by` "secs") or trainable parameters ("params": each method
    once, at its chosen settings)."""
    if by == "params":
        points = [p for p in points if p["main"]]
    ys = [v for p in points for v in p["gap_range"]] + [TARGETS.get(base, float("nan"))]
    ys = [y for y in ys if y == y]
    pad_y = 0.12 * (max(ys) - min(ys) or 4)
    ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    xs = [v for p in points for v in p["secs_range"]] if by == "secs" else [p["params"] for p in points]
    log = by == "params" and max(xs) / min(xs) > 20  # a log axis only where the values span more than a factor of 20
    if by == "params":
        span = max(xs) - min(xs) or 0.1
        right = max(xs) * 12 if log else max(xs) + 0.8 * span
        bottom, top = ax.get_ylim()
        places = _fanned(points, bottom + 0.08 * (top - bottom), top - 0.16 * (top - bottom), log, span)
    for i, p in enumerate(points):
        color = COLORS.get(p["method"], "black")
        xerr = yerr = None
        if p["seeds"] > 1:
            yerr = [[p["gap"] - p["gap_range"][0]], [p["gap_range"][1] - p["gap"]]]
            if by == "secs":
                xerr = [[p["secs"] - p["secs_range"][0]], [p["secs_range"][1] - p["secs"]]]
        ax.errorbar(p[by], p["gap"], xerr=xerr, yerr=yerr, fmt="o", color=color, ms=6, capsize=3, elinewidth=1.2,
                    mfc="white" if p["cores"] == 1 and by == "secs" else color)  # fmt: skip
        place = PLACES.get((base, p["label"], p["lr"]), DEFAULT_PLACE) if by == "secs" else places.get(i, DEFAULT_PLACE)
        _label(ax, p, p[by], place, color)
    if base in TARGETS:
        ax.axhline(TARGETS[base], color="black", lw=0.8, ls="--")
        ax.annotate(f"SPP target {TARGETS[base]:.0f}% (not met)", (0.98, TARGETS[base]), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", ha="right", va="bottom", fontsize=8.5)  # fmt: skip
    if by == "secs":
        pad_x = 0.12 * (max(xs) - min(xs) or 200)
        ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
        ax.set_xlabel("training time, seconds (filled: 2 CPU cores; hollow: 1 core)")
    else:
        if log:
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 2, right)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        else:
            ax.set_xlim(min(xs) - 0.1 * span, right)
        ax.set_xlabel("trainable parameters (millions)")
    ax.set_title(f"{base} (SmolLM2-135M, 200 steps)")
    ax.set_ylabel("WikiText-2 log-perplexity gap closed (%)")
    ax.grid(True, alpha=0.3)


def plot(points: dict[str, list[dict]], out: Path) -> None:
    shipped = ("Wanda 2:4", "SparseGPT 2:4", "Wanda 75%")
    order = [b for b in shipped if b in points] + sorted(set(points) - set(shipped))
    fig, axes = plt.subplots(2, len(order), figsize=(6.2 * len(order), 10.0), squeeze=False)
    for col, base in enumerate(order):
        _panel(axes[0][col], base, points[base], "secs")
        _panel(axes[1][col], base, points[base], "params")
    fig.suptitle(
        "Recovery against training time and trainable parameters — labels: method, learning rate, seeds (one where "
        "not said); points: mean over seeds, bars: min–max",
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
