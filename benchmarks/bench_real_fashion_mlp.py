"""Issue 10's bar on real Fashion-MNIST, side by side from one run: TR-RMS against Adam and TR-uniform.

Trains ``fashion_mnist_mlp`` (real data, one CPU thread) with TR-RMS and TR-uniform under the
runner's configuration (the library's defaults, as the CLI runs them; ``--preset paper`` for the
authors'; ``--tr-set`` to change settings) and with Adam at batch 128 and learning rates 1e-3 and
3e-3, for every ``--seeds``, then prints, per method, the median over seeds of the work
to ``--threshold`` training accuracy in three measures and the full training loss after
``--loss-epochs`` epochs (mean +- 95% CI over seeds), and the ratios the bar is stated in:

* TR-RMS / best Adam: backprops (goal <= 1) and data passes (goal <= 2);
* TR-RMS / TR-uniform: backprops and data passes (goal < 1 for both).

"Best Adam" is the learning rate with the smaller median backprops to the threshold. A data
pass is the samples sent through gradient and Hessian-vector passes divided by the training-set
size (a product on 1/8 of the batch counts 1/8). Runs are stored under ``--out`` and reused: a
second call with the same arguments only prints (the runner resumes finished runs as they are).
Seconds are wall-clock training time on a possibly shared CPU: read them as rough.

Usage (about 20-30 minutes on one free core for 3 seeds and 20 epochs)::

    python benchmarks/bench_real_fashion_mlp.py --seeds 0 1 2 --budget 20epochs --out runs/bench_fashion
    python benchmarks/bench_real_fashion_mlp.py --preset paper --out runs/bench_fashion_paper
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from trlib.experiments import PRESETS, get_config, load_data, mean_ci, parse_overrides, run  # noqa: E402

TASK = "fashion_mnist_mlp"


def _to_threshold(log, threshold):
    for rec in log:
        if (rec.get("train_acc") or 0.0) >= threshold:
            return dict(backprops=rec["backprops"], passes=rec["data_passes"], seconds=rec["time"], epoch=rec["epoch"])
    return None


def _loss_at(log, epochs):
    reached = [r for r in log if r["epoch"] <= epochs + 1e-9]
    return reached[-1]["train_loss"] if reached else math.nan


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", default="20epochs")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--loss-epochs", type=float, default=10.0)
    p.add_argument("--out", default="runs/bench_real_fashion_mlp", help="folder for the runs (reused when they "
                   "exist; default: %(default)s)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="TR preset (default: the library's "
                   "defaults; paper: the authors' settings)")
    p.add_argument("--tr-set", nargs="*", default=[], metavar="KEY=VALUE", help="settings of both TR methods")
    p.add_argument("--adam-lrs", nargs="+", type=float, default=[1e-3, 3e-3])
    p.add_argument("--eval-every", type=float, default=0.5, help="epochs between evaluations (resolution)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    _common.set_threads(1)
    datasets = load_data(TASK, "real", root=args.data_root, verbose=True)
    tr = parse_overrides(args.tr_set)
    tr_run = {"preset": args.preset}  # the TR methods' only: Adam's runs are shared between presets
    plans = {"tr_rms": ("tr_rms", tr, tr_run), "tr_uniform": ("tr_uniform", tr, tr_run)}
    for lr in args.adam_lrs:
        plans[f"adam lr {lr:g}"] = ("adam", {"lr": lr}, {})
    results = {}
    for label, (method, overrides, run_kwargs) in plans.items():
        folder = Path(args.out) / label.replace(" ", "_")
        get_config(TASK, method, **run_kwargs, **overrides)  # bad settings fail before any training
        logs = [run(TASK, method, seed, args.budget, out=folder, data="real", threads=1, datasets=datasets,
                    overrides=dict(overrides, eval_every=args.eval_every), progress=False, verbose=False,
                    **run_kwargs)
                for seed in args.seeds]
        hits = [_to_threshold(log, args.threshold) for log in logs]
        reached = [h for h in hits if h is not None]
        row = dict(reached=len(reached), seeds=len(logs),
                   loss=mean_ci([_loss_at(log, args.loss_epochs) for log in logs]))
        for key in ("backprops", "passes", "seconds", "epoch"):
            # a seed that never reaches the threshold counts as infinitely slow (the median stays honest)
            row[key] = statistics.median([h[key] if h else math.inf for h in hits])
        results[label] = row

    adam = min((k for k in results if k.startswith("adam")), key=lambda k: results[k]["backprops"])
    env = _common.environment(_common.resolve_device("cpu"))
    _common.print_environment(f"Real Fashion-MNIST MLP: work to {args.threshold:.0%} training accuracy "
                              f"(median of {len(args.seeds)} seeds)", env,
                              dict(budget=args.budget, preset=args.preset or "(config default)",
                                   tr_set=" ".join(args.tr_set) or "-", best_adam=adam))
    rows = []
    for label, r in results.items():
        mean, half = r["loss"]
        rows.append((label, f"{r['reached']}/{r['seeds']}", f"{r['backprops']:.0f}", f"{r['passes']:.1f}",
                     f"{r['seconds']:.0f}", f"{r['epoch']:.1f}", f"{mean:.3f} +- {half:.3f}"))
    print(_common.format_table(("method", "reached", "backprops", "data passes", "seconds", "epochs",
                                f"loss @{args.loss_epochs:g} epochs"), rows))
    def ratio(a, b, key):
        x, y = results[a][key], results[b][key]
        return math.nan if math.isinf(x) and math.isinf(y) else (math.inf if math.isinf(x) else x / y)

    ratios = [
        ("TR-RMS / Adam", "backprops", ratio("tr_rms", adam, "backprops"), "<= 1"),
        ("TR-RMS / Adam", "data passes", ratio("tr_rms", adam, "passes"), "<= 2"),
        ("TR-RMS / Adam", "seconds", ratio("tr_rms", adam, "seconds"), "(report)"),
        ("TR-RMS / TR-uniform", "backprops", ratio("tr_rms", "tr_uniform", "backprops"), "< 1"),
        ("TR-RMS / TR-uniform", "data passes", ratio("tr_rms", "tr_uniform", "passes"), "< 1"),
    ]
    print()
    def shown(v):  # a method that never reached the threshold has infinite work
        if math.isnan(v):
            return "- (neither reached it)"
        if math.isinf(v):
            return "inf (the first never reached it)"
        return "0 (the second never reached it)" if v == 0 else f"{v:.2f}"

    print(_common.format_table(("ratio", "measure", "value", "goal"), [(a, b, shown(v), g) for a, b, v, g in ratios]))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(environment=env, best_adam=adam, results=results,
                                                   ratios=[dict(ratio=a, measure=b, value=v, goal=g)
                                                           for a, b, v, g in ratios]), indent=2, default=str))


if __name__ == "__main__":
    main()
