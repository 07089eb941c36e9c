r"""``trlib.minimize`` vs ``scipy.optimize.minimize`` (trust-krylov, trust-ncg) on test functions.

Each problem is written once in torch. trlib gets the torch function; scipy gets NumPy
wrappers of the same function whose gradient and Hessian-vector product come from torch
autograd (``jac`` and ``hessp``), so both sides see exactly the same derivatives. Work is
counted in the same units on both sides:

* trlib: ``nfev`` function values, ``ngev`` gradients, ``nhvp`` Hessian-vector products
  (``MinimizeResult``);
* scipy: ``nfev``, ``njev`` (gradients), ``nhev`` (calls of ``hessp``).

The table reports, per problem and method: success, final ``f``, final gradient norm,
iterations, ``nfev``, gradients, HVPs, their sum ``g+Hv``, and the ratio of that sum to
trust-krylov's on the same problem (``/t-krylov``; below 1: trlib used fewer derivative
evaluations). All methods stop at ``||grad|| <= --gtol`` (1e-5); trlib additionally checks
the curvature there (smallest Hessian eigenvalue above ``-htol`` by Lanczos, counted in its
HVPs) and leaves strict saddle points, which scipy cannot see. Iteration limit ``--max-iter``
for everyone, float64, single-threaded by default (``--threads``). ``ms`` is the median
wall time of ``--repeats`` runs after a warm-up (scipy's time includes the NumPy <-> torch
wrapping).

Problems (standard starting points; Moré, Garbow & Hillstrom 1981 where applicable):
Rosenbrock (chained; n = 2, 10, 100; start (-1.2, 1, -1.2, 1, ...)), extended Powell
singular (n = 8, start (3, -1, 0, 1, ...); singular Hessian at the solution), Beale (start
(1, 1)), Freudenstein-Roth (start (0.5, -2); a local minimum with f = 48.98 competes with
the global one, f = 0), a nonconvex quartic with a saddle (n = 10, wells in every other
coordinate, start 1e-3 * (1, ..., 1) next to the saddle at 0), and the "saddle start"
row: f(x) = x0^2 - x1^2 + x1^4 started exactly at the strict saddle 0 (gradient 0), where
scipy stops at once (f = 0) and trlib should escape to f = -0.25.

Run: ``python benchmarks/bench_minimize.py [--problems rosenbrock-2,beale] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import torch
from scipy.optimize import minimize as scipy_minimize

import _common
import trlib

DTYPE = torch.float64


# ----------------------------------------------------------------------------- problems (torch)
def rosenbrock(x):
    return torch.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def powell_singular(x):
    a, b, c, d = x.view(-1, 4).unbind(1)
    return torch.sum((a + 10 * b) ** 2 + 5 * (c - d) ** 2 + (b - 2 * c) ** 4 + 10 * (a - d) ** 4)


def beale(x):
    u, v = x[0], x[1]
    return (1.5 - u + u * v) ** 2 + (2.25 - u + u * v**2) ** 2 + (2.625 - u + u * v**3) ** 2


def freudenstein_roth(x):
    u, v = x[0], x[1]
    return (-13 + u + ((5 - v) * v - 2) * v) ** 2 + (-29 + u + ((v + 1) * v - 14) * v) ** 2


def quartic_saddle(x):
    """sum_i x_i^4/4 - d_i x_i^2/2 + 0.05 sum_i (x_{i+1} - x_i)^2 with d = (1, -1, 1, -1, ...):
    a strict saddle at 0 (Hessian eigenvalues down to about -1), minima near x_i = +-1 in the
    odd coordinates."""
    d = torch.ones_like(x)
    d[1::2] = -1.0
    return torch.sum(0.25 * x**4 - 0.5 * d * x**2) + 0.05 * torch.sum((x[1:] - x[:-1]) ** 2)


def saddle_2d(x):
    return x[0] ** 2 - x[1] ** 2 + x[1] ** 4


def _alternating(n, a, b):
    return np.array([a if i % 2 == 0 else b for i in range(n)], dtype=np.float64)


PROBLEMS: Dict[str, dict] = {
    "rosenbrock-2": dict(fun=rosenbrock, x0=_alternating(2, -1.2, 1.0), fmin=0.0),
    "rosenbrock-10": dict(fun=rosenbrock, x0=_alternating(10, -1.2, 1.0), fmin=0.0),
    "rosenbrock-100": dict(fun=rosenbrock, x0=_alternating(100, -1.2, 1.0), fmin=0.0),
    "powell-8": dict(fun=powell_singular, x0=np.tile([3.0, -1.0, 0.0, 1.0], 2), fmin=0.0),
    "beale": dict(fun=beale, x0=np.array([1.0, 1.0]), fmin=0.0),
    "freudenstein-roth": dict(fun=freudenstein_roth, x0=np.array([0.5, -2.0]), fmin=0.0),
    "quartic-saddle-10": dict(fun=quartic_saddle, x0=np.full(10, 1e-3), fmin=None),
    "saddle-start": dict(fun=saddle_2d, x0=np.zeros(2), fmin=-0.25),
}


# ----------------------------------------------------------------------------- scipy side
class NumpyWrapper:
    """fun / jac / hessp of a torch function for scipy; autograd does the derivatives.

    The gradient graph at the last ``x`` is cached so that successive ``hessp`` calls at the
    same point cost one backward pass each (as trlib's do); scipy's own counters (``nfev``,
    ``njev``, ``nhev``) count calls, independent of the caching.
    """

    def __init__(self, fun: Callable):
        self.f = fun
        self._key = None
        self._x = None
        self._g = None

    def fun(self, x):
        with torch.no_grad():
            return float(self.f(torch.as_tensor(x, dtype=DTYPE)))

    def _graph(self, x):
        key = x.tobytes()
        if key != self._key:
            xt = torch.tensor(x, dtype=DTYPE, requires_grad=True)
            (g,) = torch.autograd.grad(self.f(xt), xt, create_graph=True)
            self._key, self._x, self._g = key, xt, g
        return self._x, self._g

    def jac(self, x):
        xt = torch.tensor(x, dtype=DTYPE, requires_grad=True)
        (g,) = torch.autograd.grad(self.f(xt), xt)
        return g.numpy()

    def hessp(self, x, p):
        xt, g = self._graph(np.asarray(x, dtype=np.float64))
        if not g.requires_grad:
            return np.zeros_like(p)
        (hv,) = torch.autograd.grad(g, xt, grad_outputs=torch.as_tensor(p, dtype=DTYPE), retain_graph=True)
        return hv.numpy()


def run_scipy(method: str, prob: dict, args) -> dict:
    w = NumpyWrapper(prob["fun"])
    res = scipy_minimize(w.fun, prob["x0"].copy(), method=method, jac=w.jac, hessp=w.hessp,
                         options=dict(gtol=args.gtol, maxiter=args.max_iter))
    grad_norm = float(np.linalg.norm(w.jac(res.x)))
    return dict(success=bool(res.success), fun=float(res.fun), grad_norm=grad_norm, nit=int(res.nit),
                nfev=int(res.nfev), grads=int(res.njev), hvps=int(getattr(res, "nhev", 0)), message=str(res.message),
                x=res.x.tolist())


def run_trlib(method: str, prob: dict, args) -> dict:
    x0 = torch.as_tensor(prob["x0"], dtype=DTYPE)
    res = trlib.minimize(prob["fun"], x0, method=method, gtol=args.gtol, max_iter=args.max_iter)
    return dict(success=bool(res.success), fun=float(res.fun), grad_norm=float(res.grad_norm), nit=int(res.nit),
                nfev=int(res.nfev), grads=int(res.ngev), hvps=int(res.nhvp), message=res.message,
                x=res.x.tolist())


METHODS = {
    "trlib gltr": lambda prob, args: run_trlib("gltr", prob, args),
    "trlib cg": lambda prob, args: run_trlib("cg", prob, args),
    "scipy trust-krylov": lambda prob, args: run_scipy("trust-krylov", prob, args),
    "scipy trust-ncg": lambda prob, args: run_scipy("trust-ncg", prob, args),
}


def bench_problem(name: str, args, device) -> dict:
    prob = PROBLEMS[name]
    rows = {}
    for method, run in METHODS.items():
        out = run(prob, args)
        timing = _common.time_median(lambda: run(prob, args), device, repeats=args.repeats, warmup=1)
        out["time_s"] = timing["median"]
        out["work"] = out["grads"] + out["hvps"]
        rows[method] = out
    ref = rows["scipy trust-krylov"]["work"]
    for out in rows.values():
        out["ratio_to_trust_krylov"] = out["work"] / ref if ref else math.inf
    return dict(problem=name, n=int(prob["x0"].size), fmin=prob["fmin"], methods=rows)


def print_results(results: List[dict]) -> None:
    rows = []
    for r in results:
        for method, o in r["methods"].items():
            rows.append([f"{r['problem']} (n={r['n']})", method, "yes" if o["success"] else "NO", f"{o['fun']:.6g}",
                         f"{o['grad_norm']:.1e}", o["nit"], o["nfev"], o["grads"], o["hvps"], o["work"],
                         f"{o['ratio_to_trust_krylov']:.2f}", f"{1e3 * o['time_s']:.1f}"])
        rows.append([""] * 12)
    rows.pop()
    print(_common.format_table(["problem", "method", "success", "final f", "||g||", "nit", "nfev", "grads", "HVPs",
                                "g+Hv", "/t-krylov", "ms"], rows, "llrrrrrrrrrr"))


def summarize(results: List[dict]) -> List[str]:
    lines = []
    regular = [r for r in results if r["problem"] != "saddle-start"]
    for method in ("trlib gltr", "trlib cg"):
        if not regular:
            break
        ratios = [r["methods"][method]["ratio_to_trust_krylov"] for r in regular]
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        worst = max(regular, key=lambda r: r["methods"][method]["ratio_to_trust_krylov"])
        best = min(regular, key=lambda r: r["methods"][method]["ratio_to_trust_krylov"])
        succ = sum(r["methods"][method]["success"] for r in regular)
        lines.append(f"{method}: (grads + HVPs) / trust-krylov's: geometric mean {geo:.2f} over {len(regular)} problems, "
                     f"from {best['methods'][method]['ratio_to_trust_krylov']:.2f} ({best['problem']}) "
                     f"to {worst['methods'][method]['ratio_to_trust_krylov']:.2f} ({worst['problem']}); "
                     f"success {succ}/{len(regular)}")
    for method in ("scipy trust-krylov", "scipy trust-ncg"):
        succ = sum(r["methods"][method]["success"] for r in regular)
        lines.append(f"{method}: success {succ}/{len(regular)}")
    lower = []
    for r in regular:
        f = {m: o["fun"] for m, o in r["methods"].items()}
        best_scipy = min(f["scipy trust-krylov"], f["scipy trust-ncg"])
        if f["trlib gltr"] < best_scipy - 1e-6 * max(1.0, abs(best_scipy)):
            lower.append(f"{r['problem']} (gltr {f['trlib gltr']:.4g} vs scipy {best_scipy:.4g})")
        elif f["trlib gltr"] > best_scipy + 1e-6 * max(1.0, abs(best_scipy)):
            lower.append(f"{r['problem']} (scipy lower: gltr {f['trlib gltr']:.4g} vs scipy {best_scipy:.4g})")
    if lower:
        lines.append("final f differs (beyond 1e-6 relative) on: " + "; ".join(lower))
    saddle = [r for r in results if r["problem"] == "saddle-start"]
    if saddle:
        m = saddle[0]["methods"]
        lines.append("saddle start (f = x0^2 - x1^2 + x1^4 at 0): final f "
                     + ", ".join(f"{k} {o['fun']:.4g}" for k, o in m.items()))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="accepted for uniformity; these small problems run on the CPU (float64) either way")
    p.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated subset of: " + ", ".join(PROBLEMS))
    p.add_argument("--gtol", type=float, default=1e-5)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and BLAS (0: library defaults)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    names = [s.strip() for s in args.problems.split(",") if s.strip()]
    for s in names:
        if s not in PROBLEMS:
            p.error(f"unknown problem {s!r}; choose from {', '.join(PROBLEMS)}")
    _common.resolve_device(args.device)
    device = torch.device("cpu")
    _common.set_threads(args.threads)
    torch.manual_seed(0)

    env = _common.environment(device)
    settings = dict(gtol=args.gtol, max_iter=args.max_iter, repeats=args.repeats, dtype="float64",
                    trlib_htol=1e-6, trlib_radius0=1.0, scipy_radius0=1.0)
    _common.print_environment("trlib.minimize vs scipy.optimize.minimize (trust-region Newton)", env, settings)
    t0 = time.perf_counter()
    results = [bench_problem(name, args, device) for name in names]
    print_results(results)
    print()
    lines = summarize(results)
    for line in lines:
        print(line)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    _common.write_json(args.json, {"benchmark": "bench_minimize", "environment": env, "settings": settings,
                                   "results": results, "summary": lines})
    return 0


if __name__ == "__main__":
    sys.exit(main())
