"""trlib.minimize against closed forms and scipy.optimize."""

import numpy as np
import pytest
import scipy.optimize as so
import torch

import trlib


def rosen(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


@pytest.mark.parametrize("method", ["gltr", "cg", "exact"])
@pytest.mark.parametrize("n", [2, 10])
def test_rosenbrock_reaches_the_minimiser(method, n):
    # (-1.2, 1) for n = 2; from there the n = 10 chain has a local minimum (f = 3.99), so start at 0
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64) if n == 2 else torch.zeros(n, dtype=torch.float64)
    res = trlib.minimize(rosen, x0, method=method, gtol=1e-8)
    assert res.success, res.message
    np.testing.assert_allclose(res.x.numpy(), np.ones(n), atol=1e-6)
    assert res.grad_norm <= 1e-8


def _spies(monkeypatch):
    """Count every gradient and every Hessian-vector product minimize asks autograd for."""
    from trlib import curvature

    seen = {"grad": 0, "hvp": 0}
    flat_grad, hvp_double_backward = curvature.flat_grad, curvature.hvp_double_backward

    def counting_grad(*args, **kwargs):
        seen["grad"] += 1
        return flat_grad(*args, **kwargs)

    def counting_hvp(grad, params):
        op = hvp_double_backward(grad, params)

        def hvp(v):
            seen["hvp"] += 1
            return op(v)

        return hvp

    monkeypatch.setattr(curvature, "flat_grad", counting_grad)
    monkeypatch.setattr(curvature, "hvp_double_backward", counting_hvp)
    return seen


@pytest.mark.parametrize("method", ["gltr", "cg", "cauchy", "exact"])
def test_counts_match_spies(method, monkeypatch):
    seen = _spies(monkeypatch)
    calls = []

    def fun(x):
        calls.append(1)
        return rosen(x)

    res = trlib.minimize(fun, torch.tensor([-1.2, 1.0], dtype=torch.float64), method=method, max_iter=300)
    assert res.nfev == len(calls) == 1 + res.nit
    assert res.ngev == seen["grad"] == 1 + sum(h["accepted"] for h in res.history)
    assert res.nhvp == seen["hvp"] > 0
    assert res.nit == len(res.history)
    # the history's products, plus those of the final curvature test
    assert sum(h["hvps"] for h in res.history) <= res.nhvp


@pytest.mark.parametrize("method", ["gltr", "exact", "cauchy"])
def test_rejected_steps_cost_no_products(method, monkeypatch):
    # After a rejection the point is the same: the solver re-solves at the smaller radius from
    # its stored Krylov basis / eigendecomposition / product.
    seen = _spies(monkeypatch)
    per_iteration = []
    res = trlib.minimize(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64), method=method, max_iter=300,
                         callback=lambda x, info: per_iteration.append(seen["hvp"]) and False)
    after_rejection = [i for i in range(1, res.nit) if not res.history[i - 1]["accepted"]]
    assert len(after_rejection) >= 2
    for i in after_rejection:
        assert per_iteration[i] == per_iteration[i - 1] and res.history[i]["hvps"] == 0


def test_convex_quadratic_is_solved_exactly():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 6))
    H = A @ A.T + np.eye(6)
    b = rng.standard_normal(6)
    Ht, bt = torch.tensor(H), torch.tensor(b)
    res = trlib.minimize(lambda x: 0.5 * x @ Ht @ x - bt @ x, torch.zeros(6, dtype=torch.float64),
                         radius=100.0, gtol=1e-10)
    np.testing.assert_allclose(res.x.numpy(), np.linalg.solve(H, b), rtol=1e-9)
    assert res.nit <= 10  # inexact Newton steps (Krylov tolerance min(1/2, sqrt|g|))


def test_escapes_a_strict_saddle_where_scipy_trust_krylov_stops():
    f = lambda x: x[0] ** 2 - x[1] ** 2 + 0.5 * x[1] ** 4  # noqa: E731  minima at (0, +-1), f = -0.5
    res = trlib.minimize(f, torch.zeros(2, dtype=torch.float64))
    assert res.success and res.fun == pytest.approx(-0.5, abs=1e-10)
    assert abs(abs(float(res.x[1])) - 1.0) < 1e-6
    assert any(h["saddle_step"] for h in res.history)
    sp = so.minimize(lambda x: x[0] ** 2 - x[1] ** 2 + 0.5 * x[1] ** 4, np.zeros(2),
                     jac=lambda x: np.array([2 * x[0], -2 * x[1] + 2 * x[1] ** 3]),
                     hessp=lambda x, p: np.array([2 * p[0], (-2 + 6 * x[1] ** 2) * p[1]]), method="trust-krylov")
    assert np.allclose(sp.x, 0.0) and sp.fun == 0.0  # scipy stays at the saddle


def test_stops_at_a_minimum_without_moving():
    res = trlib.minimize(lambda x: (x**2).sum(), torch.zeros(3, dtype=torch.float64))
    assert res.success and res.nit == 0 and torch.count_nonzero(res.x) == 0


def test_ellipsoidal_norm_helps_on_a_badly_scaled_problem():
    scale = torch.tensor([1.0, 1e3], dtype=torch.float64)
    f = lambda x: rosen(x * torch.tensor([1.0, 1e-3], dtype=torch.float64))  # noqa: E731
    x0 = torch.tensor([-1.2, 1e3], dtype=torch.float64)
    sphere = trlib.minimize(f, x0, max_iter=2000, gtol=1e-9)
    ellipse = trlib.minimize(f, x0, norm=trlib.norms.Fixed(1 / scale**2), max_iter=2000, gtol=1e-9)
    assert ellipse.success
    np.testing.assert_allclose(ellipse.x.numpy(), [1.0, 1e3], rtol=1e-8)
    assert ellipse.nit < 0.7 * sphere.nit


def test_callback_and_history():
    seen = []
    res = trlib.minimize(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64),
                         callback=lambda x, info: seen.append(info["iteration"]) or len(seen) >= 5)
    assert res.nit == 5 and seen == [0, 1, 2, 3, 4] and res.message == "stopped by callback"
    for h in res.history:
        assert h["accepted"] == (h["rho"] >= 0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x0=torch.zeros(2, dtype=torch.complex128)), "x0"),  # any real shape is fine (test_minimize_shapes)
    (dict(x0=torch.zeros(2, dtype=torch.int64)), "x0"),
    (dict(method="bfgs"), "method"),
    (dict(gtol=-1.0), "gtol"),
    (dict(radius=0.0), "radius"),
    (dict(max_iter=-1), "max_iter"),
    (dict(eta1=0.9, eta2=0.5), "eta1"),
])
def test_bad_input(kwargs, match):
    args = dict(x0=torch.zeros(2, dtype=torch.float64))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        trlib.minimize(rosen, args.pop("x0"), **args)


def test_nan_at_start_is_a_clear_error():
    with pytest.raises(ValueError, match="x0"):
        trlib.minimize(lambda x: (x / 0).sum() * 0 + float("nan"), torch.ones(2, dtype=torch.float64))


def test_float32_and_lanczos_smallest_eigenpair():
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    eig = np.linspace(-3, 5, 40)
    H = torch.tensor((q * eig) @ q.T)
    value, vector, products = trlib.smallest_eigenpair(lambda v: H @ v, torch.ones(40, dtype=torch.float64))
    assert value == pytest.approx(-3.0, abs=1e-8)
    assert float(torch.linalg.vector_norm(H @ vector - value * vector)) < 1e-6
    # a start inside an invariant subspace that misses the leftmost eigenvector: the restart finds it
    start = torch.tensor(q[:, 5] + q[:, 9])
    value2, _, _ = trlib.smallest_eigenpair(lambda v: H @ v, start)
    assert value2 == pytest.approx(-3.0, abs=1e-6)
    res = trlib.minimize(rosen, torch.tensor([-1.2, 1.0]), gtol=1e-3)
    assert res.x.dtype == torch.float32 and res.success


def test_curvature_test_does_not_depend_on_the_ellipsoid_scale():
    # A strict saddle (smallest eigenvalue -2) must not pass for a minimum in any norm.
    f = lambda z: z[0] ** 2 - z[1] ** 2 + 0.5 * z[1] ** 4  # noqa: E731
    for norm in (None, torch.tensor([100.0, 100.0], dtype=torch.float64), "rms"):
        res = trlib.minimize(f, torch.zeros(2, dtype=torch.float64), norm=norm, htol=0.05)
        assert res.success and res.fun == pytest.approx(-0.5, abs=1e-8), norm


def test_the_curvature_test_is_not_fooled_by_a_krylov_space_that_missed_the_saddle():
    # From (1, 1e-12) the first gradient's Krylov space is span(e1): its leftmost Ritz vector has
    # curvature +2, while the point reached, (0, ~0), is a strict saddle (curvature -2 along e2).
    f = lambda z: z[0] ** 2 - z[1] ** 2 + 0.5 * z[1] ** 4  # noqa: E731
    res = trlib.minimize(f, torch.tensor([1.0, 1e-12], dtype=torch.float64), gtol=1e-8)
    assert res.success and res.fun == pytest.approx(-0.5, abs=1e-10)
    assert any(h["saddle_step"] for h in res.history)


def test_a_step_below_rounding_is_solved_tighter_not_shrunk():
    # The iteration itself: a solve that stops on a loose tolerance returns a step too short to
    # measure; the tolerance is tightened (same radius) before anything is tried or shrunk.
    from trlib.region import RadiusRule, iterate
    from trlib.subproblem import SubproblemResult

    asked = []

    def solve(radius, rtol):
        asked.append(rtol)
        tiny = rtol > 1e-2
        step = torch.tensor([1e-14 if tiny else 1e-2], dtype=torch.float64)
        decrease = torch.tensor(1e-20 if tiny else 1e-4, dtype=torch.float64)
        return SubproblemResult(step, decrease, False, False, 1, None, "interior")

    tried = []
    t = iterate(solve, lambda s: tried.append(float(s)) or 100.0 - 1e-4, lambda: None, 100.0, 1.0,
                RadiusRule(0.1, 0.75, 2.0, 4.0, 10.0), rtol=0.5)
    assert asked == [0.5, 5e-3] and tried == [1e-2]  # the unmeasurable step was never tried
    assert t.accepted and t.radius == 2.0 and t.result.iterations == 2


def test_meyer_reaches_its_minimum_instead_of_collapsing_into_rounding():
    # Moré-Garbow-Hillstrom problem 10: badly scaled (curvatures 1e15 and 1); a loose Krylov
    # tolerance once gave steps of 1e-14 whose rejection drove the radius to zero at f = 114.
    y = torch.tensor([34780.0, 28610, 23650, 19630, 16370, 13720, 11540, 9744, 8261, 7030, 6005, 5147, 4427,
                      3820, 3307, 2872], dtype=torch.float64)
    t = 45 + 5 * torch.arange(1, 17, dtype=torch.float64)

    def meyer(x):
        return torch.sum((x[0] * torch.exp(x[1] / (t + x[2])) - y) ** 2)

    res = trlib.minimize(meyer, torch.tensor([0.02, 4000.0, 250.0], dtype=torch.float64))
    assert res.fun == pytest.approx(87.9458551718, rel=1e-8)  # the paper's minimum
