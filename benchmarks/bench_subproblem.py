r"""trlib's trust-region subproblem solvers vs scipy's, on the same instances.

The subproblem: minimise :math:`m(s) = g^\top s + \frac12 s^\top H s` subject to
:math:`\|s\| \le \Delta` (the sphere; scipy has no ellipsoidal norm). float64 throughout.

Methods (rows of every table):

* ``exact``   ``trlib.solve_subproblem(method="exact")``: Moré-Sorensen in the eigenbasis of
  the dense :math:`H` (one eigendecomposition). It is the reference: *gap* is measured from it;
* ``gltr``    ``trlib.solve_subproblem(method="gltr")``: Lanczos (GLTR), Hessian-vector products only;
* ``cg``      ``trlib.solve_subproblem(method="cg")``: Steihaug-Toint truncated CG (stops at the
  boundary, so it is not meant to reach the optimum on nonconvex or boundary instances);
* ``trust-krylov``  scipy's ``scipy.optimize._trlib.get_trlib_quadratic_subproblem``
  (the TRLIB library, the subproblem of ``minimize(method="trust-krylov")``), products only;
* ``trust-exact``   scipy's ``scipy.optimize._trustregion_exact.IterativeSubproblem``
  (Moré-Sorensen with Cholesky factorisations of the dense :math:`H`; at most 25 iterations,
  scipy's default).

Columns: ``gap`` = :math:`(m(s) - m(s_\text{exact})) / |m(s_\text{exact})|` (0 is optimal; a
negative gap means the method beat ``exact``; a gap of 1e-3 means 0.1 % of the optimal decrease
was left), ``HVPs`` = Hessian-vector products (counted by wrapping the operator each method
calls; ``dense`` for the methods that take the matrix, with their factorisation count),
``||s||/radius`` (feasibility: must be <= 1; 1 means on the boundary), ``status`` and the
median wall time (``--repeats`` after a warm-up; on CUDA, trlib runs on the GPU and scipy on
the CPU; ``--threads``, default 1, CPU threads for torch and BLAS alike). Model values are recomputed in float64 from the dense :math:`H` for every method.

Krylov methods share one tolerance, ``--rtol`` (trlib's ``rtol``, scipy's ``tol_rel_i`` and
``tol_rel_b``): the residual of the (shifted) system relative to :math:`\|g\|`.

Instances (random, fixed seeds): dense symmetric indefinite (``--sizes``), positive definite
with condition number ``--cond`` (interior and boundary solutions), the hard case (``g``
orthogonal to the leftmost eigenvector, radius beyond the hard-case threshold), a near hard
case (``g``'s leftmost component 1e-6), and tiny / huge radius on the indefinite matrix.

Two more sections, where GLTR used to fall short (each instance against the dense float64
optimum, ``frac`` = model decrease / optimal decrease, 1 is optimal):

* **exact hard cases at** ``--hard-rtol`` (1e-10): ``g`` orthogonal to the leftmost eigenvector of
  :math:`A^{-1/2} H A^{-1/2}` (spectrum ``U(-10, 10)``, random ellipsoids over 12 orders of
  magnitude on half of them, radius beyond the hard-case threshold), ``--hard-sizes`` and
  ``--hard-seeds`` of each: GLTR without and with ``certificate=True``, and scipy's
  trust-krylov on the sphere instances at the same tolerance;
* **float32 with badly scaled ellipsoids**: indefinite instances (``--f32-sizes``) with an
  ellipsoid spanning 1e-5 to 12, GLTR in float32 at the default tolerance against float64.

Run: ``python benchmarks/bench_subproblem.py [--sizes 50,200,1000] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time

import numpy as np
import torch

import _common
from trlib import solve_subproblem

try:
    from scipy.optimize._trlib import get_trlib_quadratic_subproblem
    from scipy.optimize._trustregion_exact import IterativeSubproblem
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f"this benchmark needs scipy's private subproblem solvers: {exc}")

METHODS = ("exact", "gltr", "cg", "trust-krylov", "trust-exact")
CERTIFICATE = "certificate" in inspect.signature(solve_subproblem).parameters  # trlib before 2026-12 had none
OURS = ("exact", "gltr", "cg")


# ----------------------------------------------------------------------------- instances
def _orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _from_spectrum(eigs: np.ndarray, coeffs: np.ndarray, rng: np.random.Generator):
    q = _orthogonal(eigs.size, rng)
    h = (q * eigs) @ q.T
    return 0.5 * (h + h.T), q @ coeffs


def make_instances(sizes, special_n: int, cond: float, seed: int):
    """A list of dicts: name, H (n x n float64), g, radius, note."""
    out = []

    def indefinite(n, s):
        rng = np.random.default_rng(s)
        a = rng.standard_normal((n, n))
        return 0.5 * (a + a.T) / math.sqrt(n), rng.standard_normal(n)

    for i, n in enumerate(sizes):
        h, g = indefinite(n, seed + i)
        out.append(dict(name=f"indefinite n={n}", H=h, g=g, radius=1.0,
                        note="(A+A^T)/(2 sqrt n), g ~ N(0, I), radius 1"))
    n = special_n
    rng = np.random.default_rng(seed + 100)
    eigs = np.logspace(0.0, -math.log10(cond), n)
    coeffs = rng.standard_normal(n)
    h, g = _from_spectrum(eigs, coeffs, rng)
    newton = float(np.linalg.norm(coeffs / eigs))
    out.append(dict(name=f"pd cond={cond:.0e} interior n={n}", H=h, g=g, radius=10.0 * newton,
                    note=f"eigenvalues logspace(0, -log10 cond), radius 10 x ||H^-1 g|| = {10 * newton:.2e}"))
    out.append(dict(name=f"pd cond={cond:.0e} boundary n={n}", H=h, g=g, radius=1.0,
                    note=f"same matrix, radius 1 (||H^-1 g|| = {newton:.2e})"))
    rng = np.random.default_rng(seed + 200)
    eigs = np.concatenate([[-1.0], rng.uniform(0.0, 2.0, n - 1)])
    coeffs = rng.standard_normal(n)
    coeffs[0] = 0.0
    coeffs /= np.linalg.norm(coeffs)
    h, g = _from_spectrum(eigs, coeffs, rng)
    out.append(dict(name=f"hard case n={n}", H=h, g=g, radius=10.0,
                    note="lambda_1 = -1 simple, others U(0, 2), g . v_1 = 0, ||g|| = 1, radius 10 (threshold <= 1)"))
    rng = np.random.default_rng(seed + 300)
    eigs = np.concatenate([[-1.0], rng.uniform(0.0, 2.0, n - 1)])
    coeffs = rng.standard_normal(n)
    coeffs[0] = 0.0
    coeffs /= np.linalg.norm(coeffs)
    coeffs[0] = 1e-6
    h, g = _from_spectrum(eigs, coeffs, rng)
    out.append(dict(name=f"near hard case n={n}", H=h, g=g, radius=10.0,
                    note="as the hard case but g . v_1 = 1e-6"))
    h, g = indefinite(n, seed + 400)
    out.append(dict(name=f"tiny radius n={n}", H=h, g=g, radius=1e-6, note="indefinite, radius 1e-6"))
    out.append(dict(name=f"huge radius n={n}", H=h, g=g, radius=1e6, note="indefinite, radius 1e6"))
    return out


# ----------------------------------------------------------------------------- solvers
class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def run_method(method: str, inst: dict, args, device: torch.device, h_t: torch.Tensor, g_t: torch.Tensor):
    """One solve: returns (step as float64 numpy, hvps, work note, status, solve function for timing)."""
    h, g, radius = inst["H"], inst["g"], inst["radius"]
    n = g.size
    if method in OURS:
        def solve():
            op = Counter(lambda v: h_t @ v)
            hvp = h_t if method == "exact" else op
            res = solve_subproblem(g_t, hvp, radius, method=method, rtol=args.rtol)
            return res, op

        res, op = solve()
        if method != "exact" and op.calls != res.iterations:
            raise AssertionError(f"{method}: counted {op.calls} products, result says {res.iterations}")
        hvps = "dense" if method == "exact" else op.calls
        work = "1 eigh" if method == "exact" else ""
        status = res.status
        step = res.step.detach().double().cpu().numpy()
        return step, hvps, work, status, solve
    if method == "trust-krylov":
        factory = get_trlib_quadratic_subproblem(tol_rel_i=args.rtol, tol_rel_b=args.rtol)

        def solve():
            hessp = Counter(lambda x, p: h @ p)
            sp = factory(np.zeros(n), lambda x: 0.0, lambda x: g, None, hessp)
            p, boundary = sp.solve(radius)
            return p, boundary, hessp

        p, boundary, hessp = solve()
        return np.asarray(p, dtype=np.float64), hessp.calls, "", "boundary" if boundary else "interior", solve
    if method == "trust-exact":
        def solve():
            sp = IterativeSubproblem(np.zeros(n), lambda x: 0.0, lambda x: g, lambda x: h)
            p, boundary = sp.solve(radius)
            return p, boundary, sp

        p, boundary, sp = solve()
        return (np.asarray(p, dtype=np.float64), "dense", f"{sp.niter} chol. iter.",
                "boundary" if boundary else "interior", solve)
    raise ValueError(method)


def model(h: np.ndarray, g: np.ndarray, s: np.ndarray) -> float:
    return float(g @ s + 0.5 * s @ (h @ s))


def bench_instance(inst: dict, args, device: torch.device) -> dict:
    h_t = torch.as_tensor(inst["H"], dtype=torch.float64, device=device)
    g_t = torch.as_tensor(inst["g"], dtype=torch.float64, device=device)
    rows = {}
    for method in METHODS:
        step, hvps, work, status, solve = run_method(method, inst, args, device, h_t, g_t)
        timing = _common.time_median(solve, device, repeats=args.repeats, warmup=1)
        rows[method] = dict(model=model(inst["H"], inst["g"], step), hvps=hvps, work=work, status=status,
                            norm_ratio=float(np.linalg.norm(step)) / inst["radius"], time_s=timing["median"])
    ref = rows["exact"]["model"]
    for r in rows.values():
        r["gap"] = (r["model"] - ref) / max(abs(ref), 1e-300)
        r["feasible"] = r["norm_ratio"] <= 1.0 + args.feas_tol
    return dict(name=inst["name"], note=inst["note"], n=int(inst["g"].size), radius=inst["radius"],
                optimal_model=ref, methods=rows)


def print_instance(res: dict) -> None:
    print(f"\n{res['name']}: {res['note']}; optimal m = {res['optimal_model']:.10g}")
    rows = []
    for method, r in res["methods"].items():
        hv = r["hvps"] if not r["work"] or r["hvps"] != "dense" else f"dense ({r['work']})"
        rows.append([method, f"{r['gap']:+.2e}", hv, f"{r['norm_ratio']:.9f}" + ("" if r["feasible"] else " INFEASIBLE"),
                     r["status"], f"{1e3 * r['time_s']:.2f}"])
    print(_common.format_table(["method", "gap", "HVPs", "||s||/radius", "status", "ms"], rows, "lrrrlr"))


def summary_table(results) -> str:
    rows = []
    for r in results:
        m = r["methods"]
        tk = m["trust-krylov"]["hvps"]
        rows.append([r["name"], f"{m['gltr']['gap']:+.1e}", f"{m['trust-krylov']['gap']:+.1e}",
                     f"{m['trust-exact']['gap']:+.1e}" + ("" if m["trust-exact"]["feasible"] else "*"),
                     m["gltr"]["hvps"], m["cg"]["hvps"], tk, f"{m['gltr']['hvps'] / max(tk, 1):.2f}"])
    return _common.format_table(["instance", "gap gltr", "gap t-krylov", "gap t-exact", "HVPs gltr", "HVPs cg",
                                 "HVPs t-krylov", "gltr/t-krylov"], rows)


def summarize(results, args) -> list:
    lines = []
    tk_total = sum(r["methods"]["trust-krylov"]["hvps"] for r in results)
    for method in METHODS:
        gaps = [r["methods"][method]["gap"] for r in results]
        worst = max(gaps)
        worst_name = results[int(np.argmax(gaps))]["name"]
        infeasible = [r["name"] for r in results if not r["methods"][method]["feasible"]]
        hv = [r["methods"][method]["hvps"] for r in results]
        total = sum(hv) if all(isinstance(x, int) for x in hv) else None
        text = f"{method:>12}: worst gap {worst:+.1e} ({worst_name})"
        if total is not None:
            text += f", {total} HVPs in all"
            if method != "trust-krylov" and tk_total:
                text += f" ({total / tk_total:.2f}x trust-krylov's {tk_total})"
        else:
            text += ", dense matrix"
        text += "; all feasible" if not infeasible else f"; INFEASIBLE on {', '.join(infeasible)}"
        lines.append(text)
    gltr_gap = max(abs(r["methods"]["gltr"]["gap"]) for r in results)
    gltr_total = sum(r["methods"]["gltr"]["hvps"] for r in results)
    tk_gap = max(abs(r["methods"]["trust-krylov"]["gap"]) for r in results)
    lines.append(f"gltr reaches the optimal model value within {gltr_gap:.1e} relative in all {len(results)} instances, "
                 f"using {gltr_total} HVPs vs trust-krylov's {tk_total} (trust-krylov: within {tk_gap:.1e})")
    both = [r for r in results if abs(r["methods"]["trust-krylov"]["gap"]) <= 1e-6]
    if both:
        ratios = sorted(r["methods"]["gltr"]["hvps"] / max(r["methods"]["trust-krylov"]["hvps"], 1) for r in both)
        lines.append(f"on the {len(both)} instances where trust-krylov is within 1e-6 too: gltr uses "
                     f"{sum(r['methods']['gltr']['hvps'] for r in both)} HVPs vs "
                     f"{sum(r['methods']['trust-krylov']['hvps'] for r in both)} (per-instance ratio "
                     f"{ratios[0]:.2f} to {ratios[-1]:.2f}, median {float(np.median(ratios)):.2f})")
    better = [r["name"] for r in results
              if r["methods"]["gltr"]["gap"] > r["methods"]["trust-krylov"]["gap"] + args.rtol]
    if better:
        lines.append("trust-krylov reaches a lower model value than gltr (by more than rtol) on: " + ", ".join(better))
    return lines


# ----------------------------------------------------------------------------- where GLTR used to fall short
def _reference(h, g, radius, a):
    """The optimal decrease of the ellipsoidal problem, from a dense float64 eigendecomposition."""
    ht, gt = torch.as_tensor(h, dtype=torch.float64), torch.as_tensor(g, dtype=torch.float64)
    at = None if a is None else torch.as_tensor(a, dtype=torch.float64)
    res = solve_subproblem(gt, ht, radius, ellipsoid=at, method="exact")
    return -model(h, g, res.step.numpy())


def hard_instance(n: int, seed: int):
    rng = np.random.default_rng(seed)
    q = _orthogonal(n, rng)
    h = (q * np.sort(rng.uniform(-10, 10, n))) @ q.T
    h = 0.5 * (h + h.T)
    a = 10 ** rng.uniform(-6, 6, n) if seed % 2 else None
    d = np.ones(n) if a is None else 1 / np.sqrt(a)
    w, v = np.linalg.eigh(d[:, None] * h * d[None, :])
    gt = d * rng.standard_normal(n)
    gt -= v[:, 0] * (v[:, 0] @ gt)  # no component along the leftmost eigenvector, in the region's metric
    c = v.T @ gt
    threshold = float(np.linalg.norm(c[1:] / np.maximum(w[1:] - w[0], 1e-300)))  # ||(H~ - lambda_1)^+ g~||
    return h, gt / d, 10 * max(threshold, 1.0), a


def hard_cases(args, device) -> dict:
    rows, worst = [], {}
    for n in [int(x) for x in args.hard_sizes.split(",")]:
        fracs = {"gltr": [], "gltr+certificate": [], "trust-krylov (sphere)": []}
        hvps = {k: 0 for k in fracs}
        for seed in range(args.hard_seeds):
            h, g, radius, a = hard_instance(n, 1000 * n + seed)
            best = _reference(h, g, radius, a)
            ht, gt = (torch.as_tensor(x, dtype=torch.float64, device=device) for x in (h, g))
            at = None if a is None else torch.as_tensor(a, dtype=torch.float64, device=device)
            for key, extra in (("gltr", {}), ("gltr+certificate", {"certificate": True})):
                if extra and not CERTIFICATE:
                    continue
                op = Counter(lambda v: ht @ v)
                res = solve_subproblem(gt, op, radius, ellipsoid=at, method="gltr", rtol=args.hard_rtol, **extra)
                fracs[key].append(-model(h, g, res.step.double().cpu().numpy()) / best)
                hvps[key] += op.calls
            if a is None:
                hessp = Counter(lambda x, p: h @ p)
                sp = get_trlib_quadratic_subproblem(tol_rel_i=args.hard_rtol, tol_rel_b=args.hard_rtol)(
                    np.zeros(n), lambda x: 0.0, lambda x: g, None, hessp)
                fracs["trust-krylov (sphere)"].append(-model(h, g, np.asarray(sp.solve(radius)[0])) / best)
                hvps["trust-krylov (sphere)"] += hessp.calls
        for key, f in fracs.items():
            if f:
                rows.append([n, key, len(f), f"{min(f):.6f}", f"{float(np.median(f)):.6f}", f"{hvps[key] / len(f):.1f}"])
                worst[key] = min(worst.get(key, 1.0), min(f))
    table = _common.format_table(["n", "solver", "instances", "worst frac", "median frac", "HVPs/instance"], rows,
                                 "rlrrrr")
    return dict(table=table, worst=worst)


def float32_cases(args, device) -> dict:
    rows, worst = [], {}
    for n in [int(x) for x in args.f32_sizes.split(",")]:
        fracs = {"float32": [], "float64": []}
        for seed in range(args.f32_seeds):
            rng = np.random.default_rng(50_000 + 100 * n + seed)
            q = _orthogonal(n, rng)
            h = (q * np.sort(rng.uniform(-10, 10, n))) @ q.T
            h = 0.5 * (h + h.T)
            g = rng.standard_normal(n)
            a = np.exp(rng.uniform(math.log(1e-5), math.log(12.0), n))
            a[:2] = 1e-5, 12.0
            radius = 10 ** rng.uniform(-2, 1)
            best = _reference(h, g, radius, a)
            for key, dtype in (("float32", torch.float32), ("float64", torch.float64)):
                ht, gt, at = (torch.as_tensor(x, dtype=dtype, device=device) for x in (h, g, a))
                res = solve_subproblem(gt, lambda v: ht @ v, radius, ellipsoid=at, method="gltr")
                fracs[key].append(-model(h, g, res.step.double().cpu().numpy()) / best)
        for key, f in fracs.items():
            rows.append([n, key, len(f), f"{min(f):.6f}", f"{float(np.median(f)):.6f}"])
            worst[key] = min(worst.get(key, 1.0), min(f))
    table = _common.format_table(["n", "dtype", "instances", "worst frac", "median frac"], rows, "rlrrr")
    return dict(table=table, worst=worst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where trlib's solvers run (scipy: CPU)")
    p.add_argument("--sizes", default="50,200,1000", help="dimensions of the random indefinite instances")
    p.add_argument("--special-n", type=int, default=200, help="dimension of the other instances")
    p.add_argument("--cond", type=float, default=1e6, help="condition number of the positive definite instances")
    p.add_argument("--rtol", type=float, default=1e-6, help="Krylov tolerance (trlib rtol, scipy tol_rel_i/tol_rel_b)")
    p.add_argument("--feas-tol", type=float, default=1e-8, help="||s||/radius above 1 + this is reported infeasible")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch and BLAS (0: library defaults; >1 slows these small problems down)")
    p.add_argument("--hard-sizes", default="5,20,50,200", help="dimensions of the exact hard cases")
    p.add_argument("--hard-seeds", type=int, default=6, help="hard-case instances per dimension")
    p.add_argument("--hard-rtol", type=float, default=1e-10, help="GLTR's (and trust-krylov's) tolerance there")
    p.add_argument("--f32-sizes", default="5,50", help="dimensions of the float32 instances")
    p.add_argument("--f32-seeds", type=int, default=50, help="float32 instances per dimension")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = _common.resolve_device(args.device)
    _common.set_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    env = _common.environment(device)
    settings = dict(sizes=sizes, special_n=args.special_n, cond=args.cond, rtol=args.rtol, repeats=args.repeats,
                    seed=args.seed, dtype="float64")
    _common.print_environment("Trust-region subproblem: trlib vs scipy", env, settings)
    t0 = time.perf_counter()
    results = []
    for inst in make_instances(sizes, args.special_n, args.cond, args.seed):
        res = bench_instance(inst, args, device)
        print_instance(res)
        results.append(res)
    print("\nSummary per instance (gap relative to trlib's exact solver; * = infeasible step, ||s|| > radius)")
    table = summary_table(results)
    print(table)
    print("\nSummary over instances (HVPs summed)")
    lines = summarize(results, args)
    for line in lines:
        print(line)
    hard = hard_cases(args, device)
    print(f"\nExact hard cases at rtol={args.hard_rtol:g} (frac = model decrease / optimal decrease)")
    print(hard["table"])
    f32 = float32_cases(args, device)
    print("\nfloat32 with ellipsoids spanning 1e-5 .. 12 (GLTR, default tolerance)")
    print(f32["table"])
    for key, value in list(hard["worst"].items()) + list(f32["worst"].items()):
        line = f"worst fraction of the optimal decrease, {key}: {value:.6f}"
        print(line)
        lines.append(line)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    _common.write_json(args.json, {"benchmark": "bench_subproblem", "environment": env, "settings": settings,
                                   "results": results, "summary_table": table, "summary": lines,
                                   "hard_cases": hard, "float32": f32})
    return 0


if __name__ == "__main__":
    sys.exit(main())
