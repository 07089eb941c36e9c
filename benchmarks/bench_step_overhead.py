r"""Milliseconds per step of TR-RMS, TR-RMS with GGN products and Adam on the Fashion-MNIST MLP, side by side.

Issue 13's CPU bar is seconds to an accuracy; this script isolates one factor of it, the wall
time of one optimizer step, on the runner's configuration of ``fashion_mnist_mlp`` (784-128-10
tanh MLP, cross-entropy + 1e-4 L2): TR-RMS at batch 256 with Hessian-vector products on 1/8 of
the batch (``tr_rms``), the same with generalised Gauss-Newton products (``tr_rms_ggn``), and
Adam at batch 128 (lr 9e-4). Each variant trains its own model from the same seed on the same
sequence of batches; the timed chunks (``--steps`` steps each) run round-robin for ``--rounds``
rounds, so load changes on a shared machine fall on every variant alike. The table gives the
median ms per step, the products per step the TR variants used, and the ratios to Adam.

``--baseline DIR`` also times the ``trlib`` package found in ``DIR`` (e.g. an older commit:
``git archive <commit> trlib | tar -x -C /tmp/old``), imported side by side as a second
package, so an optimisation of ``TrustRegion.step`` is measured old against new in one run
(the ratio ``new / old`` per variant).

Run: ``python benchmarks/bench_step_overhead.py [--rounds 20] [--steps 10] [--baseline /tmp/old]``.
Data: real Fashion-MNIST when installed, else the runner's stand-in (named in the banner).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import _common
import trlib
from trlib.experiments import load_data

L2 = 1e-4


def import_baseline(folder: str):
    """The ``trlib`` package in ``folder``, imported as ``trlib_baseline`` (its relative imports resolve inside it)."""
    init = Path(folder) / "trlib" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: no trlib package in {folder!r}")
    spec = importlib.util.spec_from_file_location("trlib_baseline", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["trlib_baseline"] = module
    spec.loader.exec_module(module)
    return module


class Run:
    """One variant of one implementation: its model, optimizer and position in the batch sequence."""

    def __init__(self, lib, variant: str, x, y, seed: int = 0):
        torch.manual_seed(seed)
        self.lib, self.variant, self.x, self.y, self.device = lib, variant, x, y, x.device
        self.model = trlib.models.mlp(784).to(x.device)
        self.params = list(self.model.parameters())
        if variant == "adam":
            self.opt, self.batch = torch.optim.Adam(self.params, lr=9e-4), 128
        else:
            self.opt, self.batch = lib.TrustRegion(self.params, norm="rms", decrease=1.75, eta2=0.9), 256
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.position, self.steps = torch.randperm(len(x), generator=self.gen).to(x.device), 0, 0

    def loss(self, x, y):
        return F.cross_entropy(self.model(x), y) + L2 * sum(p.pow(2).sum() for p in self.params)

    def step(self):
        if self.position + self.batch > len(self.order):
            self.order, self.position = torch.randperm(len(self.x), generator=self.gen).to(self.device), 0
        idx = self.order[self.position:self.position + self.batch]
        self.position += self.batch
        self.steps += 1
        x, y = self.x[idx], self.y[idx]  # fetched once, outside the closures (as the runner does)
        if self.variant == "adam":
            self.opt.zero_grad(set_to_none=True)
            self.loss(x, y).backward()
            self.opt.step()
            return
        xs, ys = x[:self.batch // 8], y[:self.batch // 8]
        if self.variant == "tr_rms":
            self.opt.step(lambda: self.loss(x, y), hessian_closure=lambda: self.loss(xs, ys), hessian_fraction=0.125)
        else:
            ggn = self.lib.gauss_newton.ggn_operator

            def curvature():
                data = ggn(self.model, xs, ys, "cross_entropy", reduction="sum")
                return lambda v: data(v) / len(xs) + 2 * L2 * v

            self.opt.step(lambda: self.loss(x, y), curvature=curvature, hessian_fraction=0.125)

    def chunk(self, steps: int) -> float:
        _common.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        _common.synchronize(self.device)
        return time.perf_counter() - t0

    def passes(self, products: float) -> float:
        """Seconds of the autodiff passes alone of one ``tr_rms`` step that spends ``products``
        products: the batch's gradient, the sub-batch's gradient with its graph, the products and
        the trial forward (what the step cannot avoid; the rest is the optimizer's own cost)."""
        idx = self.order[:self.batch]
        x, y = self.x[idx], self.y[idx]
        sync = lambda: _common.synchronize(self.device)  # noqa: E731
        sync()
        t0 = time.perf_counter()
        torch.autograd.grad(self.loss(x, y), self.params)
        grads = torch.autograd.grad(self.loss(x[:self.batch // 8], y[:self.batch // 8]), self.params, create_graph=True)
        sync()
        t1 = time.perf_counter()
        torch.autograd.grad(grads, self.params, [torch.ones_like(p) for p in self.params], retain_graph=True)
        sync()
        t2 = time.perf_counter()
        with torch.no_grad():
            self.loss(x, y)
        sync()
        t3 = time.perf_counter()
        return (t1 - t0) + products * (t2 - t1) + (t3 - t2)

    def products(self) -> float:
        return self.opt.counts["hvp"] / 0.125 / self.steps if self.variant != "adam" else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=10, help="steps per timed chunk")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of each variant first")
    p.add_argument("--baseline", default=None, help="a folder holding an older trlib package to time side by side")
    p.add_argument("--variants", nargs="+", default=["tr_rms", "tr_rms_ggn", "adam"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    _common.set_threads(args.threads)
    device = _common.resolve_device(args.device)
    train, _ = load_data("fashion_mnist_mlp", "auto", verbose=False, device=device)
    env = _common.environment(device)
    settings = dict(data=train.display_name, rounds=args.rounds, steps=args.steps, baseline=args.baseline)
    _common.print_environment("TrustRegion.step: ms per step on the Fashion-MNIST MLP", env, settings)
    libs = {"new": trlib}
    if args.baseline:
        libs["old"] = import_baseline(args.baseline)
    runs = {}
    for name, lib in libs.items():
        for v in args.variants:
            if v == "adam" and name != "new":
                continue  # Adam is torch's: timed once
            runs[(name, v)] = Run(lib, v, train.x, train.y)
    for run in runs.values():
        run.chunk(args.warmup)
    times = {key: [] for key in runs}
    passes = []  # the autodiff passes alone of a new tr_rms step, timed in the same rounds
    for _ in range(args.rounds):
        for key, run in runs.items():
            times[key].append(run.chunk(args.steps) / args.steps * 1e3)
            if key == ("new", "tr_rms"):
                k = run.products()
                passes.append(statistics.median(run.passes(k) for _ in range(args.steps)) * 1e3)
    adam = times.get(("new", "adam"))
    rows = []
    for (name, v), ts in times.items():
        ratio = statistics.median(t / a for t, a in zip(ts, adam)) if adam and v != "adam" else None
        rows.append([name, v, f"{statistics.median(ts):.2f}", f"{runs[(name, v)].products():.2f}",
                     "" if ratio is None else f"{ratio:.2f}"])
    print(_common.format_table(["library", "variant", "ms/step", "products/step", "x Adam"], rows))
    print("(x Adam: the median over rounds of the round's ratio)")
    if passes:
        ratio = statistics.median(t / q for t, q in zip(times[("new", "tr_rms")], passes))
        print(f"tr_rms: its autodiff passes alone (gradient on the batch, sub-batch gradient with graph, the products, "
              f"trial forward) take {statistics.median(passes):.2f} ms per step; a whole step takes {ratio:.2f} x that "
              "(median of per-round ratios; the rest is the optimizer's own cost)")
    new_over_old = {}
    if args.baseline:
        for v in args.variants:
            if v != "adam":
                new_over_old[v] = statistics.median(a / b for a, b in zip(times[("new", v)], times[("old", v)]))
                print(f"new / old {v}: {new_over_old[v]:.3f} (median of per-round ratios)")
    _common.write_json(args.json, dict(environment=env, settings=settings, ms_per_step={
        f"{name} {v}": statistics.median(ts) for (name, v), ts in times.items()}, new_over_old=new_over_old,
        passes_ms=statistics.median(passes) if passes else None))


if __name__ == "__main__":
    main()
