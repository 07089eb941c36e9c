"""Record the runs that chapter 8 ("Beyond the paper") shows in every mode: one resumable command.

    python tools/record_beyond.py                 # every variant x seed; rerun the same command to resume
    python tools/record_beyond.py --jobs 2        # two runs at a time (one torch thread each)
    python tools/record_beyond.py --list          # what would run, without training

Each variant of :data:`VARIANTS` is a method of the runner plus settings (``--set`` on the
command line): TR-RMS with the library's defaults (products on 1/8 of the batch), on the whole
batch and on 1/32 of it, TR with the Adam and the Hutchinson ellipsoids, TR-RMS with Gauss-Newton
products and ARC with the RMSProp ellipsoid (both with products on 1/8 of the batch), and Adam
at its configured rate as the reference. (TR with the empirical Fisher ellipsoid is left out:
its per-sample gradients cost ~27x TR-RMS's seconds per epoch on one CPU thread. TR-RMS and Adam
are also recorded by ``tools/record_fashion_mnist.py`` for chapters 5-6, with more seeds and two
runs at a time; chapter 8 takes every variant it can from this folder, so that its seconds come
from one recording.) All run on the real
Fashion-MNIST MLP (``data="real"``: the command fails rather than fall back to a stand-in) with
the same budget and seeds, and are written by the runner, with provenance (configuration, git
commit, device, versions, dates), to ``book/results/beyond_the_paper/<variant>/``; the
``checkpoints/`` next to them are not committed. Runs go seed by seed, so that a stopped
recording leaves every variant with the same seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "book" / "results" / "beyond_the_paper"
TASK = "fashion_mnist_mlp"
SEEDS = (0, 1, 2)
#: 10 epochs of the 60,000 images: the whole recording (24 runs) fits ~25 minutes of one free CPU core.
BUDGET = "10epochs"
EVAL_EVERY = 0.5

#: variant -> (runner method, settings). The names are those of ``trlib.plotting.METHOD_LABELS``.
VARIANTS = {
    "adam": ("adam", {}),
    "tr_rms_hessian_1_8": ("tr_rms", {}),
    "tr_rms_full_hessian": ("tr_rms", {"hessian_batch": 1.0}),
    "tr_rms_hessian_1_32": ("tr_rms", {"hessian_batch": 0.03125}),
    "tr_adam": ("tr_adam", {}),
    "tr_hutchinson": ("tr_hutchinson", {}),
    "tr_rms_ggn": ("tr_rms_ggn", {}),
    "arc_rms": ("arc_rms", {}),
}


def record(variant: str, seed: int, out: Path = OUT, budget: str = BUDGET) -> str:
    """Train (or resume, or return as finished) one variant from one seed; a one-line summary."""
    from trlib.experiments import run

    method, settings = VARIANTS[variant]
    started = time.perf_counter()
    log = run(TASK, method, seed, budget, out=out / variant, data="real", threads=1, progress=False,
              verbose=False, overrides={"eval_every": EVAL_EVERY, **settings})
    last = log[-1]
    return (f"{variant:22s} seed {seed}: {last['epoch']:.1f} epochs, training loss {last['train_loss']:.4f}, "
            f"accuracy {last['train_acc']:.3f}, {last['time']:.0f} s training ({time.perf_counter() - started:.0f} s "
            f"wall)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--list", action="store_true", help="print the runs and stop")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the variants' folders (default: the book's)")
    parser.add_argument("--budget", default=BUDGET, help=f"per run (default {BUDGET}; the book's runs use the default)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    todo = [(variant, seed) for seed in args.seeds for variant in args.variants]
    if args.list:
        for variant, seed in todo:
            method, settings = VARIANTS[variant]
            sets = " ".join(f"{k}={v}" for k, v in {"eval_every": EVAL_EVERY, **settings}.items())
            print(f"python -m trlib.experiments run --task {TASK} --method {method} --seeds {seed} --budget {args.budget} "
                  f"--data real --set {sets} --out {os.path.relpath(args.out / variant)}")
        return
    if args.jobs == 1:
        for variant, seed in todo:
            print(record(variant, seed, args.out, args.budget), flush=True)
        return
    with ProcessPoolExecutor(args.jobs) as pool:
        for done in as_completed([pool.submit(record, v, s, args.out, args.budget) for v, s in todo]):
            print(done.result(), flush=True)


if __name__ == "__main__":
    main()
