"""Record the real Fashion-MNIST results of ``book/results/`` (issue 10, item 3): one command.

    python tools/record_fashion_mnist.py --jobs 2            # everything; rerun the same command to resume
    python tools/record_fashion_mnist.py --stage sweep       # only the baselines' learning-rate sweeps
    python tools/record_fashion_mnist.py --stage runs --jobs 2
    python tools/record_fashion_mnist.py --list              # the runs, without training

Three stages, each resumable (the runner resumes unfinished runs from their checkpoints and
returns finished ones as they are, so a rerun only does what is missing):

1. **sweep**: the learning rate of SGD, Adagrad, RMSProp and Adam on each task, by
   :func:`trlib.experiments.sweep` (:data:`SWEEPS`: grid, budget, seeds), written to
   ``book/results/<task>/lr_sweep/<method>_lr<rate>/`` with a summary
   ``book/results/<task>/lr_sweep.json`` (the table, the best rates, provenance). The recorded
   runs use the configured rates, so the stage stops when
   :data:`trlib.experiments.configs.TUNED_LR` disagrees with the sweep, printing the entry to put
   there (a test checks that they agree).
2. **pilot**: every method on ``fashion_mnist_mlp``, seed 0, for :data:`PILOT_EPOCHS` epochs
   (``book/results/fashion_mnist_mlp/budget_pilot/``), to see where the curves flatten.
   :func:`plateau_epoch` reads the budget of the MLP's recorded runs off the best method's curve
   (none reaches 99% training accuracy); the stage stops when :data:`MLP_BUDGET` disagrees.
3. **runs**: :data:`RUNS`, written to ``book/results/<task>/<folder>/`` as the runner writes them
   (JSON lines with provenance; ``checkpoints/`` is not committed).

``--jobs N`` trains N runs at a time, each in its own process with one torch thread. Everything
is on the real dataset (``data="real"``: it fails rather than fall back to a stand-in).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "book" / "results"
BASELINES = ("sgd", "adagrad", "rmsprop", "adam")
TR = ("tr_uniform", "tr_adagrad", "tr_rms")

#: The sweeps: a grid of the authors' rate (Adam: the configured one) times ``factors``, extended
#: by up to ``extend`` rates beyond an end while the best sits there; every rate runs every seed
#: for ``budget``, scored by the mean final training loss (the budget's end is the only
#: evaluation that matters, so ``eval_every`` is the budget). The autoencoder sweeps one seed: an
#: epoch of it costs ~25x an MLP epoch on one CPU core.
SWEEPS = {
    "fashion_mnist_mlp": dict(budget="10epochs", seeds=(0, 1), factors=(0.1, 0.3, 1.0, 3.0, 10.0), extend=3,
                              eval_every=10.0),
    "fashion_mnist_autoencoder": dict(budget="2epochs", seeds=(0,), factors=(0.1, 1.0, 10.0), extend=2,
                                      eval_every=2.0),
}

#: The pilot's length, and the budget of the MLP's recorded runs read off it: the best method's
#: plateau epoch (:func:`plateau_epoch`) plus the 10 epochs that show the flattening, rounded up
#: to a multiple of 10 (or the epoch it reaches 99% training accuracy, rounded up).
PILOT_EPOCHS = 40
MLP_BUDGET = 30
PILOT = ("fashion_mnist_mlp", "budget_pilot", TR + BASELINES, (0,), f"{PILOT_EPOCHS}epochs", None, 1.0)

#: The recorded runs: (task, folder, methods, seeds, budget, preset, eval_every). The MLP's
#: budget comes from the pilot. The rest is what the CPU allowed (an autoencoder epoch costs ~25 s
#: with Adam and ~125 s with TR-RMS on one core): the paper preset for 20 epochs, and the
#: autoencoder for 2 epochs (the TR methods: 1 of Adagrad warm-up, then 1 of TR), 3 seeds each.
RUNS = (
    ("fashion_mnist_mlp", "default", TR + BASELINES, tuple(range(10)), f"{MLP_BUDGET}epochs", None, 0.5),
    ("fashion_mnist_mlp", "paper", TR, (0, 1, 2), "20epochs", "paper", 0.5),
    ("fashion_mnist_autoencoder", "default", TR + BASELINES, (0, 1, 2), "2epochs", None, 0.5),
)


def plateau_epoch(log, window: int = 5, horizon: int = 10, tolerance: float = 0.05) -> float:
    """The first epoch E (at least ``window``) after which the full training loss, averaged over
    the ``window`` evaluations up to E, falls by less than ``tolerance`` (relative) over the next
    ``horizon`` epochs: where the curve flattens. inf if it never does within the log. Needs one
    evaluation per epoch.

    >>> log = [dict(epoch=e, train_loss=1 / (1 + e)) for e in range(60)]
    >>> plateau_epoch(log)   # 1/(1+E) falls by 5% over 10 epochs once E > ~190: not within 60
    inf
    >>> plateau_epoch([dict(epoch=e, train_loss=0.3 + 2.0 * 0.7 ** e) for e in range(60)])
    16
    """
    loss = {round(r["epoch"]): r["train_loss"] for r in log if float(r["epoch"]).is_integer()}

    def smooth(e):
        values = [loss.get(k) for k in range(e - window + 1, e + 1)]
        return None if None in values else sum(values) / window

    for e in sorted(loss):
        now, later = smooth(e), smooth(e + horizon)
        if e >= window and now is not None and later is not None and now - later < tolerance * now:
            return e
    return float("inf")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


@lru_cache(maxsize=None)
def _datasets(task: str):
    from trlib.experiments import load_data

    return load_data(task, "real", verbose=False)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _sweep_one(task: str, method: str):
    """One method's sweep on one task (a job of the pool); returns its logs."""
    from trlib.experiments import sweep

    s = SWEEPS[task]
    result = sweep(task, [method], s["budget"], seeds=s["seeds"], factors=s["factors"], extend=s["extend"],
                   out=RESULTS / task / "lr_sweep", preset="paper", datasets=_datasets(task), data="real",
                   threads=1, progress=False, verbose=False, overrides={"eval_every": s["eval_every"]})
    return result.logs


def _run_one(task: str, folder: str, method: str, seed: int, budget: str, preset, eval_every: float):
    from trlib.experiments import run

    log = run(task, method, seed, budget, out=RESULTS / task / folder, data="real", threads=1, preset=preset,
              datasets=_datasets(task), overrides={"eval_every": eval_every}, progress=False, verbose=False)
    return log[-1]


def _pool(jobs: int, tasks, describe):
    """Run ``tasks`` (``(function, args)``) on ``jobs`` processes; print each as it ends."""
    failed, results = [], {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        started = time.perf_counter()
        futures = {pool.submit(fn, *args): args for fn, args in tasks}
        for done, future in enumerate(as_completed(futures), 1):
            args = futures[future]
            try:
                results[args] = future.result()
                print(f"[{done}/{len(futures)} {time.perf_counter() - started:7.0f} s] {describe(args, results[args])}",
                      flush=True)
            except Exception as err:  # one failed run must not stop the others; reported at the end
                failed.append((args, err))
                print(f"[{done}/{len(futures)}] FAILED {args}: {type(err).__name__}: {err}", flush=True)
    return results, failed


def stage_sweep(jobs: int) -> bool:
    from trlib.experiments import pick_rates, get_config
    from trlib.experiments.configs import TUNED_LR
    import torch
    import trlib

    tasks = [(_sweep_one, (task, method)) for task in reversed(SWEEPS) for method in BASELINES]  # longest first
    results, failed = _pool(jobs, tasks, lambda args, logs: f"sweep {args[0]} {args[1]}: rates "
                                                            f"{', '.join(f'{lr:g}' for _, lr in sorted(logs))}")
    if failed:
        return False
    ok = True
    for task, s in SWEEPS.items():
        logs = {key: value for (t, _), part in results.items() if t == task for key, value in part.items()}
        configured = {m: get_config(task, m, preset="paper")["lr"] for m in BASELINES}
        rates = pick_rates(logs, configured)
        table = [dict(method=m, lr=lr, final_train_loss=list(r["scores"][lr]),
                      finals=[log[-1]["train_loss"] for log in logs[m, lr]], best=lr == r["best"])
                 for m, r in rates.items() for lr in r["grid"]]
        summary = dict(task=task, dataset=_datasets(task)[0].display_name, budget=s["budget"], seeds=list(s["seeds"]),
                       factors=list(s["factors"]), extend=s["extend"], centre=configured,
                       best={m: r["best"] for m, r in rates.items()},
                       at_an_end={m: r["edge"] for m, r in rates.items()}, table=table,
                       provenance=dict(command="python " + " ".join(shlex.quote(a) for a in sys.argv),
                                       git_commit=_commit(), written=_now(), trlib=trlib.__version__,
                                       torch=torch.__version__, python=platform.python_version(),
                                       device=platform.processor() or platform.machine(), threads=1,
                                       runs=f"book/results/{task}/lr_sweep/<method>_lr<rate>/"))
        path = RESULTS / task / "lr_sweep.json"
        path.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{task}: best rates {summary['best']} -> {path.relative_to(ROOT)}")
        tuned = {m: lr for m, (lr, _) in TUNED_LR.get(task, {}).items()}
        if tuned != summary["best"]:
            ok = False
            print(f"  trlib.experiments.configs.TUNED_LR[{task!r}] must be set to these rates (the runs use the "
                  f"configured ones): now {tuned}, the sweep says {summary['best']}")
    return ok


def _runs(groups=RUNS):
    return [(task, folder, method, seed, budget, preset, eval_every)
            for task, folder, methods, seeds, budget, preset, eval_every in groups for method in methods
            for seed in seeds]


def _describe(args, last):
    task, folder, method, seed = args[:4]
    acc = "" if last.get("train_acc") is None else f", train acc {last['train_acc']:.4f}"
    return (f"{task}/{folder} {method} seed {seed}: {last['epoch']:.2f} epochs, {last['backprops']:.0f} "
            f"backprops, {last['data_passes']:.1f} passes, {last['time']:.0f} s, train loss "
            f"{last['train_loss']:.4f}{acc}")


def pilot_budget():
    """(the best method of the pilot, its plateau epoch, the budget it gives), from the stored pilot."""
    from trlib.experiments import load_runs

    task, folder = PILOT[:2]
    logs = {r.provenance["method"]: r.records for r in load_runs(RESULTS / task / folder)}
    best = min(logs, key=lambda m: logs[m][-1]["train_loss"])
    reached = next((r["epoch"] for r in logs[best] if r["train_acc"] >= 0.99), None)
    epoch = reached if reached is not None else plateau_epoch(logs[best])
    if epoch == float("inf"):
        return best, epoch, None
    return best, epoch, int(10 * -(-(epoch + (0 if reached is not None else 10)) // 10))


def stage_pilot(jobs: int) -> bool:
    _, failed = _pool(jobs, [(_run_one, r) for r in _runs([PILOT])], _describe)
    if failed:
        return False
    best, epoch, budget = pilot_budget()
    print(f"pilot: the best method at {PILOT_EPOCHS} epochs is {best}; its curve flattens at epoch {epoch} (or "
          f"reaches 99%): budget {budget} epochs (MLP_BUDGET = {MLP_BUDGET})")
    if budget != MLP_BUDGET:
        print(f"  set MLP_BUDGET = {budget} in {Path(__file__).relative_to(ROOT)} (the runs use it)")
    return budget == MLP_BUDGET


def stage_runs(jobs: int) -> bool:
    # the longest first (autoencoder TR runs, then MLP TR runs), so the pool ends together
    cost = {("fashion_mnist_autoencoder", True): 0, ("fashion_mnist_mlp", True): 1,
            ("fashion_mnist_autoencoder", False): 2, ("fashion_mnist_mlp", False): 3}
    runs = sorted(_runs(), key=lambda r: (cost[r[0], r[2] in TR], r[1], r[3], r[2]))
    _, failed = _pool(jobs, [(_run_one, r) for r in runs], _describe)
    return not failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--stage", choices=("all", "sweep", "pilot", "runs"), default="all")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one process and one thread each)")
    p.add_argument("--list", action="store_true", help="list the runs of the runs stage and stop")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.list:
        for r in _runs():
            print(*r)
        return 0
    print(f"started {_now()} at commit {_commit()[:10]}: stage {args.stage}, {args.jobs} job(s)", flush=True)
    if args.stage in ("all", "sweep") and not stage_sweep(args.jobs):
        return 1
    if args.stage in ("all", "pilot") and not stage_pilot(args.jobs):
        return 1
    if args.stage in ("all", "runs") and not stage_runs(args.jobs):
        return 1
    print(f"finished {_now()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
