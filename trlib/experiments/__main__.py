"""Command line of :mod:`trlib.experiments`: ``python -m trlib.experiments {run,table,plot,config} ...``.

Bad arguments (``--out`` and budgets included) end with a one-line message and exit status 2
before any training; a dataset that cannot be loaded with ``--data real``, a missing optional
package (with the ``pip install "trlib-torch[...]"`` that provides it), a damaged checkpoint or
results file, and a run with other settings end with a one-line message and status 1. A run
that another process is writing is skipped with a message (status 1 at the end). Ctrl-C writes
a checkpoint, says how to resume, and exits with status 130 (during start-up: no traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from ..models import TASKS
from .configs import METHODS, PRESETS, get_config, parse_overrides
from .runner import parse_budget, prepare_out, resolve_device

EPILOG = """examples:
  python -m trlib.experiments run --task mnist_mlp --method tr_rms sgd --seeds 0 1 2 --budget 20epochs --out results/
  python -m trlib.experiments run --task all --method all --quick --out results/quick/
  python -m trlib.experiments table --in results/
  python -m trlib.experiments plot --in results/ --x backprops --out fig.png
  python -m trlib.experiments config --task mnist_conv --method tr_rms
  torchrun --standalone --nproc_per_node=4 -m trlib.experiments run --distributed --device cuda \
      --task cifar_resnet18 --method tr_rms adam --budget 20000backprops --data real --out results/
"""


def _budget(text):
    try:
        return parse_budget(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _unit_interval(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _names(values, valid, what, parser):
    if "all" in values:
        return list(valid)
    bad = [v for v in values if v not in valid]
    if bad:
        parser.error(f"unknown {what} {', '.join(map(repr, bad))}; valid: all, {', '.join(valid)}")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trlib.experiments", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train the paper's tasks with trust-region and first-order methods, and summarise the results.")
    sub = parser.add_subparsers(dest="command", metavar="{run,table,plot,config}", required=True)

    p = sub.add_parser("run", help="train (task, method, seed) combinations under a budget",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train every combination of --task, --method and --seeds. Each run writes "
                                   "OUT/<task>__<method>__<dataset>__seed<k>.jsonl and a checkpoint in "
                                   "OUT/checkpoints/; rerunning the same command resumes unfinished runs.")
    p.add_argument("--task", nargs="+", required=True, metavar="TASK",
                   help=f"one or more of: all, {', '.join(TASKS)}")
    p.add_argument("--method", nargs="+", required=True, metavar="METHOD",
                   help=f"one or more of: all, {', '.join(METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="seeds (default: 0)")
    p.add_argument("--budget", type=_budget, default=None,
                   help="work per run: e.g. 20epochs, 5000backprops, 300s (training seconds); "
                        "required unless --quick (default there: 10epochs)")
    p.add_argument("--out", type=Path, required=True, help="folder for results and checkpoints")
    p.add_argument("--device", default="auto",
                   help="torch device, e.g. cpu, cuda, cuda:1; auto: CUDA when present, else the CPU (default: auto)")
    p.add_argument("--data", choices=("auto", "real", "stand-in"), default="auto",
                   help="auto: the real dataset if it can be loaded or downloaded, else its offline stand-in "
                        "(announced); real: fail if missing; stand-in: the offline stand-in (default: auto)")
    p.add_argument("--data-root", type=Path, default=None, help="dataset folder (default: $TRLIB_DATA or "
                   "~/.cache/trlib/data)")
    p.add_argument("--quick", action="store_true",
                   help="tiny runs for a CPU: stand-in data, 1 thread, evaluation every 1/4 epoch, warm-ups of "
                        "at most 1 epoch")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a named set of settings applied before --set (paper: the authors' table exactly; "
                        "without it, the TR methods take the library's measured defaults)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override settings of every run, e.g. --set lr=3e-3 eval_every=0.5 "
                        "(see the config command for the keys)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --quick)")
    p.add_argument("--fresh", action="store_true", help="discard existing checkpoints and results of these runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes started by torchrun (NCCL with --device cuda: "
                        "one GPU per process; gloo with --device cpu); the global batch stays the configured "
                        "one; only rank 0 writes results")

    t = sub.add_parser("table", help="backprops, data passes, epochs and seconds to a training accuracy (99%% by "
                                     "default), final loss and test accuracy: mean and 95%% CI over seeds")
    t.add_argument("--in", dest="inp", type=Path, required=True, help="a results folder or .jsonl file")
    t.add_argument("--format", choices=("text", "markdown", "csv"), default="text", help="default: text")
    t.add_argument("--threshold", type=_unit_interval, default=0.99,
                   help="the training accuracy the costs are measured to, e.g. 0.9 (default: 0.99)")

    g = sub.add_parser("plot", help="curves with 95%% confidence bands over seeds")
    g.add_argument("--in", dest="inp", type=Path, required=True, help="a results folder or .jsonl file")
    g.add_argument("--x", choices=("backprops", "data_passes", "epochs", "time"), default="backprops",
                   help="the measure of work on the x axis: backprops, data passes (samples through gradients "
                        "and products / training-set size), epochs or training seconds (default: backprops)")
    g.add_argument("--y", nargs="+", choices=("train_loss", "train_acc", "test_acc", "test_loss"),
                   default=["train_loss", "train_acc"], help="one panel column each (default: train_loss train_acc)")
    g.add_argument("--out", type=Path, required=True, help="image file (.png, .pdf, .svg)")

    c = sub.add_parser("config", help="print the settings of a (task, method) as JSON")
    c.add_argument("--task", required=True, choices=list(TASKS))
    c.add_argument("--method", required=True, choices=list(METHODS))
    c.add_argument("--quick", action="store_true", help="quick mode's settings")
    c.add_argument("--preset", choices=list(PRESETS), default=None, help="a named set of settings")
    c.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides")
    return parser


def _cmd_run(args, parser) -> int:
    import torch

    tasks = _names(args.task, list(TASKS), "task", parser)
    methods = _names(args.method, list(METHODS), "method", parser)
    if any(s < 0 for s in args.seeds):
        parser.error("seeds must be >= 0")
    if args.budget is None and not args.quick:
        parser.error("the following arguments are required: --budget (or use --quick)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    budget = args.budget or parse_budget("10epochs")
    try:
        overrides = parse_overrides(args.overrides)
        for task in tasks:  # every setting checked before any work starts
            for method in methods:
                get_config(task, method, quick=args.quick, preset=args.preset, **overrides)
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        parser.error(f"--device {args.device}: CUDA is not available on this machine" if "CUDA" in str(err)
                     else str(err))
    try:
        prepare_out(args.out)  # before any data is loaded (data-parallel: every process; mkdir tolerates that)
    except ValueError as err:
        parser.error(f"--out: {err}")
    data = "stand-in" if args.quick and args.data == "auto" else args.data
    ctx = None
    if args.distributed:
        from . import distributed

        try:
            ctx = distributed.setup(device)
        except ValueError as err:
            parser.error(str(err))
        device = ctx.device
        try:
            return _run_all(args, tasks, methods, overrides, budget, data, device, ctx)
        finally:
            distributed.teardown(ctx)
    return _run_all(args, tasks, methods, overrides, budget, data, device, ctx)


def _run_all(args, tasks, methods, overrides, budget, data, device, ctx) -> int:
    from ..data import DatasetUnavailableError
    from .runner import BudgetWarning, load_data, run
    from .storage import RunLockedError

    main = ctx is None or ctx.is_main
    skipped = []
    for task in tasks:
        try:
            if ctx is None:
                datasets = load_data(task, data, device=device, root=args.data_root)
            else:
                from .distributed import load_data_on_rank0_first

                datasets = load_data_on_rank0_first(
                    ctx, lambda d, verbose: load_data(task, d, device=device, root=args.data_root, verbose=verbose),
                    data)
        except DatasetUnavailableError as err:
            if main:
                print(f"error: {err}", file=sys.stderr)
            return 1
        for method in methods:
            for seed in args.seeds:
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", BudgetWarning)
                        log = run(task, method, seed, budget, out=args.out, device=device, quick=args.quick,
                                  preset=args.preset, overrides=overrides, progress=not args.no_progress,
                                  fresh=args.fresh, threads=args.threads, datasets=datasets, distributed=ctx)
                    for w in caught:
                        if issubclass(w.category, BudgetWarning):
                            print(f"warning: {w.message}", file=sys.stderr)
                        else:
                            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
                except RunLockedError as err:  # another process trains it: leave it to that one
                    if main:
                        print(f"skipped: {err}", file=sys.stderr)
                    skipped.append(f"{task} {method} seed {seed}")
                    continue
                except KeyboardInterrupt:
                    if main:
                        print(f"\ninterrupted: {task} {method} seed {seed}; the checkpoint is in "
                              f"{args.out / 'checkpoints'}. Run the same command again to resume.", file=sys.stderr)
                    return 130
                except ValueError as err:  # e.g. a checkpoint made with other settings
                    if main:
                        print(f"error: {err}", file=sys.stderr)
                    return 1
                if not main:
                    continue
                last = log[-1]
                acc = "" if last["train_acc"] is None else f", train acc {100 * last['train_acc']:.1f}%"
                acc += "" if math.isfinite(last["train_loss"]) else " (diverged)"
                procs = "" if ctx is None else f" ({ctx.world_size} processes)"
                print(f"{task} {method} seed {seed} on {last['dataset']}{procs}: {last['epoch']:.2f} epochs, "
                      f"{last['backprops']:.10g} backprops, {last.get('data_passes', math.nan):.4g} data passes, "
                      f"{last['time']:.1f} s, train loss {last['train_loss']:.4g}{acc}", flush=True)
    if skipped and main:
        print(f"not run here, because another process is writing them: {', '.join(skipped)}", file=sys.stderr)
    return 1 if skipped else 0


class _Refused(Exception):
    """Results that table and plot must not summarise (the message says why, one line per file)."""


def _load(args, parser):
    from .results import RunFileError, load_runs

    try:
        runs = load_runs(args.inp)
    except RunFileError as err:
        raise _Refused(str(err)) from None
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if not any(r.records for r in runs):
        parser.error(f"no results in {args.inp}")
    unfinished = [f"{r.path.name} ({r.provenance.get('status')})" for r in runs
                  if r.provenance.get("status") not in ("complete",)]
    if unfinished:
        print("note: not complete: " + ", ".join(unfinished), file=sys.stderr)
    unverified = [r.path.name for r in runs if not r.verified]
    if unverified:
        print("note: not verified (written before results files carried a checksum): " + ", ".join(unverified),
              file=sys.stderr)
    return [rec for r in runs for rec in r.records]


def _cmd_table(args, parser) -> int:
    from .results import format_table, summarize

    records = _load(args, parser)
    print(format_table(summarize(records, args.threshold), args.format, args.threshold), end="")
    return 0


def _cmd_plot(args, parser) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from .. import plotting

    formats = Figure().canvas.get_supported_filetypes()
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; give the image's file name, e.g. {args.out / 'figure.png'}")
    if args.out.suffix.lstrip(".").lower() not in formats:
        parser.error(f"--out {args.out}: give the image's file name with one of the endings "
                     f"{', '.join('.' + f for f in sorted(formats))}")
    records = _load(args, parser)
    try:
        fig = plotting.plot_comparison(records, x=args.x, ys=args.y)
    except ValueError as err:  # e.g. an x axis the files do not record
        parser.error(str(err))
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120, bbox_inches="tight")
    except OSError as err:
        parser.error(f"--out {args.out}: {err.strerror or err}")
    print(f"wrote {args.out}")
    return 0


def _cmd_config(args, parser) -> int:
    try:
        cfg = get_config(args.task, args.method, quick=args.quick, preset=args.preset,
                         **parse_overrides(args.overrides))
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps(cfg, indent=2))
    return 0


#: optional package -> (what to install, the extra that provides it, what needs it)
_EXTRAS = {"sklearn": ("scikit-learn", "data", "the offline stand-in datasets"),
           "mnist1d": ("mnist1d", "data", "the MNIST-1D stand-in"),
           "torchvision": ("torchvision", "data", "MNIST, Fashion-MNIST and CIFAR-10"),
           "matplotlib": ("matplotlib", "plot", "figures")}


def _missing_extra(err: ImportError):
    """One line naming the optional package behind ``err`` and how to install it, or None."""
    name = (err.name or "").split(".")[0]
    if name not in _EXTRAS:
        name = next((m for m in _EXTRAS if m in str(err)), None)
    if name is None:
        return None
    package, extra, what = _EXTRAS[name]
    return f"{what} need the package {package}, which is not installed: pip install \"trlib-torch[{extra}]\""


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    try:
        return {"run": _cmd_run, "table": _cmd_table, "plot": _cmd_plot, "config": _cmd_config}[args.command](args, sub)
    except _Refused as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    except ImportError as err:
        message = _missing_extra(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # e.g. during the imports of a command: no traceback
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
