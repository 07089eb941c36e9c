"""Norms against closed forms, and Corollary 1 against torch.optim (an independent implementation)."""

import math

import numpy as np
import pytest
import torch

import trlib
from trlib import norms


def test_rms_and_adagrad_and_adam_match_closed_forms():
    torch.manual_seed(0)
    grads = [torch.randn(6, dtype=torch.float64) for _ in range(5)]
    rms, ada, adam = norms.RMS(beta=0.7, eps=1e-6), norms.Adagrad(eps=1e-6), norms.Adam(beta=0.9, eps=1e-6)
    states = [n.init(grads[0]) for n in (rms, ada, adam)]
    v_rms, v_ada, v_adam = (torch.zeros(6, dtype=torch.float64) for _ in range(3))
    for t, g in enumerate(grads, start=1):
        a_rms, a_ada, a_adam = (n.update(s, g) for n, s in zip((rms, ada, adam), states))
        v_rms = 0.7 * v_rms + 0.3 * g**2
        v_ada = v_ada + g**2
        v_adam = 0.9 * v_adam + 0.1 * g**2
        torch.testing.assert_close(a_rms, v_rms.sqrt() + 1e-6)
        torch.testing.assert_close(a_ada, v_ada.sqrt() + 1e-6)
        torch.testing.assert_close(a_adam, (v_adam / (1 - 0.9**t)).sqrt() + 1e-6)


def test_floor_added_every_step():
    # A coordinate whose gradient is always zero keeps the floor (the original code let it decay to ~1e-23).
    rule = norms.RMS(beta=0.8, eps=1e-8)
    state = rule.init(torch.zeros(2))
    for _ in range(300):
        a = rule.update(state, torch.tensor([1.0, 0.0]))
    assert float(a[1]) == pytest.approx(1e-8, rel=1e-6)
    assert math.isfinite(trlib.equivalence_constant(a))


def test_equivalence_constant_is_the_tightest_mu():
    # Definition 1 checked by brute force: the extreme ratios ||w||_A / ||w||_2 sit on the axes.
    a = torch.tensor([4.0, 0.01, 1.0], dtype=torch.float64)
    mu = trlib.equivalence_constant(a)
    ratios = [float(trlib.ellipsoid_norm(e, a)) for e in torch.eye(3, dtype=torch.float64)]
    assert mu == pytest.approx(max(max(ratios), 1 / min(ratios)))
    w = torch.randn(1000, 3, dtype=torch.float64)
    r = torch.sqrt((w**2 * a).sum(1)) / w.norm(dim=1)
    assert float(r.max()) <= mu and float(1 / r.min()) <= mu
    assert trlib.equivalence_constant(None) == 1.0


def test_adagrad_not_uniformly_equivalent_rms_is():
    # Lemma 2: with |g_i| <= L, RMSProp's ellipsoid stays in [eps, L + eps]; Adagrad's grows like sqrt(t).
    torch.manual_seed(1)
    ada, rms = norms.Adagrad(), norms.RMS()
    s_ada, s_rms = ada.init(torch.zeros(4)), rms.init(torch.zeros(4))
    top_ada, top_rms, mus_rms = [], [], []
    for _ in range(2000):
        g = torch.randn(4).clamp(-3, 3)
        a_ada, a_rms = ada.update(s_ada, g), rms.update(s_rms, g)
        top_ada.append(float(a_ada.max()))
        top_rms.append(float(a_rms.max()))
        mus_rms.append(trlib.equivalence_constant(a_rms))
    assert top_ada[-1] / top_ada[99] == pytest.approx(math.sqrt(20), rel=0.15)
    assert max(top_rms) <= 3 + 1e-8 + 1e-6
    assert max(mus_rms) <= max(math.sqrt(3 + 1e-8), 1 / math.sqrt(1e-8))


@pytest.mark.parametrize("name, torch_cls, kwargs", [
    ("rms", torch.optim.RMSprop, dict(alpha=0.8, eps=1e-8)),
    ("adagrad", torch.optim.Adagrad, dict(eps=1e-8)),
])
def test_corollary1_adaptive_step_is_a_trust_region_step(name, torch_cls, kwargs):
    """Corollary 1: the RMSProp / Adagrad step minimises the linear model in the ellipsoid
    ||s||_A <= lr * ||g||_{A^-1}; compare torch.optim's step with trlib's Cauchy point for H = 0."""
    torch.manual_seed(2)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = torch_cls([w], lr=0.05, **kwargs)
    rule = trlib.get_norm(name, beta=kwargs.get("alpha"), eps=kwargs["eps"])
    state = rule.init(w.detach())
    for _ in range(4):
        g = torch.randn(5, dtype=torch.float64)
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        a = rule.update(state, g)
        radius = 0.05 * float(torch.sqrt((g * g / a).sum()))
        res = trlib.solve_subproblem(g, lambda v: torch.zeros_like(v), radius, ellipsoid=a, method="cauchy")
        torch.testing.assert_close(res.step, w.detach() - before, rtol=1e-10, atol=1e-14)
        assert res.on_boundary


def test_get_norm_and_validation():
    assert isinstance(trlib.get_norm("rms"), norms.RMS)
    assert isinstance(trlib.get_norm(None), norms.Uniform)
    assert isinstance(trlib.get_norm(torch.ones(3)), norms.Fixed)
    with pytest.raises(ValueError, match="norm"):
        trlib.get_norm("spherical-ish")
    with pytest.raises(ValueError, match="beta"):
        norms.RMS(beta=1.0)
    with pytest.raises(ValueError, match="eps"):
        norms.Adagrad(eps=0.0)
    with pytest.raises(ValueError, match="ellipsoid"):
        norms.Fixed(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="ellipsoid"):
        norms.Fixed(torch.ones(3)).update({}, torch.ones(4))


# ----------------------------------------------------------------------------- Adam
def test_adam_ellipsoid_is_torch_adams_denominator():
    """Adam without momentum steps by -lr g / a_t (torch.optim.Adam, an independent implementation),
    which is the Cauchy step of the linear model in the region ||s||_A <= lr ||g||_{A^-1}."""
    torch.manual_seed(3)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05, betas=(0.0, 0.99), eps=1e-8)
    rule = trlib.get_norm("adam", beta=0.99, eps=1e-8)
    state = rule.init(w.detach())
    for _ in range(5):
        g = torch.randn(6, dtype=torch.float64) * torch.logspace(-3, 2, 6, dtype=torch.float64)
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        a = rule.update(state, g)
        torch.testing.assert_close(w.detach() - before, -0.05 * g / a, rtol=1e-12, atol=1e-15)
        radius = 0.05 * float(torch.sqrt((g * g / a).sum()))
        res = trlib.solve_subproblem(g, lambda v: torch.zeros_like(v), radius, ellipsoid=a, method="cauchy")
        torch.testing.assert_close(res.step, w.detach() - before, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- Hutchinson
def _indefinite(n=12, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = rng.uniform(-3, 5, n)
    H = (q * eig) @ q.T + np.diag(rng.uniform(-4, 4, n))
    return torch.tensor(0.5 * (H + H.T))


def test_hutchinson_exact_for_a_diagonal_hessian():
    d = torch.tensor([2.0, -3.0, 0.0, 1e-3], dtype=torch.float64)
    rule = norms.Hutchinson(beta=0.7, eps=1e-6)
    state = rule.init(d)
    for _ in range(3):  # bias correction: exact from the first step on
        a = rule.update(state, torch.ones(4, dtype=torch.float64), hvp=lambda v: d * v)
        torch.testing.assert_close(a, d.abs() + 1e-6, rtol=1e-14, atol=0)


def test_hutchinson_tracks_the_diagonal_within_its_variance():
    H = _indefinite()
    n, beta, steps = H.shape[0], 0.99, 1500
    rule = norms.Hutchinson(beta=beta, eps=1e-8, seed=5)
    state = rule.init(torch.zeros(n, dtype=torch.float64))
    for _ in range(steps):
        rule.update(state, torch.zeros(n, dtype=torch.float64), hvp=lambda v: H @ v)
    m = state["diag_avg"].numpy() / (1 - beta**steps)
    # the average weighs the t-th estimate by w_t; Var of one estimate is sum_{j != i} H_ij^2
    weights = (1 - beta) * beta ** np.arange(steps) / (1 - beta**steps)
    off = H.numpy() - np.diag(np.diag(H.numpy()))
    sd = np.sqrt(np.sum(weights**2) * np.sum(off**2, axis=1))
    z = (m - np.diag(H.numpy())) / sd
    assert np.abs(z).max() <= 4.0 and np.mean(z**2) <= 2.5
    a = rule.ellipsoid(state).numpy()
    assert np.all(np.abs(a - np.abs(np.diag(H.numpy())) - 1e-8) <= 4.0 * sd)
    assert np.all(a >= 1e-8)


def test_hutchinson_products_every_and_batched():
    H = _indefinite()
    calls = []

    def hvp(v):
        raise AssertionError("with several probes and .batched, products go through .batched")

    def batched(vs):  # rows at once (H symmetric)
        calls.append(vs.shape)
        return vs @ H

    hvp.batched = batched
    plain = lambda v: H @ v  # noqa: E731
    rule = norms.Hutchinson(probes=4, every=3, seed=1)
    s1, s2 = rule.init(H[0]), rule.init(H[0])
    previous = None
    for t in range(7):
        a1 = rule.update(s1, H[0], hvp=hvp)
        a2 = rule.update(s2, H[0], hvp=plain)
        torch.testing.assert_close(a1, a2, rtol=1e-12, atol=1e-14)  # batched == one by one
        if t % 3:
            assert torch.equal(a1, previous)  # reused between refreshes, no products
        previous = a1
    assert len(calls) == 3 and all(shape == (4, 12) for shape in calls)


def test_hutchinson_resumes_bit_exactly_from_its_state():
    H = _indefinite()
    rule = norms.Hutchinson(seed=2)
    state = rule.init(H[0])
    for _ in range(4):
        rule.update(state, H[0], hvp=lambda v: H @ v)
    saved = {k: v.clone() for k, v in state.items()}
    go_on = [rule.update(state, H[0], hvp=lambda v: H @ v) for _ in range(3)]
    resumed = [norms.Hutchinson(seed=2).update(saved, H[0], hvp=lambda v: H @ v) for _ in range(3)]
    for a, b in zip(go_on, resumed):
        assert torch.equal(a, b)


def test_hutchinson_refuses_missing_or_non_finite_products():
    rule = norms.Hutchinson()
    state = rule.init(torch.zeros(3))
    with pytest.raises(ValueError, match="hvp"):
        rule.update(state, torch.ones(3))
    with pytest.raises(trlib.NonFiniteCurvatureError):
        rule.update(state, torch.ones(3), hvp=lambda v: v * float("nan"))
    assert float(state["count"]) == 0 and not torch.any(state["diag_avg"])  # state untouched
    assert norms.Hutchinson.uses_curvature and not norms.RMS.uses_curvature


# ----------------------------------------------------------------------------- empirical Fisher
def test_empirical_fisher_is_the_mean_of_squared_per_sample_gradients():
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    params = list(net.parameters())
    rule = norms.EmpiricalFisher(beta=0.5, eps=1e-10)
    state = rule.init(trlib.curvature.FlatView(params).get())
    avg = 0.0
    for t in range(1, 4):
        x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
        # per-sample gradients one sample at a time: plain autograd, the reference
        G = torch.stack([trlib.flat_grad(torch.nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), params)
                         for i in range(5)])
        batch_grad = trlib.flat_grad(torch.nn.functional.cross_entropy(net(x), y), params)
        torch.testing.assert_close(G.mean(0), batch_grad)
        a = rule.update(state, batch_grad, per_sample_grads=G)
        avg = 0.5 * avg + 0.5 * (G**2).mean(0)
        torch.testing.assert_close(a, avg / (1 - 0.5**t) + 1e-10, rtol=1e-12, atol=0)
        # more than the squared batch gradient: the per-sample spread is kept
        assert bool(torch.all((G**2).mean(0) >= batch_grad**2 - 1e-15))
        assert float(((G**2).mean(0) - batch_grad**2).max()) > 1e-3
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn_like(p))


def test_empirical_fisher_needs_per_sample_gradients():
    rule = norms.EmpiricalFisher()
    state = rule.init(torch.zeros(3))
    with pytest.raises(ValueError, match="per_sample_grads"):
        rule.update(state, torch.ones(3))
    with pytest.raises(ValueError, match="per_sample_grads"):
        rule.update(state, torch.ones(3), per_sample_grads=torch.ones(4, 2))
    with pytest.raises(ValueError, match="per_sample_grads"):
        rule.update(state, torch.ones(3), per_sample_grads=torch.full((2, 3), float("inf")))
    assert float(state["count"]) == 0
    assert norms.EmpiricalFisher.uses_per_sample_gradients


# ----------------------------------------------------------------------------- safeguard
def test_safeguard_makes_adagrad_uniformly_equivalent():
    # Definition 1: without the safeguard Adagrad's mu_t grows like t^(1/4) (entries ~ sqrt(t));
    # with it, mu_t <= mu at every step, checked by brute force on random directions.
    torch.manual_seed(1)
    plain, guarded = norms.Adagrad(), norms.Safeguarded(norms.Adagrad(), mu=3.0)
    s_plain, s_guarded = plain.init(torch.zeros(4)), guarded.init(torch.zeros(4))
    mu_plain, mu_guarded = [], []
    for _ in range(2000):
        g = torch.randn(4).clamp(-3, 3)
        mu_plain.append(trlib.equivalence_constant(plain.update(s_plain, g)))
        a = guarded.update(s_guarded, g)
        mu_guarded.append(trlib.equivalence_constant(a))
    assert mu_plain[-1] / mu_plain[99] == pytest.approx(20**0.25, rel=0.1)
    assert mu_plain[-1] > 6.0 and max(mu_guarded) <= 3.0 + 1e-6
    w = torch.randn(10000, 4)
    ratio = torch.sqrt((w**2 * a).sum(1)) / w.norm(dim=1)  # ||w||_A / ||w||_2
    assert float(ratio.max()) <= 3.0 * (1 + 1e-6) and float(1 / ratio.min()) <= 3.0 * (1 + 1e-6)
    assert torch.equal(guarded.ellipsoid(s_guarded), a)


def test_safeguard_leaves_ellipsoids_inside_the_band_alone():
    torch.manual_seed(2)
    inner, guarded = norms.RMS(eps=1e-3), norms.Safeguarded("rms", mu=1e3)
    guarded.norm.eps = 1e-3
    s1, s2 = inner.init(torch.zeros(5)), guarded.init(torch.zeros(5))
    for _ in range(20):
        g = torch.randn(5)
        assert torch.equal(inner.update(s1, g), guarded.update(s2, g))


def test_safeguard_relative_band_bounds_the_condition_number():
    rule = norms.Safeguarded(norms.Fixed(torch.tensor([1e-6, 1e-2, 5.0, 50.0])), max_condition=100.0)
    a = rule.update({}, torch.ones(4))
    assert float(a.max() / a.min()) == pytest.approx(100.0)
    assert torch.equal(a, torch.tensor([0.5, 0.5, 5.0, 50.0]))
    both = norms.Safeguarded(norms.Fixed(torch.tensor([1e-6, 1e-2, 5.0, 50.0])), mu=4.0, max_condition=10.0)
    a = both.update({}, torch.ones(4))
    assert float(a.max() / a.min()) <= 10.0 and trlib.equivalence_constant(a) <= 4.0


def test_safeguard_forwards_what_its_norm_needs():
    H = torch.diag(torch.tensor([4.0, -0.01]))
    rule = norms.Safeguarded(norms.Hutchinson(eps=1e-8), mu=5.0)
    assert rule.uses_curvature and not rule.uses_per_sample_gradients and rule.name == "safeguarded_hutchinson"
    a = rule.update(rule.init(torch.zeros(2)), torch.ones(2), hvp=lambda v: H @ v)
    torch.testing.assert_close(a, torch.tensor([4.0, 0.04]))
    assert norms.Safeguarded("fisher", mu=2.0).uses_per_sample_gradients
    assert rule.ellipsoid(rule.init(torch.zeros(2))) is None  # nothing seen yet: the sphere


def test_new_norms_validation_and_names():
    assert isinstance(trlib.get_norm("hutchinson", beta=0.8, eps=1e-8), norms.Hutchinson)
    assert isinstance(trlib.get_norm("fisher"), norms.EmpiricalFisher)
    for call, match in [
        (lambda: norms.Hutchinson(probes=0), "probes"),
        (lambda: norms.Hutchinson(every=0), "every"),
        (lambda: norms.Hutchinson(beta=1.0), "beta"),
        (lambda: norms.Hutchinson(seed=1.5), "seed"),
        (lambda: norms.EmpiricalFisher(eps=-1.0), "eps"),
        (lambda: norms.Safeguarded("rms"), "safeguard"),
        (lambda: norms.Safeguarded("rms", mu=0.5), "mu"),
        (lambda: norms.Safeguarded("rms", max_condition=float("inf")), "max_condition"),
        (lambda: norms.Safeguarded("nope", mu=2.0), "norm"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_safeguarded_norm_in_trust_region_bounds_mu_and_checkpoints_by_name():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    opt = trlib.TrustRegion(model.parameters(), norm=norms.Safeguarded("adagrad", mu=10.0))
    start = float(closure())
    for _ in range(15):
        opt.step(closure)
        assert trlib.equivalence_constant(opt.ellipsoid) <= 10.0 * (1 + 1e-6)
    assert float(closure()) < start
    saved = opt.state_dict()
    again = trlib.TrustRegion(model.parameters(), norm=norms.Safeguarded("adagrad", mu=10.0))
    again.load_state_dict(saved)
    torch.testing.assert_close(again.ellipsoid, opt.ellipsoid)
    with pytest.raises(ValueError, match="norm"):  # an unguarded Adagrad is another norm
        trlib.TrustRegion(model.parameters(), norm="adagrad").load_state_dict(saved)


def test_volume_matched_radius_gives_the_ellipse_and_ellipsoid_volumes_in_closed_form():
    # an ellipse with semi-axes p, q has area pi p q; an ellipsoid with semi-axes p, q, r volume 4/3 pi p q r
    radius, a = 0.3, torch.tensor([4.0, 0.09])
    p, q = (radius / math.sqrt(float(ai)) for ai in a)
    r2 = norms.volume_matched_radius(radius, a)
    assert math.isclose(math.pi * r2**2, math.pi * p * q, rel_tol=1e-12)
    a3 = torch.tensor([2.0, 50.0, 1e-3])
    semi = [1.7 / math.sqrt(float(ai)) for ai in a3]
    r3 = norms.volume_matched_radius(1.7, a3)
    assert math.isclose(4 / 3 * math.pi * r3**3, 4 / 3 * math.pi * semi[0] * semi[1] * semi[2], rel_tol=1e-12)
    assert min(semi) < r3 < max(semi)


def test_volume_matched_radius_matches_a_monte_carlo_area():
    g = torch.Generator().manual_seed(0)
    a, radius = torch.tensor([9.0, 0.25]), 1.0
    box = torch.tensor([radius / 3.0, radius / 0.5])  # the ellipse's semi-axes bound the sampling box
    pts = (torch.rand(400_000, 2, generator=g, dtype=torch.float64) * 2 - 1) * box
    inside = ((a * pts * pts).sum(1) <= radius**2).double().mean()
    area = float(inside) * float(4 * box.prod())
    assert math.isclose(math.pi * norms.volume_matched_radius(radius, a) ** 2, area, rel_tol=0.01)


def test_volume_matched_radius_scales_and_survives_many_dimensions():
    a = torch.rand(10_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e6 + 1e-8
    base = norms.volume_matched_radius(1e-3, a)
    assert math.isfinite(base) and base > 0  # prod(a) overflows float64 here; the logarithms do not
    assert math.isclose(norms.volume_matched_radius(1e-3, 16 * a), base / 4, rel_tol=1e-12)
    assert norms.volume_matched_radius(0.2, None) == 0.2
    assert norms.volume_matched_radius(0.2, torch.full((7,), 1.0)) == pytest.approx(0.2, rel=1e-15)


@pytest.mark.parametrize("radius, a, what", [(0.0, None, "radius"), (float("nan"), None, "radius"),
                                             (1.0, torch.tensor([1.0, 0.0]), "ellipsoid"),
                                             (1.0, torch.tensor([1.0, float("inf")]), "ellipsoid"),
                                             (1.0, torch.tensor([]), "ellipsoid")])
def test_volume_matched_radius_rejects_bad_input(radius, a, what):
    with pytest.raises(ValueError, match=f"Invalid {what}"):
        norms.volume_matched_radius(radius, a)
