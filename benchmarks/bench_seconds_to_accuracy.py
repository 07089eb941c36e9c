r"""Seconds of training to a training accuracy (90% by default) on real Fashion-MNIST: TR/ARC variants vs Adam.

Issue 13's CPU bar, side by side in one run: every variant trains ``fashion_mnist_mlp`` on the
real data through the runner (:func:`trlib.experiments.run`: its defaults, counters and
training clock, which stops for evaluations) from the same seeds, one torch thread, and stops
at the first evaluation (every ``--eval-every`` epoch, off the clock) whose accuracy on the
whole training set reaches ``--target``. Runs go round-robin (seed by seed, every variant in
turn), so a change in the machine's load falls on all variants alike. The table gives each
variant's seconds to the target per seed and their median, and the best TR/ARC variant's
median over the best Adam's (Adam at the better of its tuned rates: the sweep's best on this
data and the configured one). A run that does not reach the target within ``--max-epochs``
counts as infinite.

Variants are runner methods with optional settings, ``method[:key=value,...]``, e.g.
``adam:lr=0.0009``, ``tr_rms:hessian_batch=0.0625``, ``arc_rms_ggn``.

Run: ``python benchmarks/bench_seconds_to_accuracy.py [--seeds 0 1 2] [--variants ...] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import _common
from trlib.experiments import Monitor, load_data, parse_overrides, run

DEFAULT_VARIANTS = ["adam:lr=0.0009", "adam:lr=0.003", "tr_rms", "tr_rms:hessian_batch=0.0625", "tr_rms_ggn",
                    "arc_rms_ggn"]


class _Reached(Exception):
    pass


class StopAtTarget(Monitor):
    """Ends a run at the first record whose training accuracy reaches the target."""

    def __init__(self, target: float):
        self.target, self.record = target, None

    def after_record(self, trainer, record):
        if record["train_acc"] is not None and record["train_acc"] >= self.target:
            self.record = record
            raise _Reached()


def parse_variant(text: str):
    method, _, settings = text.partition(":")
    return method, parse_overrides([s for s in settings.split(",") if s]) if settings else {}


def seconds_to_target(task, variant, seed, args, datasets):
    method, overrides = parse_variant(variant)
    monitor = StopAtTarget(args.target)
    t0 = time.perf_counter()
    try:
        log = run(task, method, seed, f"{args.max_epochs}epochs", data="real", datasets=datasets, threads=1,
                  overrides=dict(overrides, eval_every=args.eval_every), progress=False, verbose=False,
                  monitor=monitor)
        last = log[-1]
    except _Reached:
        last = monitor.record
    reached = monitor.record is not None
    return dict(variant=variant, seed=seed, reached=reached, seconds=last["time"] if reached else math.inf,
                epochs=last["epoch"], backprops=last["backprops"], train_acc=last["train_acc"],
                wall=time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="fashion_mnist_mlp")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--max-epochs", type=float, default=20)
    p.add_argument("--eval-every", type=float, default=0.25)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    _common.set_threads(1)
    env = _common.environment(_common.resolve_device("cpu"))
    _common.print_environment("Seconds to training accuracy", env, vars(args))
    datasets = load_data(args.task, "real", verbose=False)
    rows = []
    for seed in args.seeds:  # round-robin: every variant once per seed
        for variant in args.variants:
            r = seconds_to_target(args.task, variant, seed, args, datasets)
            rows.append(r)
            print(f"  seed {seed} {variant:<32} {r['seconds']:8.1f} s  ({r['epochs']:.2f} epochs, "
                  f"{r['backprops']:.0f} backprops, acc {r['train_acc']:.3f}, wall {r['wall']:.0f} s)", flush=True)
    medians = {v: statistics.median([r["seconds"] for r in rows if r["variant"] == v]) for v in args.variants}
    table = [[v] + [f"{r['seconds']:.1f}" for r in rows if r["variant"] == v] + [f"{medians[v]:.1f}"]
             for v in args.variants]
    print()
    print(_common.format_table(["variant"] + [f"seed {s}" for s in args.seeds] + ["median s"], table))
    adam = [v for v in args.variants if v.split(":")[0] == "adam"]
    second = [v for v in args.variants if v.split(":")[0] not in ("adam", "sgd", "adagrad", "rmsprop")]
    summary = {}
    if adam and second:
        best_adam = min(adam, key=medians.get)
        best = min(second, key=medians.get)
        ratio = medians[best] / medians[best_adam]
        summary = dict(best_adam=best_adam, best_second_order=best, ratio=ratio)
        print(f"\nbest TR/ARC variant {best}: {medians[best]:.1f} s median to {args.target:.0%} training accuracy; "
              f"Adam ({best_adam}): {medians[best_adam]:.1f} s; ratio {ratio:.2f}x (goal <= 1.5x)")
    _common.write_json(args.json, dict(environment=env, settings=vars(args), rows=rows, medians=medians,
                                       summary=summary))


if __name__ == "__main__":
    main()
