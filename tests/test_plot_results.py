"""scripts/plot_results.py draws docs/recovery.png from docs/recovery_runs.csv: the shipped CSV stays readable by it."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSV = ROOT / "docs" / "recovery_runs.csv"


def load_script():
    spec = importlib.util.spec_from_file_location("plot_results", ROOT / "scripts" / "plot_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_training_row_says_how_it_was_timed_and_whether_it_is_the_methods_choice():
    with open(CSV, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["train_s"]]
    assert rows and all(r["train_cores"] in {"1", "2"} and r["main"] in {"0", "1"} for r in rows)
    assert {r["pruner"] for r in rows} <= set(load_script().PRUNERS)
    for base in {(r["pruner"], r["sparsity"]) for r in rows}:
        chosen = [r for r in rows if (r["pruner"], r["sparsity"]) == base and r["main"] == "1"]
        mains = {(r["method"], r["label"]) for r in chosen}
        chosen_rates = {(r["label"], r["lr"]) for r in chosen}
        assert len(chosen_rates) == len({label for label, _ in chosen_rates}), chosen_rates  # one rate per method
        assert mains


def test_plot_groups_seeds_and_draws(tmp_path):
    plot = load_script()
    points = plot.load(CSV)
    spp = next(p for p in points["Wanda 2:4"] if p["label"] == "SPP" and p["lr"] == "2e-2" and p["cores"] == 2)
    assert spp["seeds"] == 2 and spp["gap_range"] == (59.1, 59.8) and abs(spp["gap"] - 59.45) < 1e-9
    plot.plot(points, tmp_path / "recovery.png")
    assert (tmp_path / "recovery.png").stat().st_size > 10_000


def test_fanned_labels_separate_a_stack_and_leave_a_spread_out_pair_beside_its_points():
    plot = load_script()
    stack = [{"params": 2.5, "gap": g} for g in (62.0, 59.4, 58.9, 56.6)]  # one size, labels would overlap
    pair = [{"params": 0.18, "gap": 52.1}, {"params": 0.22, "gap": 55.0}]  # one size, gaps far apart
    places = plot._fanned(stack + pair, 50.0, 62.0, log=True, span=2.3)
    assert set(places) == {0, 1, 2, 3}
    rows = [places[i][2] for i in range(4)]
    assert rows == sorted(rows, reverse=True) and rows[0] == 62.0 and abs(rows[-1] - 50.0) < 1e-9
    close_pair = [{"params": 0.18, "gap": 52.1}, {"params": 0.22, "gap": 52.3}]
    places = plot._fanned(stack + close_pair, 50.0, 62.0, log=True, span=2.3)
    assert {4, 5} <= set(places) and abs(places[4][2] - places[5][2]) > 3.9  # one row (4.0) apart
