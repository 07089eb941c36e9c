r"""Learning-rate sweeps of the first-order baselines: a fair baseline is a tuned one.

:func:`sweep` trains each method at a grid of learning rates (by default the configured rate
times ``factors``) for every seed, scores each rate by the final training loss averaged over the
seeds (a diverged run scores :math:`+\infty`), and extends the grid by one more rate beyond an
end, up to ``extend`` times, while the best rate sits at that end; the new rate continues the
grid's last ratio there. :func:`pick_rates` does the scoring for logs that already exist (e.g.
recorded runs). A short budget favours large rates; tune on the budget and data the comparison
uses, or say so.

Example (a few seconds on a CPU: 2 rates of SGD on the digits stand-in):

>>> from trlib.experiments import load_data, sweep
>>> digits = load_data("mnist_mlp", "stand-in", verbose=False)
>>> result = sweep("mnist_mlp", ["sgd"], "1epochs", rates=[0.05, 0.5], datasets=digits, progress=False,
...                verbose=False)
>>> result.best["sgd"], sorted(result.rates["sgd"]["grid"])
(0.5, [0.05, 0.5])
>>> print(result.format().splitlines()[0])
method  lr    seeds  final train loss  best  configured
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .configs import get_config
from .results import mean_ci

__all__ = ["sweep", "pick_rates", "final_loss", "Sweep"]

Log = List[Dict[str, Any]]


def final_loss(log: Log) -> float:
    """The training loss at the end of a run (inf when it is not finite: the run diverged)."""
    loss = log[-1]["train_loss"]
    return loss if math.isfinite(loss) else math.inf


def _logs(entry: Union[Log, Sequence[Log]]) -> List[Log]:
    """One log or a list of logs (one per seed) -> a list of logs."""
    return [entry] if entry and isinstance(entry[0], dict) else list(entry)


def pick_rates(logs: Mapping[Tuple[str, float], Union[Log, Sequence[Log]]],
               configured: Optional[Mapping[str, float]] = None) -> Dict[str, Dict[str, Any]]:
    """Per method, from ``{(method, lr): log or [log per seed]}``: ``grid`` (the rates, sorted),
    ``scores`` (``lr -> (mean, CI half-width)`` of the final training loss over seeds; inf for a
    diverged seed), ``best`` (the lowest mean), ``edge`` (whether the best is an end of a grid
    of more than two rates) and ``configured`` (the grid's rate nearest ``configured[method]``
    in ratio, None without one).

    >>> log = lambda loss: [{"train_loss": 2.0}, {"train_loss": loss}]
    >>> r = pick_rates({("adam", 1e-3): log(0.5), ("adam", 1e-2): log(0.3), ("adam", 1e-1): log(math.nan)},
    ...                configured={"adam": 1.2e-3})["adam"]
    >>> r["best"], r["edge"], r["configured"], r["scores"][0.1][0]
    (0.01, False, 0.001, inf)
    """
    out: Dict[str, Dict[str, Any]] = {}
    for method in dict.fromkeys(m for m, _ in logs):
        grid = sorted(lr for m, lr in logs if m == method)
        finals = {lr: [final_loss(log) for log in _logs(logs[method, lr])] for lr in grid}
        scores = {lr: (math.inf, math.nan) if math.inf in v else mean_ci(v) for lr, v in finals.items()}
        best = min(grid, key=lambda lr: (scores[lr][0], lr))
        nearest = None
        if configured is not None and method in configured:
            nearest = min(grid, key=lambda lr: abs(math.log(lr / configured[method])))
        out[method] = dict(grid=grid, scores=scores, best=best, configured=nearest,
                           edge=len(grid) > 2 and best in (grid[0], grid[-1]))
    return out


@dataclass
class Sweep:
    """What :func:`sweep` ran: ``logs`` (``{(method, lr): [log per seed]}``, seeds in ``seeds``
    order), ``rates`` (:func:`pick_rates`' answer), ``best`` (``method -> lr``) and the
    ``configured`` rates the grid was centred on."""

    task: str
    budget: str
    seeds: Tuple[int, ...]
    logs: Dict[Tuple[str, float], List[Log]]
    configured: Dict[str, float]

    @property
    def rates(self) -> Dict[str, Dict[str, Any]]:
        return pick_rates(self.logs, self.configured)

    @property
    def best(self) -> Dict[str, float]:
        return {method: r["best"] for method, r in self.rates.items()}

    def table(self) -> List[Dict[str, Any]]:
        """One row per (method, lr): ``method, lr, seeds, final_train_loss`` (mean, CI half-width),
        ``finals`` (per seed), ``best``, ``configured``."""
        rows = []
        for method, r in self.rates.items():
            for lr in r["grid"]:
                rows.append(dict(method=method, lr=lr, seeds=len(self.logs[method, lr]),
                                 final_train_loss=r["scores"][lr],
                                 finals=[final_loss(log) for log in self.logs[method, lr]],
                                 best=lr == r["best"], configured=lr == r["configured"]))
        return rows

    def format(self, fmt: str = "text") -> str:
        """The table as aligned ``"text"`` or ``"markdown"``."""
        head = ["method", "lr", "seeds", "final train loss", "best", "configured"]
        body = []
        for row in self.table():
            mean, half = row["final_train_loss"]
            loss = f"{mean:.4g}" if math.isnan(half) else f"{mean:.4g} ± {half:.2g}"
            body.append([row["method"], f"{row['lr']:g}", str(row["seeds"]), loss, "*" if row["best"] else "",
                         "x" if row["configured"] else ""])
        if fmt == "markdown":
            return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                             + ["| " + " | ".join(r) + " |" for r in body]) + "\n"
        widths = [max(len(c) for c in col) for col in zip(head, *body)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]) + "\n"


def _round(lr: float) -> float:
    return float(f"{lr:.3g}")


def sweep(task: str, methods: Sequence[str], budget: str, *, seeds: Sequence[int] = (0,),
          factors: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0),
          rates: Union[None, Sequence[float], Mapping[str, Sequence[float]]] = None, extend: int = 0,
          train: Optional[Callable[[str, int, float], Log]] = None, out: Union[str, Path, None] = None,
          on_run: Optional[Callable[[str, float, int, Log], None]] = None, **run_kwargs: Any) -> Sweep:
    """Sweep the learning rate of each of ``methods`` on ``task`` (see the module docstring).

    Args:
        budget: each run's budget (``"5epochs"``, ...).
        seeds: every rate runs every seed; the score is the mean final training loss over them.
        factors: the grid, as multiples of the configured rate (``get_config``'s, under the
            ``preset``, ``quick`` and ``overrides`` given in ``run_kwargs``), unless ``rates``
            gives it (one list for all methods, or one per method).
        extend: at most this many rates added beyond each end while the best sits there.
        train: ``train(method, seed, lr) -> log``; default :func:`trlib.experiments.run` with
            ``run_kwargs`` and ``lr`` among the overrides, writing to
            ``out/<method>_lr<lr>/`` when ``out`` is given (so a rerun resumes or reuses them).
        on_run: called as ``on_run(method, lr, seed, log)`` after each run (progress reports).

    Returns a :class:`Sweep`; rates are rounded to 3 significant digits.
    """
    from .runner import run

    overrides = dict(run_kwargs.pop("overrides", None) or {})
    settings = dict(quick=run_kwargs.get("quick", False), preset=run_kwargs.get("preset"))
    configured = {m: get_config(task, m, **settings, **overrides)["lr"] for m in methods}  # also checks them

    def default_train(method, seed, lr):
        folder = None if out is None else Path(out) / f"{method}_lr{lr:g}"
        return run(task, method, seed, budget, out=folder, overrides={**overrides, "lr": lr}, **run_kwargs)

    train = train or default_train
    result = Sweep(task, str(budget), tuple(seeds), {}, configured)

    def at(method, lr):
        lr = _round(lr)
        if (method, lr) not in result.logs:
            result.logs[method, lr] = []
            for seed in seeds:
                log = train(method, seed, lr)
                result.logs[method, lr].append(log)
                if on_run is not None:
                    on_run(method, lr, seed, log)

    for method in methods:
        grid = rates.get(method) if isinstance(rates, Mapping) else rates
        for lr in grid if grid is not None else [configured[method] * f for f in factors]:
            at(method, lr)
        for _ in range(extend):
            r = pick_rates({k: v for k, v in result.logs.items() if k[0] == method})[method]
            if not r["edge"]:
                break
            grid = r["grid"]
            top = r["best"] == grid[-1]
            at(method, grid[-1] * grid[-1] / grid[-2] if top else grid[0] * grid[0] / grid[1])
    return result
