"""The paper's experiments: every task of :data:`trlib.models.TASKS` x the TR methods and the
first-order baselines, under a budget, with checkpoints, provenance, tables and a CLI.

Library::

    from trlib.experiments import run, load_results, summarize, format_table
    log = run("mnist_mlp", "tr_rms", seed=0, budget="5epochs", out="results/", data="auto")
    print(format_table(summarize(load_results("results/"))))

Command line (``python -m trlib.experiments --help``)::

    python -m trlib.experiments run --task mnist_mlp --method tr_rms sgd --seeds 0 1 2 --budget 20epochs --out results/
    python -m trlib.experiments table --in results/ --threshold 0.9
    python -m trlib.experiments plot --in results/ --x data_passes --out fig.png

Looking inside a run: ``run(..., monitor=m)`` with a :class:`~trlib.experiments.runner.Monitor` ``m``,
whose ``after_step(trainer)`` and ``after_record(trainer, record)`` see the model, the optimizer and
the mini-batch (diagnostics that count as no work).

Tuning a baseline: ``sweep("fashion_mnist_mlp", ["adam", "sgd"], "5epochs", seeds=(0, 1), extend=2)``
returns the best learning rate per method and the table of all (:mod:`~trlib.experiments.sweep`).

Modules: :mod:`~trlib.experiments.configs` (settings and presets), :mod:`~trlib.experiments.runner`
(one run: budget, trainer, checkpoints), :mod:`~trlib.experiments.distributed` (the data-parallel
communicator), :mod:`~trlib.experiments.results` (files, summary table),
:mod:`~trlib.experiments.sweep` (learning-rate sweeps), :mod:`~trlib.experiments.storage` (atomic writes).
"""

from .configs import (ADAM_GRID, ARC_METHODS, BEYOND_PAPER, FIRST_ORDER, METHODS, PRESETS, TR_METHODS, get_config,
                      parse_overrides)
from .results import Run, format_table, load_results, load_runs, mean_ci, read_run, summarize, write_run
from .runner import (Budget, Monitor, Objective, SingleProcess, Trainer, TrainerState, evaluate, load_data,
                     parse_budget, run)
from .sweep import Sweep, final_loss, pick_rates, sweep

__all__ = ["run", "load_results", "load_runs", "read_run", "summarize", "format_table", "mean_ci", "get_config",
           "parse_overrides", "parse_budget", "Budget", "Objective", "load_data", "evaluate", "write_run", "Run",
           "Trainer", "TrainerState", "Monitor", "SingleProcess", "METHODS", "TR_METHODS", "ARC_METHODS",
           "BEYOND_PAPER", "FIRST_ORDER", "ADAM_GRID", "PRESETS", "sweep", "pick_rates", "final_loss", "Sweep"]
