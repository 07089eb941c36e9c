"""The recorded real Fashion-MNIST results in ``book/results/`` agree with the library.

* The baselines' configured learning rates (:data:`trlib.experiments.configs.TUNED_LR`) are the
  best rates of the recorded sweeps (``<task>/lr_sweep.json``), recomputed here from the sweep's
  table by :func:`trlib.experiments.pick_rates`'s rule (the lowest mean final training loss).
* Every recorded run file verifies (record count and SHA-256 of its provenance), ran on the real
  dataset, finished, and was trained with the configuration the library gives today for its
  task, method and preset, so the book never plots a run of settings that no longer exist.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from trlib.experiments import get_config, load_runs
from trlib.experiments.configs import TUNED_LR

RESULTS = Path(__file__).resolve().parents[1] / "book" / "results"
TASKS = ("fashion_mnist_mlp", "fashion_mnist_autoencoder")


def _sweep(task):
    path = RESULTS / task / "lr_sweep.json"
    assert path.exists(), f"{path} is missing: TUNED_LR[{task!r}] has no recorded sweep behind it"
    return json.loads(path.read_text())


@pytest.mark.parametrize("task", sorted(TUNED_LR))
def test_tuned_rates_are_the_recorded_sweeps_best(task):
    sweep = _sweep(task)
    best = {}
    for method in {row["method"] for row in sweep["table"]}:
        rows = [row for row in sweep["table"] if row["method"] == method]
        best[method] = min(rows, key=lambda row: statistics.fmean(row["finals"]))["lr"]
    assert best == sweep["best"]
    assert {m: lr for m, (lr, _) in TUNED_LR[task].items()} == best
    assert not any(sweep["at_an_end"].values()), "a best rate at the grid's end: the sweep must extend"


def _recorded(task):
    folders = [p for p in sorted((RESULTS / task).iterdir()) if p.is_dir() and p.name != "lr_sweep"] \
        if (RESULTS / task).exists() else []
    return [(folder.name, run) for folder in folders for run in load_runs(folder)]


@pytest.mark.parametrize("task", TASKS)
def test_recorded_runs_are_real_finished_and_current(task):
    runs = _recorded(task)
    if task in TUNED_LR:
        assert runs, f"no recorded runs for {task} under {RESULTS / task}"
    for folder, run in runs:
        p = run.provenance
        assert run.verified, (folder, p["method"], p["seed"])
        assert p["dataset"]["is_stand_in"] is False and p["dataset"]["n_train"] == 60000
        assert p["status"] in ("complete", "diverged")
        expected = get_config(task, p["method"], preset=p["config"].get("preset"))
        # how often the run was evaluated is the recording's choice, not a training setting
        recorded = {k: p["config"][k] for k in expected if k in p["config"] and k != "eval_every"}
        assert recorded == {k: expected[k] for k in recorded}, (folder, p["method"], p["seed"])
