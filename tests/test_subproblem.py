"""Every subproblem solver against a dense NumPy/SciPy reference on the same generated instances."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import trlib
from reference import kkt_gap, model, tr_reference

KINDS = ("indefinite", "positive", "singular", "hard", "zero_gradient")


@st.composite
def instances(draw, kinds=KINDS, max_n=10):
    """A symmetric H (eigenvalues and rotation drawn), g, radius and ellipsoid."""
    n = draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = rng.uniform(-10, 10, n)
    if kind == "positive":
        eig = np.abs(eig) + 0.1
    elif kind == "singular":
        eig[: max(1, n // 2)] = 0.0
        eig = np.abs(eig)
    eig.sort()
    H = (q * eig) @ q.T
    H = 0.5 * (H + H.T)
    g = rng.standard_normal(n) * 10 ** rng.uniform(-2, 2)
    ellipsoid = None
    if draw(st.booleans()):
        ellipsoid = 10 ** rng.uniform(-6, 6, n)  # 12 orders of magnitude
    if kind == "hard" and n > 1:
        # g orthogonal (in the region's metric) to the leftmost eigenvector of A^-1/2 H A^-1/2.
        d = np.ones(n) if ellipsoid is None else 1 / np.sqrt(ellipsoid)
        w, V = np.linalg.eigh(d[:, None] * H * d[None, :])
        if w[0] >= 0:
            H = H - (w[0] + 1.0) * (np.diag(1 / d**2))
            w, V = np.linalg.eigh(d[:, None] * H * d[None, :])
        gt = d * g
        gt = gt - V[:, 0] * (V[:, 0] @ gt)
        g = gt / d
    elif kind == "zero_gradient":
        g = np.zeros(n)
    radius = 10 ** draw(st.floats(-4, 4))
    if kind == "hard":
        radius = 10 ** draw(st.floats(0, 4))  # large enough to be in the hard case proper
    return H, g, radius, ellipsoid


def _run(H, g, radius, ellipsoid, method, dtype=torch.float64, **kw):
    Ht = torch.tensor(H, dtype=dtype)
    a = None if ellipsoid is None else torch.tensor(ellipsoid, dtype=dtype)
    res = trlib.solve_subproblem(torch.tensor(g, dtype=dtype), lambda v: Ht @ v, radius, ellipsoid=a,
                                 method=method, **kw)
    return res


def _norm(s, ellipsoid):
    return float(np.sqrt(np.sum((1 if ellipsoid is None else ellipsoid) * s * s)))


def _scale(H, g, radius, ellipsoid):
    # a natural size for model values: |g|_A^-1 radius + |H~| radius^2
    d = np.ones_like(g) if ellipsoid is None else 1 / np.sqrt(ellipsoid)
    return np.linalg.norm(d * g) * radius + np.abs(np.linalg.eigvalsh(d[:, None] * H * d[None, :])).max() * radius**2


SETTINGS = dict(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(**SETTINGS)
@given(instances())
def test_exact_matches_reference_float64(inst):
    H, g, radius, ellipsoid = inst
    res = _run(H, g, radius, ellipsoid, "exact")
    s = res.step.numpy()
    s_ref, _ = tr_reference(H, g, radius, ellipsoid)
    scale = max(_scale(H, g, radius, ellipsoid), 1e-300)
    assert _norm(s, ellipsoid) <= radius * (1 + 1e-8)
    assert model(H, g, s) <= model(H, g, s_ref) + 1e-6 * scale
    # the reported decrease is the true one
    assert abs(float(res.model_decrease) + model(H, g, s)) <= 1e-8 * scale + 1e-300


@settings(**SETTINGS)
@given(instances())
def test_exact_satisfies_more_sorensen_certificate(inst):
    H, g, radius, ellipsoid = inst
    res = _run(H, g, radius, ellipsoid, "exact")
    s = res.step.numpy()
    a = np.ones_like(g) if ellipsoid is None else ellipsoid
    resid, mineig, compl, infeas = kkt_gap(H, g, radius, ellipsoid, s, res.multiplier)
    d = 1 / np.sqrt(a)
    size = np.abs(np.linalg.eigvalsh(d[:, None] * H * d[None, :])).max() + (res.multiplier or 0.0)
    assert res.multiplier >= 0
    # checked in the region's variables (u = A^1/2 s), where the problem is well scaled
    assert np.linalg.norm(d * ((H + res.multiplier * np.diag(a)) @ s + g)) <= 1e-7 * (
        np.linalg.norm(d * g) + size * radius + 1e-300)
    Ht = d[:, None] * H * d[None, :] + res.multiplier * np.eye(len(g))
    assert np.linalg.eigvalsh(0.5 * (Ht + Ht.T))[0] >= -1e-7 * max(size, 1.0)
    assert compl <= 1e-7 * max(res.multiplier, 1.0) * radius


@settings(**SETTINGS)
@given(instances())
def test_gltr_within_1e4_of_optimum_with_enough_iterations(inst):
    # rtol=0: no early stop, the Lanczos basis (restarted on breakdown) spans the space
    H, g, radius, ellipsoid = inst
    res = _run(H, g, radius, ellipsoid, "gltr", rtol=0.0)
    s = res.step.numpy()
    s_ref, _ = tr_reference(H, g, radius, ellipsoid)
    scale = max(_scale(H, g, radius, ellipsoid), 1e-300)
    assert _norm(s, ellipsoid) <= radius * (1 + 1e-8)
    assert model(H, g, s) <= model(H, g, s_ref) + 1e-4 * scale
    assert res.iterations <= len(g)


@settings(**SETTINGS)
@given(instances(kinds=("indefinite", "positive", "singular", "zero_gradient")))
def test_gltr_default_tolerance_close_to_optimum(inst):
    H, g, radius, ellipsoid = inst
    res = _run(H, g, radius, ellipsoid, "gltr")
    s = res.step.numpy()
    s_ref, _ = tr_reference(H, g, radius, ellipsoid)
    scale = max(_scale(H, g, radius, ellipsoid), 1e-300)
    assert model(H, g, s) <= model(H, g, s_ref) + 1e-4 * scale


def _cauchy_value(H, g, radius, ellipsoid):
    # closed form along -A^-1 g (independent of trlib)
    a = np.ones_like(g) if ellipsoid is None else ellipsoid
    p = -g / a
    pnorm = np.sqrt(np.sum(a * p * p))
    if pnorm == 0:
        return 0.0
    p = p / pnorm
    slope, curv = g @ p, p @ H @ p
    t = radius if curv <= 0 else min(radius, -slope / curv)
    return slope * t + 0.5 * curv * t * t


@settings(**SETTINGS)
@given(instances())
def test_cauchy_point_matches_closed_form(inst):
    H, g, radius, ellipsoid = inst
    res = _run(H, g, radius, ellipsoid, "cauchy")
    s = res.step.numpy()
    scale = max(_scale(H, g, radius, ellipsoid), 1e-300)
    assert _norm(s, ellipsoid) <= radius * (1 + 1e-8)
    assert abs(model(H, g, s) - _cauchy_value(H, g, radius, ellipsoid)) <= 1e-8 * scale
    assert res.iterations == (0 if not np.any(g) else 1)


@settings(**SETTINGS)
@given(instances())
def test_cg_at_least_cauchy_decrease(inst):
    H, g, radius, ellipsoid = inst
    res = _run(H, g, radius, ellipsoid, "cg")
    s = res.step.numpy()
    scale = max(_scale(H, g, radius, ellipsoid), 1e-300)
    assert _norm(s, ellipsoid) <= radius * (1 + 1e-8)
    assert model(H, g, s) <= _cauchy_value(H, g, radius, ellipsoid) + 1e-8 * scale
    assert float(res.model_decrease) >= 0


@pytest.mark.parametrize("method", ["cauchy", "cg", "gltr", "exact"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(kinds=("indefinite", "positive", "hard")))
def test_float32_feasible_and_close(method, inst):
    H, g, radius, ellipsoid = inst
    # gltr with rtol=0 ("enough iterations"): a hard case is only seen once Lanczos breaks down
    res = _run(H, g, radius, ellipsoid, method, dtype=torch.float32, rtol=0.0 if method == "gltr" else 1e-5)
    assert res.step.dtype == torch.float32
    s = res.step.double().numpy()
    assert np.all(np.isfinite(s))
    assert _norm(s, ellipsoid) <= radius * (1 + 1e-4)
    scale = max(_scale(H, g, radius, ellipsoid), 1e-30)
    if method in ("gltr", "exact"):
        s_ref, _ = tr_reference(H, g, radius, ellipsoid)
        assert model(H, g, s) <= model(H, g, s_ref) + 1e-3 * scale
    else:
        assert model(H, g, s) <= _cauchy_value(H, g, radius, ellipsoid) + 1e-4 * scale


def test_hard_case_cg_stalls_gltr_with_certificate_does_not():
    # g orthogonal to the negative-curvature direction: no Krylov space of g ever sees it.
    H = np.diag([-2.0, 1.0, 3.0, 5.0])
    g = np.array([0.0, 1.0, 1.0, 1.0])
    s_ref, lam = tr_reference(H, g, 10.0)
    best = model(H, g, s_ref)
    cg = _run(H, g, 10.0, None, "cg")
    gltr = _run(H, g, 10.0, None, "gltr")
    certified = _run(H, g, 10.0, None, "gltr", certificate=True)
    exact = _run(H, g, 10.0, None, "exact")
    assert model(H, g, cg.step.numpy()) > best + 10  # stuck at the (interior) Newton point
    assert model(H, g, gltr.step.numpy()) > best + 10 and gltr.iterations == 3  # the invariant space, no restart
    assert abs(model(H, g, certified.step.numpy()) - best) <= 1e-8 * abs(best)
    # 3 products for g's Krylov space, at most 4 for the random-start Lanczos, 1 for its vector
    assert certified.iterations <= 8 and certified.status == "hard_case"
    assert abs(model(H, g, exact.step.numpy()) - best) <= 1e-10 * abs(best)
    assert exact.status == "hard_case" and abs(exact.multiplier - 2.0) < 1e-10


def test_hard_case_is_deterministic():
    H = torch.diag(torch.tensor([-1.0, -1.0, 2.0], dtype=torch.float64))
    g = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    steps = [trlib.solve_subproblem(g, H, 3.0, method=m).step for m in ("exact", "exact", "gltr", "gltr")]
    assert torch.equal(steps[0], steps[1]) and torch.equal(steps[2], steps[3])


@pytest.mark.parametrize("method", ["gltr", "exact"])
def test_zero_gradient_moves_along_negative_curvature(method):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    eig = np.array([-3.0, -1.0, 0.5, 1.0, 2.0, 4.0])
    H = (q * eig) @ q.T
    res = _run(H, np.zeros(6), 0.5, None, method)
    s = res.step.numpy()
    assert abs(np.linalg.norm(s) - 0.5) < 1e-10
    assert abs(model(H, np.zeros(6), s) - 0.5 * (-3.0) * 0.25) < 1e-8  # the leftmost eigenvector
    assert res.negative_curvature and res.on_boundary


@pytest.mark.parametrize("method", ["cauchy", "cg"])
def test_zero_gradient_first_order_methods_do_not_crash(method):
    res = _run(np.diag([-1.0, 1.0]), np.zeros(2), 1.0, None, method)
    assert torch.count_nonzero(res.step) == 0 and float(res.model_decrease) == 0.0


def test_interior_newton_step_for_convex_model():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((5, 5))
    H = A @ A.T + np.eye(5)
    g = rng.standard_normal(5)
    newton = -np.linalg.solve(H, g)
    for method in ("cg", "gltr", "exact"):
        res = _run(H, g, 10 * np.linalg.norm(newton), None, method, rtol=1e-12)
        np.testing.assert_allclose(res.step.numpy(), newton, rtol=1e-8, atol=1e-10)
        assert not res.on_boundary


def test_dense_matrix_and_callable_agree():
    rng = np.random.default_rng(2)
    H = rng.standard_normal((7, 7))
    H = H + H.T
    g = rng.standard_normal(7)
    Ht, gt = torch.tensor(H), torch.tensor(g)
    for method in ("cauchy", "cg", "gltr", "exact"):
        a = trlib.solve_subproblem(gt, Ht, 0.7, method=method).step
        b = trlib.solve_subproblem(gt, lambda v: Ht @ v, 0.7, method=method).step
        torch.testing.assert_close(a, b)


def test_max_iter_limits_products():
    H = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    g = torch.ones(100, dtype=torch.float64)
    calls = []

    def hvp(v):
        calls.append(1)
        return H @ v

    for method in ("cg", "gltr"):
        calls.clear()
        res = trlib.solve_subproblem(g, hvp, 100.0, method=method, max_iter=7, rtol=1e-14)
        assert res.iterations == len(calls) == 7


def test_cg_check_every_same_step_more_products():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((30, 30))
    H = torch.tensor(A @ A.T + np.eye(30))
    g = torch.tensor(rng.standard_normal(30))
    one = trlib.solve_subproblem(g, H, 1e3, method="cg", rtol=1e-8)
    five = trlib.solve_subproblem(g, H, 1e3, method="cg", rtol=1e-8, check_every=5)
    torch.testing.assert_close(one.step, five.step)  # products after termination change nothing
    assert one.iterations <= five.iterations < one.iterations + 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(radius=0.0), "radius"),
        (dict(radius=float("nan")), "radius"),
        (dict(method="newton"), "method"),
        (dict(rtol=-1.0), "rtol"),
        (dict(max_iter=0), "max_iter"),
        (dict(ellipsoid=torch.tensor([1.0, -1.0], dtype=torch.float64)), "ellipsoid"),
        (dict(ellipsoid=torch.ones(3, dtype=torch.float64)), "ellipsoid"),
        (dict(grad=torch.tensor([1.0, float("nan")], dtype=torch.float64)), "grad"),
        (dict(grad=torch.ones(2, 2, dtype=torch.float64)), "grad"),
        (dict(hvp="not callable"), "hvp"),
        (dict(hvp=torch.ones(3, 3, dtype=torch.float64)), "hvp"),
        (dict(check_every=0), "check_every"),
    ],
)
def test_bad_input_raises_value_error_naming_it(kwargs, match):
    args = dict(grad=torch.ones(2, dtype=torch.float64), hvp=lambda v: v, radius=1.0)
    args.update(kwargs)
    grad, hvp, radius = args.pop("grad"), args.pop("hvp"), args.pop("radius")
    with pytest.raises(ValueError, match=match):
        trlib.solve_subproblem(grad, hvp, radius, **args)


def test_tiny_and_huge_radius():
    H = np.diag([1.0, -1.0, 2.0])
    g = np.array([1.0, 1.0, 1.0])
    for radius in (1e-12, 1e12):
        for method in ("cauchy", "cg", "gltr", "exact"):
            res = _run(H, g, radius, None, method)
            s = res.step.numpy()
            assert np.all(np.isfinite(s))
            assert np.linalg.norm(s) <= radius * (1 + 1e-8)
            if radius > 1 and method != "cauchy":  # the Cauchy point stops at 1-D curvature
                assert math.isclose(np.linalg.norm(s), radius, rel_tol=1e-6)  # negative curvature: to the boundary


# ---------------------------------------------------------------------------- non-finite products
@pytest.mark.parametrize("method", ["cauchy", "cg", "gltr", "exact"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(kinds=("indefinite", "positive", "hard")), bad_at=st.integers(1, 6),
       value=st.sampled_from([math.nan, math.inf, -math.inf]), where=st.integers(0, 9))
def test_every_solver_raises_the_same_error_on_a_non_finite_product(method, inst, bad_at, value, where):
    H, g, radius, ellipsoid = inst
    Ht = torch.tensor(H)
    calls = []

    def hvp(v):
        calls.append(1)
        hv = Ht @ v
        if len(calls) == bad_at:
            hv = hv.clone()
            hv[where % len(g)] = value
        return hv

    a = None if ellipsoid is None else torch.tensor(ellipsoid)
    try:
        res = trlib.solve_subproblem(torch.tensor(g), hvp, radius, ellipsoid=a, method=method)
    except trlib.NonFiniteCurvatureError as exc:
        assert len(calls) >= bad_at and "NaN or inf" in str(exc)
    else:  # the solver was done before the bad product
        assert len(calls) < bad_at and bool(torch.all(torch.isfinite(res.step)))


@pytest.mark.parametrize("method", ["cauchy", "cg", "gltr", "exact"])
def test_non_finite_dense_hessian_and_wrong_shapes(method):
    H = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    g = torch.ones(3, dtype=torch.float64)
    with pytest.raises(trlib.NonFiniteCurvatureError):
        trlib.solve_subproblem(g, H * torch.tensor(math.nan), 1.0, method=method)
    with pytest.raises(ValueError, match="hvp: returned"):
        trlib.solve_subproblem(g, lambda v: torch.ones(4, dtype=torch.float64), 1.0, method=method)


# ---------------------------------------------------------------------------- accuracy where it used to fail
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 12), seed=st.integers(0, 2**31 - 1), log_radius=st.floats(-2, 1))
@example(n=2, seed=3180, log_radius=1.0)  # a real coupling of 83 eps ||H q|| once taken for a breakdown
def test_gltr_float32_with_a_badly_scaled_ellipsoid_reaches_099_of_the_optimum(n, seed, log_radius):
    # An ellipsoid spanning 1e-5 .. 12 makes A^-1/2 H A^-1/2 span ~7 orders of magnitude: a Krylov
    # coupling of size 1 next to a norm of 1e6 is real, not a breakdown (float32, default tolerance).
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    H = (q * np.sort(rng.uniform(-10, 10, n))) @ q.T
    H = 0.5 * (H + H.T)
    g = rng.standard_normal(n)
    a = 10 ** rng.uniform(-5, np.log10(12), n)
    a[:2] = 1e-5, 12.0
    radius = 10**log_radius
    s_ref, _ = tr_reference(H, g, radius, a)
    best = -model(H, g, s_ref)
    res = _run(H, g, radius, a, "gltr", dtype=torch.float32)
    s = res.step.double().numpy()
    assert _norm(s, a) <= radius * (1 + 1e-5)
    assert -model(H, g, s) >= 0.99 * best


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(kinds=("hard",), max_n=40))
def test_gltr_certificate_solves_exact_hard_cases_under_a_tolerance(inst):
    # g orthogonal to the leftmost eigenvector: invisible to every Krylov space of g; the
    # certificate's random block finds it (rtol > 0, so no exploration to exhaustion).
    H, g, radius, ellipsoid = inst
    s_ref, _ = tr_reference(H, g, radius, ellipsoid)
    best = -model(H, g, s_ref)
    res = _run(H, g, radius, ellipsoid, "gltr", rtol=1e-10, certificate=True)
    s = res.step.numpy()
    assert _norm(s, ellipsoid) <= radius * (1 + 1e-8)
    assert -model(H, g, s) >= 0.99 * best - 1e-12 * max(_scale(H, g, radius, ellipsoid), 1e-300)


# ---------------------------------------------------------------------------- the finiteness screens
@pytest.mark.parametrize("method", ["cauchy", "cg", "gltr"])
def test_invalid_gradients_and_ellipsoids_are_refused_and_an_overflowing_norm_is_not(method):
    # query screens its inputs with ||g~|| and the scale's sum and minimum, and runs the entrywise
    # test only when the screen fails: the verdict must be the entrywise one either way
    H = torch.eye(3, dtype=torch.float32)
    g, a = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([1.0, 2.0, 0.5])
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="Invalid grad: contains NaN or inf"):
            trlib.solve_subproblem(torch.tensor([1.0, bad, 0.5]), H, 1.0, ellipsoid=a, method=method)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="Invalid ellipsoid: entries must be positive and finite"):
            trlib.solve_subproblem(g, H, 1.0, ellipsoid=torch.tensor([1.0, bad, 0.5]), method=method)
    # finite entries whose norm overflows float32: the screen fails, the entrywise test passes (no
    # product yet: Cauchy's query would spend one, and its curvature overflows too)
    huge = torch.tensor([3e38, 3e38, 0.0])
    assert math.isinf(float(torch.linalg.vector_norm(huge)))
    assert math.isinf(trlib.subproblem.get_solver("cg").query(huge, H, torch.ones(3)).gnorm)


def test_iterate_never_tries_a_non_finite_step_and_tries_one_whose_length_overflows():
    # iterate reads the step's finiteness off its length; a length that overflows is checked entrywise
    rule = trlib.RadiusRule(eta1=0.1, eta2=0.9, increase=2.0, decrease=2.0, max_radius=1e3)

    def run(step):
        tried = []
        result = trlib.SubproblemResult(step, torch.tensor(1.0), True, False, 1, status="boundary")
        t = trlib.region.iterate(lambda radius, rtol: result, lambda s: tried.append(s) or 0.0, lambda: None,
                                 loss=2.0, radius=1.0, rule=rule, ellipsoid=torch.ones(2))
        return t, tried

    for bad in (math.nan, math.inf):
        t, tried = run(torch.tensor([0.5, bad]))
        assert not tried and not t.accepted and t.rho == -math.inf and t.radius == 0.5
    t, tried = run(torch.tensor([1e30, 0.0]))
    assert len(tried) == 1 and math.isinf(t.step_norm) and t.accepted
