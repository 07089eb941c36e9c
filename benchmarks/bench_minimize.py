r"""``trlib.minimize`` vs ``scipy.optimize.minimize`` on the Moré-Garbow-Hillstrom problems.

Problems (written once in torch, :mod:`_mgh`): the 35 test problems of Moré, Garbow &
Hillstrom (1981) from their standard starting points, the separable (extended) Rosenbrock
function with n = 100 from (-1.2, 1, -1.2, 1, ...), and a few extras (``--set extra``):
the chained Rosenbrock function (n = 10, 100), a nonconvex quartic started next to its saddle,
and f(x) = x0^2 - x1^2 + x1^4 started exactly at its strict saddle 0.

Methods: trlib ``gltr``, ``cg`` and ``arc`` (adaptive cubic regularisation; default settings), scipy ``trust-krylov`` (GLTR, the TRLIB
library), ``trust-exact`` (Moré-Sorensen on the dense Hessian) and ``trust-ncg`` (Steihaug CG).
scipy gets NumPy wrappers of the same torch functions, with gradients, Hessian-vector
products and Hessians from torch autograd, so both sides see the same derivatives. Every
method stops at ``||grad|| <= --gtol`` (1e-5) or after ``--max-iter`` (1000) iterations,
float64, one thread by default (``--threads``). trlib also checks the curvature there
(smallest Hessian eigenvalue above -1e-6, its products counted) and leaves strict saddles.

Work = gradients + Hessian-vector products (trlib: ``ngev + nhvp``; scipy: ``njev + nhev``;
for ``trust-exact`` a dense Hessian counts as n products). A run **solves** a problem when it
passes its own convergence test or ends at one of the local minima the paper lists
(``|f - f*| <= 1e-8 max(1, |f*|)``): on Meyer's function (problem 10) the gradient test
cannot be met in float64 (one unit in the last place of x1 moves the gradient by ~3e-4).

The table prints each method's work per problem (``!`` marks a problem not solved), then the
totals and the number solved over the MGH set plus Rosenbrock-100, and each method's total
against ``trust-krylov``'s; for the extras it prints the final values instead (scipy stops
at the saddles: its gradient test is met there).

Run: ``python benchmarks/bench_minimize.py [--set mgh|extra|all] [--problems meyer,gulf] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from typing import Callable, Dict, List

import numpy as np
import torch
from scipy.optimize import minimize as scipy_minimize

import _common
import _mgh
import trlib

DTYPE = torch.float64


# ----------------------------------------------------------------------------- extra problems
def chained_rosenbrock(x):
    return torch.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def quartic_saddle(x):
    """sum_i x_i^4/4 - d_i x_i^2/2 + 0.05 sum_i (x_{i+1} - x_i)^2, d = (1, -1, 1, ...): a strict
    saddle at 0, minima near x_i = +-1 in the odd coordinates."""
    d = torch.ones_like(x)
    d[1::2] = -1.0
    return torch.sum(0.25 * x**4 - 0.5 * d * x**2) + 0.05 * torch.sum((x[1:] - x[:-1]) ** 2)


def saddle_2d(x):
    return x[0] ** 2 - x[1] ** 2 + x[1] ** 4


class _Function:
    """A problem given as a scalar function (the extras), with the interface of _mgh.Problem."""

    def __init__(self, name, fun, start):
        self.name, self.fun, self.start, self.minima = name, fun, tuple(start), ()
        self.n = len(self.start)

    def f(self, x):
        return self.fun(x)

    def x0(self):
        return torch.tensor(self.start, dtype=DTYPE)

    def solved(self, value):
        return False


EXTRA = [
    _Function("chained-rosenbrock-10", chained_rosenbrock, [-1.2, 1.0] * 5),
    _Function("chained-rosenbrock-100", chained_rosenbrock, [-1.2, 1.0] * 50),
    _Function("quartic-saddle-10", quartic_saddle, [1e-3] * 10),
    _Function("saddle-start", saddle_2d, [0.0, 0.0]),
]
MAIN = _mgh.PROBLEMS + [_mgh.ROSENBROCK_100]


# ----------------------------------------------------------------------------- the runs
class NumpyWrapper:
    """fun / jac / hessp / hess of a torch function for scipy; autograd does the derivatives.

    The gradient graph at the last ``x`` is cached so that successive ``hessp`` calls at the
    same point cost one backward pass each (as trlib's do); scipy's counters count calls.
    """

    def __init__(self, fun: Callable):
        self.f, self._key = fun, None

    def fun(self, x):
        with torch.no_grad():
            return float(self.f(torch.as_tensor(x, dtype=DTYPE)))

    def jac(self, x):
        xt = torch.tensor(x, dtype=DTYPE, requires_grad=True)
        (g,) = torch.autograd.grad(self.f(xt), xt)
        return g.numpy()

    def hessp(self, x, p):
        if x.tobytes() != self._key:
            self._x = torch.tensor(x, dtype=DTYPE, requires_grad=True)
            (self._g,) = torch.autograd.grad(self.f(self._x), self._x, create_graph=True)
            self._key = x.tobytes()
        if not self._g.requires_grad:
            return np.zeros_like(p)
        (hv,) = torch.autograd.grad(self._g, self._x, grad_outputs=torch.as_tensor(p, dtype=DTYPE), retain_graph=True)
        return hv.numpy()

    def hess(self, x):
        return torch.autograd.functional.hessian(self.f, torch.tensor(x, dtype=DTYPE)).numpy()


def run_scipy(method: str, problem, args) -> dict:
    w = NumpyWrapper(problem.f)
    derivatives = dict(hess=w.hess) if method == "trust-exact" else dict(hessp=w.hessp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on its own failures; the table reports them
        res = scipy_minimize(w.fun, problem.x0().numpy(), method=method, jac=w.jac,
                             options=dict(gtol=args.gtol, maxiter=args.max_iter), **derivatives)
    products = int(getattr(res, "nhev", 0)) * (problem.n if method == "trust-exact" else 1)
    return dict(converged=bool(res.success), fun=float(res.fun), grad_norm=float(np.linalg.norm(w.jac(res.x))),
                nit=int(res.nit), grads=int(res.njev), hvps=products, message=str(res.message))


def run_trlib(method: str, problem, args) -> dict:
    res = trlib.minimize(problem.f, problem.x0(), method=method, gtol=args.gtol, max_iter=args.max_iter)
    return dict(converged=bool(res.success), fun=float(res.fun), grad_norm=float(res.grad_norm), nit=int(res.nit),
                grads=int(res.ngev), hvps=int(res.nhvp), message=res.message)


METHODS = {
    "trlib gltr": lambda p, a: run_trlib("gltr", p, a),
    "trlib cg": lambda p, a: run_trlib("cg", p, a),
    "trlib arc": lambda p, a: run_trlib("arc", p, a),
    "scipy trust-krylov": lambda p, a: run_scipy("trust-krylov", p, a),
    "scipy trust-exact": lambda p, a: run_scipy("trust-exact", p, a),
    "scipy trust-ncg": lambda p, a: run_scipy("trust-ncg", p, a),
}
SHORT = {"trlib gltr": "gltr", "trlib cg": "cg", "trlib arc": "arc", "scipy trust-krylov": "t-krylov", "scipy trust-exact": "t-exact",
         "scipy trust-ncg": "t-ncg"}


def bench_problem(problem, args) -> dict:
    rows = {}
    for method, run in METHODS.items():
        t0 = time.perf_counter()
        out = run(problem, args)
        out["time_s"] = time.perf_counter() - t0
        out["work"] = out["grads"] + out["hvps"]
        out["at_minimum"] = problem.solved(out["fun"])
        out["solved"] = out["converged"] or out["at_minimum"]
        rows[method] = out
    return dict(problem=problem.name, n=problem.n, minima=list(problem.minima), methods=rows)


def print_results(results: List[dict], title: str, count_solved: bool) -> List[str]:
    names = list(METHODS)
    rows = []
    for r in results:
        cells = [f"{o['work']}{'' if o['solved'] or not count_solved else '!'}" for o in (r["methods"][m] for m in names)]
        rows.append([r["problem"], r["n"]] + cells)
        if not count_solved:  # no list of minima: the final values speak
            rows.append(["  final f", ""] + [f"{r['methods'][m]['fun']:.6g}" for m in names])
    totals = {m: sum(r["methods"][m]["work"] for r in results) for m in names}
    solved = {m: sum(r["methods"][m]["solved"] for r in results) for m in names}
    rows.append(["total g+Hv", ""] + [totals[m] for m in names])
    if count_solved:
        rows.append(["solved", ""] + [f"{solved[m]}/{len(results)}" for m in names])
    print(title)
    print(_common.format_table(["problem", "n"] + [SHORT[m] for m in names], rows, "lr" + "r" * len(names)))
    lines = []
    ref = totals["scipy trust-krylov"]
    for m in names:
        failed = [r["problem"] for r in results if not r["methods"][m]["solved"]]
        line = f"{m}: {totals[m]} gradients + products in all ({totals[m] / ref:.2f}x trust-krylov's {ref})"
        if count_solved:
            line += f", solves {solved[m]}/{len(results)}" + (f"; not: {', '.join(failed)}" if failed else "")
        lines.append(line)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="accepted for uniformity; these small problems run on the CPU (float64) either way")
    p.add_argument("--set", choices=["mgh", "extra", "all"], default="all",
                   help="mgh: the 35 MGH problems and Rosenbrock-100; extra: the saddle and chained problems")
    p.add_argument("--problems", default="", help="comma-separated names (a subset of the chosen set)")
    p.add_argument("--gtol", type=float, default=1e-5)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and BLAS (0: library defaults)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    _common.resolve_device(args.device)
    _common.set_threads(args.threads)
    sets = {"mgh": [("MGH problems and extended Rosenbrock-100", MAIN)],
            "extra": [("extras: chained Rosenbrock and saddles", EXTRA)]}
    sets["all"] = sets["mgh"] + sets["extra"]
    wanted = {s.strip() for s in args.problems.split(",") if s.strip()}
    env = _common.environment(torch.device("cpu"))
    settings = dict(gtol=args.gtol, max_iter=args.max_iter, dtype="float64", trlib="defaults",
                    scipy="defaults (initial trust radius 1, max 1000)")
    _common.print_environment("trlib.minimize vs scipy.optimize.minimize: gradients + Hessian-vector products",
                              env, settings)
    t0 = time.perf_counter()
    payload, summary = [], []
    for title, problems in sets[args.set]:
        chosen = [q for q in problems if not wanted or q.name in wanted]
        if not chosen:
            continue
        results = [bench_problem(q, args) for q in chosen]
        lines = print_results(results, title, count_solved=problems is MAIN)
        print()
        for line in lines:
            print(line)
        print()
        payload.append(dict(title=title, results=results))
        summary += lines
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    _common.write_json(args.json, {"benchmark": "bench_minimize", "environment": env, "settings": settings,
                                   "sets": payload, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
