"""The ARC subproblem solvers against a dense NumPy/SciPy reference on generated instances."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

from trlib.cubic import CubicSolver, cubic_model, solve_cubic


# ----------------------------------------------------------------------------- reference (NumPy/SciPy only)
def cubic_reference(H, g, sigma, ellipsoid=None):
    """Global minimiser of g.s + s.H.s/2 + sigma/3 ||s||_A^3 (float64): eigh + brentq on ||x(lam)|| = lam/sigma."""
    d = np.ones_like(g) if ellipsoid is None else 1.0 / np.sqrt(ellipsoid)
    w, V = np.linalg.eigh(d[:, None] * H * d[None, :])
    c = V.T @ (d * g)
    scale = max(np.abs(w).max(), 1e-300)
    lam_low = max(0.0, -w[0])

    def x_of(lam, keep=None):
        mask = (c != 0) if keep is None else (c != 0) & keep
        x = np.zeros_like(c)
        x[mask] = -c[mask] / (w[mask] + lam)
        return x

    group = w <= w[0] + 1e-9 * scale
    if not np.any(c):
        if w[0] >= 0:
            return np.zeros_like(g), 0.0
        return d * V[:, 0] * lam_low / sigma, lam_low
    if w[0] < 0 and np.linalg.norm(c[group]) <= 1e-12 * np.linalg.norm(c):
        rest = x_of(lam_low, keep=~group)
        if np.linalg.norm(rest) <= lam_low / sigma:  # the hard case
            return d * (V @ rest + math.sqrt((lam_low / sigma) ** 2 - rest @ rest) * V[:, 0]), lam_low
    f = lambda lam: np.linalg.norm(x_of(lam)) - lam / sigma  # noqa: E731
    hi = lam_low + math.sqrt(sigma * np.linalg.norm(c)) + 1.0
    step = max(lam_low, 1e-300) * 1e-15
    with np.errstate(over="ignore", divide="ignore"):
        while not np.isfinite(f(lam_low + step)):  # a pole at lam_low: start where f is finite
            step *= 2
    lo = lam_low + step
    if f(lo) <= 0:  # the root is closer to lam_low than float64 resolves
        return d * (V @ x_of(lo)), lo
    lam = brentq(f, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=1000)
    return d * (V @ x_of(lam)), lam


def model(H, g, sigma, s, ellipsoid=None):
    a = np.ones_like(g) if ellipsoid is None else ellipsoid
    return float(g @ s + 0.5 * s @ H @ s + sigma / 3 * np.sqrt(np.sum(a * s * s)) ** 3)


def _scale(H, g, sigma, ellipsoid, s_ref):
    # the size of the model's terms at the solution, in the region's variables
    a = np.ones_like(g) if ellipsoid is None else ellipsoid
    d = 1 / np.sqrt(a)
    r = math.sqrt(np.sum(a * s_ref * s_ref))
    top = np.abs(np.linalg.eigvalsh(d[:, None] * H * d[None, :])).max()
    return np.linalg.norm(d * g) * r + top * r**2 + sigma * r**3 + 1e-300


KINDS = ("indefinite", "positive", "singular", "hard", "zero_gradient")


@st.composite
def instances(draw, kinds=KINDS, max_n=10):
    """A symmetric H (eigenvalues and rotation drawn), g, sigma and ellipsoid."""
    n = draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = rng.uniform(-10, 10, n)
    if kind == "positive":
        eig = np.abs(eig) + 0.1
    elif kind == "singular":
        eig[: max(1, n // 2)] = 0.0
        eig = np.abs(eig)
    H = (q * np.sort(eig)) @ q.T
    H = 0.5 * (H + H.T)
    g = rng.standard_normal(n) * 10 ** rng.uniform(-2, 2)
    ellipsoid = 10 ** rng.uniform(-6, 6, n) if draw(st.booleans()) else None  # 12 orders of magnitude
    sigma = 10 ** draw(st.floats(-3, 3))
    if kind == "hard" and n > 1:
        # g orthogonal (in the region's metric) to the leftmost eigenvector, sigma small enough
        d = np.ones(n) if ellipsoid is None else 1 / np.sqrt(ellipsoid)
        w, V = np.linalg.eigh(d[:, None] * H * d[None, :])
        if w[0] >= 0:
            H = H - (w[0] + 1.0) * np.diag(1 / d**2)
            w, V = np.linalg.eigh(d[:, None] * H * d[None, :])
        gt = d * g - V[:, 0] * (V[:, 0] @ (d * g))
        g = gt / d
        rest = np.linalg.norm((V.T @ gt)[1:] / (w[1:] - w[0]))
        sigma = -w[0] / max(rest, 1e-300) * 10 ** -draw(st.floats(0.01, 2))
    elif kind == "zero_gradient":
        g = np.zeros(n)
    return H, g, sigma, ellipsoid


def _run(H, g, sigma, ellipsoid, method, dtype=torch.float64, **kw):
    Ht = torch.tensor(H, dtype=dtype)
    a = None if ellipsoid is None else torch.tensor(ellipsoid, dtype=dtype)
    return solve_cubic(torch.tensor(g, dtype=dtype), lambda v: Ht @ v, sigma, ellipsoid=a, method=method, **kw)


SETTINGS = dict(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(**SETTINGS)
@given(instances())
def test_exact_matches_reference_float64(inst):
    H, g, sigma, ellipsoid = inst
    res = _run(H, g, sigma, ellipsoid, "exact")
    s = res.step.numpy()
    s_ref, _ = cubic_reference(H, g, sigma, ellipsoid)
    scale = _scale(H, g, sigma, ellipsoid, s_ref)
    assert model(H, g, sigma, s, ellipsoid) <= model(H, g, sigma, s_ref, ellipsoid) + 1e-9 * scale
    assert abs(float(res.model_decrease) + model(H, g, sigma, s, ellipsoid)) <= 1e-9 * scale
    assert res.iterations == len(g)


@settings(**SETTINGS)
@given(instances())
def test_exact_satisfies_the_global_optimality_certificate(inst):
    # (H + lam A) s = -g, lam = sigma ||s||_A, H + lam A >= 0 (Cartis, Gould & Toint 2011, Thm 3.1)
    H, g, sigma, ellipsoid = inst
    res = _run(H, g, sigma, ellipsoid, "exact")
    s, lam = res.step.numpy(), res.multiplier
    a = np.ones_like(g) if ellipsoid is None else ellipsoid
    d = 1 / np.sqrt(a)
    u_norm = math.sqrt(np.sum(a * s * s))
    Ht = d[:, None] * H * d[None, :]
    size = np.abs(np.linalg.eigvalsh(Ht)).max() + lam
    assert lam == pytest.approx(sigma * u_norm, rel=1e-9, abs=1e-300)
    assert np.linalg.norm(d * ((H + lam * np.diag(a)) @ s + g)) <= 1e-8 * (np.linalg.norm(d * g) + size * u_norm + 1e-300)
    assert np.linalg.eigvalsh(Ht + lam * np.eye(len(g)))[0] >= -1e-8 * max(size, 1e-300)


@settings(**SETTINGS)
@given(instances())
def test_lanczos_reaches_the_optimum_with_enough_iterations(inst):
    # rtol=0: no early stop, the Lanczos basis (restarted on breakdown) spans the space
    H, g, sigma, ellipsoid = inst
    res = _run(H, g, sigma, ellipsoid, "lanczos", rtol=0.0)
    s = res.step.numpy()
    s_ref, _ = cubic_reference(H, g, sigma, ellipsoid)
    scale = _scale(H, g, sigma, ellipsoid, s_ref)
    assert model(H, g, sigma, s, ellipsoid) <= model(H, g, sigma, s_ref, ellipsoid) + 1e-7 * scale
    assert abs(float(res.model_decrease) + model(H, g, sigma, s, ellipsoid)) <= 1e-7 * scale
    assert res.iterations <= len(g)


@settings(**SETTINGS)
@given(instances(kinds=("indefinite", "positive", "singular", "zero_gradient")))
def test_lanczos_default_tolerance_close_to_optimum(inst):
    H, g, sigma, ellipsoid = inst
    res = _run(H, g, sigma, ellipsoid, "lanczos")
    s = res.step.numpy()
    s_ref, _ = cubic_reference(H, g, sigma, ellipsoid)
    scale = _scale(H, g, sigma, ellipsoid, s_ref)
    assert model(H, g, sigma, s, ellipsoid) <= model(H, g, sigma, s_ref, ellipsoid) + 1e-6 * scale


@pytest.mark.parametrize("method", ["lanczos", "exact"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(kinds=("indefinite", "positive", "hard")))
def test_float32_with_badly_scaled_ellipsoids(method, inst):
    H, g, sigma, ellipsoid = inst
    res = _run(H, g, sigma, ellipsoid, method, dtype=torch.float32, rtol=0.0)
    assert res.step.dtype == torch.float32
    s = res.step.double().numpy()
    assert np.all(np.isfinite(s))
    s_ref, _ = cubic_reference(H, g, sigma, ellipsoid)
    best = model(H, g, sigma, s_ref, ellipsoid)
    # at least 99% of the optimal decrease, or within a few float32 roundings of the model's terms
    # (an ellipsoid over 12 orders can push curvature below float32's resolution of the products)
    assert model(H, g, sigma, s, ellipsoid) <= max(0.99 * best, best + 1e-6 * _scale(H, g, sigma, ellipsoid, s_ref))


# ----------------------------------------------------------------------------- closed forms and behaviour
@pytest.mark.parametrize("g, h, sigma", [(1.0, 2.0, 3.0), (-2.0, -1.0, 0.5), (0.3, 0.0, 1e-3), (5.0, 1e3, 10.0)])
@pytest.mark.parametrize("method", ["lanczos", "exact"])
def test_one_dimensional_closed_form(g, h, sigma, method):
    # s = -sign(g) t with h t + sigma t^2 = |g|, the positive root
    t = (-h + math.sqrt(h * h + 4 * sigma * abs(g))) / (2 * sigma)
    res = solve_cubic(torch.tensor([g], dtype=torch.float64), torch.tensor([[h]], dtype=torch.float64), sigma,
                      method=method)
    assert float(res.step[0]) == pytest.approx(-math.copysign(t, g), rel=1e-12)
    assert res.multiplier == pytest.approx(sigma * t, rel=1e-12)
    assert float(res.model_decrease) == pytest.approx(abs(g) * t - 0.5 * h * t * t - sigma / 3 * t**3, rel=1e-10)


def test_vanishing_sigma_gives_the_newton_step():
    rng = np.random.default_rng(1)
    B = rng.standard_normal((6, 6))
    H = B @ B.T + np.eye(6)
    g = rng.standard_normal(6)
    newton = -np.linalg.solve(H, g)
    for method in ("lanczos", "exact"):
        res = _run(H, g, 1e-12, None, method, rtol=1e-12)
        np.testing.assert_allclose(res.step.numpy(), newton, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["lanczos", "exact"])
def test_hard_case(method):
    # g orthogonal to the negative-curvature direction: the step needs it, and Lanczos must restart to see it
    H, g, sigma = np.diag([-2.0, 1.0, 3.0, 5.0]), np.array([0.0, 1.0, 1.0, 1.0]), 0.1
    s_ref, lam_ref = cubic_reference(H, g, sigma)
    res = _run(H, g, sigma, None, method)
    s = res.step.numpy()
    assert lam_ref == 2.0 and res.multiplier == pytest.approx(2.0, rel=1e-10)
    assert model(H, g, sigma, s) == pytest.approx(model(H, g, sigma, s_ref), rel=1e-10)
    assert np.linalg.norm(s) == pytest.approx(2.0 / sigma, rel=1e-10) and abs(s[0]) > 19
    assert res.status == "hard_case" and res.negative_curvature


@pytest.mark.parametrize("method", ["lanczos", "exact"])
def test_zero_gradient_at_a_saddle_moves_along_the_leftmost_eigenvector(method):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    H = (q * np.array([-3.0, -1.0, 0.5, 1.0, 2.0, 4.0])) @ q.T
    res = _run(H, np.zeros(6), 2.0, None, method)
    s = res.step.numpy()
    assert np.linalg.norm(s) == pytest.approx(3.0 / 2.0, rel=1e-8)
    assert abs(q[:, 0] @ s) == pytest.approx(1.5, rel=1e-8)
    assert float(res.model_decrease) == pytest.approx(27 / (6 * 4), rel=1e-8)  # -theta^3 / (6 sigma^2)


def test_zero_gradient_convex_stays_put():
    res = _run(np.diag([1.0, 2.0]), np.zeros(2), 1.0, None, "lanczos")
    assert res.status == "zero_gradient" and not torch.any(res.step) and float(res.model_decrease) == 0.0


def _scaled_problem(seed, n, top):
    """An indefinite H with eigenvalues -1 .. top, a gradient and an ellipsoid spanning 1e-2 .. 1e2."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.linspace(-1.0, top, n)) @ q.T, rng.standard_normal(n), 10 ** rng.uniform(-2, 2, n)


def test_stopping_rule_holds_and_saves_products():
    # with rtol = 0.1 the returned step satisfies CGT's TC.s rule, measured densely
    n = 60
    H, g, a = _scaled_problem(2, n, 20.0)
    calls = []

    def hvp(v):
        calls.append(1)
        return torch.tensor(H) @ v

    res = solve_cubic(torch.tensor(g), hvp, 0.5, ellipsoid=torch.tensor(a), rtol=0.1)
    s = res.step.numpy()
    d = 1 / np.sqrt(a)
    u_norm = math.sqrt(np.sum(a * s * s))
    grad_model = d * (g + H @ s + 0.5 * u_norm * a * s)  # in the region's variables
    assert np.linalg.norm(grad_model) <= 0.1 * min(1.0, u_norm) * np.linalg.norm(d * g) * (1 + 1e-8)
    assert res.iterations == len(calls) < n and res.status == "converged"
    value = cubic_model(torch.tensor(g), torch.tensor(H), 0.5, res.step, torch.tensor(a))
    assert float(res.model_decrease) == pytest.approx(-float(value), rel=1e-10)


def test_tcg_rule_holds_without_the_step_factor_and_spends_fewer_products_on_short_steps():
    # a large sigma makes the step short (||u|| << 1): TC.s asks for min(1, ||u||) more accuracy
    H, g, a = _scaled_problem(3, 80, 30.0)
    d = 1 / np.sqrt(a)
    runs = {rule: solve_cubic(torch.tensor(g), torch.tensor(H), 200.0, ellipsoid=torch.tensor(a), rtol=0.1, rule=rule)
            for rule in ("tc.s", "tc.g")}
    for rule, res in runs.items():
        s = res.step.numpy()
        u_norm = math.sqrt(np.sum(a * s * s))
        grad_model = d * (g + H @ s + 200.0 * u_norm * a * s)  # in the region's variables, measured densely
        factor = min(1.0, u_norm) if rule == "tc.s" else 1.0
        assert u_norm < 0.2 and res.status == "converged"
        assert np.linalg.norm(grad_model) <= 0.1 * factor * np.linalg.norm(d * g) * (1 + 1e-8)
    assert runs["tc.g"].iterations < runs["tc.s"].iterations
    with pytest.raises(ValueError, match="rule"):
        solve_cubic(torch.tensor(g), torch.tensor(H), 1.0, rule="tc.x")


def test_max_iter_limits_products():
    d = torch.arange(1.0, 101.0, dtype=torch.float64)
    calls = []

    def hvp(v):
        calls.append(1)
        return d * v

    res = solve_cubic(torch.ones(100, dtype=torch.float64), hvp, 1e-3, max_iter=7, rtol=1e-14)
    assert res.iterations == len(calls) == 7 and res.status == "max_iter"


def test_dense_and_callable_agree_and_deterministic():
    rng = np.random.default_rng(3)
    B = rng.standard_normal((7, 7))
    H, g = torch.tensor(B + B.T), torch.tensor(rng.standard_normal(7))
    for method in ("lanczos", "exact"):
        a = solve_cubic(g, H, 0.7, method=method).step
        b = solve_cubic(g, lambda v: H @ v, 0.7, method=method).step
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    hard = (torch.diag(torch.tensor([-1.0, -1.0, 2.0], dtype=torch.float64)), torch.tensor([0.0, 0.0, 1.0]).double())
    assert torch.equal(solve_cubic(hard[1], hard[0], 0.1).step, solve_cubic(hard[1], hard[0], 0.1).step)


def test_non_finite_products_raise():
    for method in ("lanczos", "exact"):
        with pytest.raises(FloatingPointError):
            solve_cubic(torch.ones(3), lambda v: v * float("nan"), 1.0, method=method)


def test_exact_pays_its_products_once_and_counts_them():
    # the dense decomposition costs n products on the first solve; every later sigma costs none
    rng = np.random.default_rng(4)
    B = rng.standard_normal((5, 5))
    H, g, a = torch.tensor(B + B.T), torch.tensor(rng.standard_normal(5)), torch.tensor(10 ** rng.uniform(-2, 2, 5))
    calls = []

    def hvp(v):
        calls.append(1)
        return H @ v

    solver = CubicSolver("exact").query(g, hvp, a)
    answers = [solver.solve(sigma) for sigma in (0.5, 2.0, 8.0)]
    assert [r.iterations for r in answers] == [5, 0, 0] and len(calls) == 5
    for sigma, r in zip((0.5, 2.0, 8.0), answers):
        s_ref, lam_ref = cubic_reference(B + B.T, g.numpy(), sigma, a.numpy())
        np.testing.assert_allclose(r.step.numpy(), s_ref, rtol=1e-8, atol=1e-10)
        assert r.multiplier == pytest.approx(lam_ref, rel=1e-8) and not r.on_boundary


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=float("inf")), "sigma"),
    (dict(method="gltr"), "method"),
    (dict(rtol=-1.0), "rtol"),
    (dict(max_iter=0), "max_iter"),
    (dict(ellipsoid=torch.tensor([1.0, -1.0], dtype=torch.float64)), "ellipsoid"),
    (dict(ellipsoid=torch.ones(3, dtype=torch.float64)), "ellipsoid"),
    (dict(grad=torch.tensor([1.0, float("nan")], dtype=torch.float64)), "grad"),
    (dict(grad=torch.ones(2, 2, dtype=torch.float64)), "grad"),
    (dict(hvp="not callable"), "hvp"),
    (dict(hvp=torch.ones(3, 3, dtype=torch.float64)), "hvp"),
])
def test_bad_input_raises_value_error_naming_it(kwargs, match):
    args = dict(grad=torch.ones(2, dtype=torch.float64), hvp=lambda v: v, sigma=1.0)
    args.update(kwargs)
    grad, hvp, sigma = args.pop("grad"), args.pop("hvp"), args.pop("sigma")
    with pytest.raises(ValueError, match=match):
        solve_cubic(grad, hvp, sigma, **args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu():
    d = torch.linspace(-1.0, 3.0, 200, device="cuda")
    g = torch.ones(200, device="cuda")
    res = solve_cubic(g, lambda v: d * v, 1.0)
    assert res.step.device.type == "cuda"
    ref = solve_cubic(g.cpu().double(), lambda v: d.cpu().double() * v, 1.0, method="exact")
    assert float(res.model_decrease) == pytest.approx(float(ref.model_decrease), rel=1e-4)
