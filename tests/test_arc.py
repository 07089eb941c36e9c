"""ARC: the cubic solver object, the sigma rule, trlib.ARC (TrustRegion's contract) and minimize(method="arc")."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import trlib
from trlib.cubic import CubicSolver
from trlib.region import SigmaRule
from test_cubic import SETTINGS, _scale, cubic_reference, instances
from test_cubic import model as cubic_value


# ----------------------------------------------------------------------------- CubicSolver
@settings(**{**SETTINGS, "max_examples": 60})
@given(instances(kinds=("indefinite", "positive", "singular")))
def test_one_query_answers_every_sigma_like_the_dense_reference(inst):
    # one Lanczos basis serves a growing sigma (ARC's rejections): each answer is the reference optimum
    H, g, sigma, ellipsoid = inst
    Ht = torch.tensor(H)
    a = None if ellipsoid is None else torch.tensor(ellipsoid)
    solver = CubicSolver(rtol=1e-10).query(torch.tensor(g), lambda v: Ht @ v, a)
    for factor in (1.0, 3.0, 30.0):
        s_ref, _ = cubic_reference(H, g, sigma * factor, ellipsoid)
        r = solver.solve(sigma * factor)
        gap = (cubic_value(H, g, sigma * factor, r.step.numpy(), ellipsoid)
               - cubic_value(H, g, sigma * factor, s_ref, ellipsoid))
        assert gap <= 1e-7 * _scale(H, g, sigma * factor, ellipsoid, s_ref)
        assert not r.on_boundary


def test_a_larger_sigma_reuses_the_basis():
    d = torch.linspace(-1.0, 5.0, 200, dtype=torch.float64)
    g = torch.ones(200, dtype=torch.float64)
    solver = CubicSolver(rtol=1e-8).query(g, lambda v: d * v)
    first = solver.solve(1.0)
    again = [solver.solve(s).iterations for s in (2.0, 4.0, 8.0)]
    assert first.iterations > 5 and sum(again) < first.iterations
    exact = CubicSolver("exact").query(g, torch.diag(d))
    assert float(solver.solve(8.0).model_decrease) == pytest.approx(float(exact.solve(8.0).model_decrease), rel=1e-8)


# ----------------------------------------------------------------------------- SigmaRule
def test_sigma_rule_follows_cartis_gould_toint():
    rule = SigmaRule(eta1=0.1, eta2=0.9, increase=3.0, decrease=2.0, min_sigma=0.5)
    assert rule.update(1.2, 0.95) == (pytest.approx(0.5), True)  # very successful, floored
    assert rule.update(3.0, 0.95) == (pytest.approx(1.0), True)
    assert rule.update(3.0, 0.5) == (3.0, True)  # successful: unchanged
    assert rule.update(3.0, 0.05) == (6.0, False)  # rejected: more regularisation
    assert rule.update(3.0, -math.inf) == (6.0, False)  # a non-finite trial loss
    for kwargs, match in [(dict(min_sigma=0.0), "min_sigma"), (dict(eta1=0.95), "eta1"),
                          (dict(decrease=1.0), "decrease"), (dict(increase=0.5), "increase")]:
        with pytest.raises(ValueError, match=match):
            SigmaRule(**kwargs)


# ----------------------------------------------------------------------------- trlib.ARC
def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return model, x, y


def _train(model, opt, x, y, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        xb, yb = x[idx], y[idx]
        losses.append(float(opt.step(lambda: nn.functional.cross_entropy(model(xb), yb))))
    return losses


def test_one_exact_step_is_the_cubic_minimiser():
    # on a quadratic the cubic model over-estimates f by sigma/3 ||s||^3: rho >= 1, the step is the reference's
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    H = (q * np.array([-2.0, 0.5, 1.0, 3.0])) @ q.T
    c = rng.standard_normal(4)
    a = np.array([1.0, 4.0, 0.25, 2.0])
    Ht, ct = torch.tensor(H), torch.tensor(c)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = trlib.ARC([w], norm=torch.tensor(a), sigma=2.0, method="exact", increase=2.0)
    opt.step(lambda: ct @ w + 0.5 * w @ Ht @ w)
    s_ref, _ = cubic_reference(H, c, 2.0, a)
    np.testing.assert_allclose(w.detach().numpy(), s_ref, rtol=1e-8, atol=1e-10)
    assert opt.last["accepted"] and opt.last["rho"] >= 1.0
    assert opt.sigma == pytest.approx(1.0) and opt.radius is None


def test_lanczos_step_in_an_adaptive_norm_matches_the_reference():
    # a network's dense Hessian, the RMS ellipsoid of the step: the trial point is the reference optimum
    model, x, y = _problem()
    opt = trlib.ARC(model.parameters(), norm="rms", sigma=5.0, krylov_tol=1e-9, max_krylov=200)
    params, names = list(model.parameters()), [n for n, _ in model.named_parameters()]
    view = trlib.FlatView(params)
    before = view.get().detach().double()
    g = trlib.flat_grad(nn.functional.cross_entropy(model(x), y), params).double().numpy()
    H = torch.autograd.functional.hessian(lambda v: nn.functional.cross_entropy(
        torch.func.functional_call(model, dict(zip(names, view.split(v))), (x,)), y), view.get().detach())
    trials = []

    def closure():
        if not torch.is_grad_enabled():  # the trial point w + s
            trials.append(view.get().detach().double() - before)
        return nn.functional.cross_entropy(model(x), y)

    opt.step(closure)
    s, a, H = trials[-1].numpy(), opt.ellipsoid.double().numpy(), H.double().numpy()
    s_ref, _ = cubic_reference(H, g, 5.0, a)
    gap = cubic_value(H, g, 5.0, s, a) - cubic_value(H, g, 5.0, s_ref, a)
    assert gap <= 1e-6 * _scale(H, g, 5.0, a, s_ref), gap


def test_training_decreases_loss_and_counts_are_exact():
    model, x, y = _problem()
    opt = trlib.ARC(model.parameters())
    losses = _train(model, opt, x, y, 30)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    c = opt.counts
    assert c["gradient"] == 30 and c["forward"] == 30 and opt.backprops == c["gradient"] + c["hvp"]
    assert set(opt.last) >= {"sigma", "rho", "accepted", "iterations", "status"} and "radius" not in opt.last


def test_sub_sampled_products_weigh_their_fraction():
    model, x, y = _problem()
    opt = trlib.ARC(model.parameters())
    products = []
    for k in range(5):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y),
                 hessian_closure=lambda: nn.functional.cross_entropy(model(x[:16]), y[:16]), hessian_fraction=0.25)
        products.append(opt.last["iterations"])
    # the automatic first sigma spends one product; each product weighs 1/4, and the sub-batch gradient 1/4
    assert opt.counts["hvp"] == pytest.approx(0.25 * (sum(products) + 1))
    assert opt.counts["gradient"] == pytest.approx(5 * 1.25)


def test_state_dict_round_trip_resumes_bit_for_bit():
    model, x, y = _problem()
    opt = trlib.ARC(model.parameters(), norm="rms")
    _train(model, opt, x, y, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    tail = _train(model, opt, x, y, 6, seed=1)
    final = [p.detach().clone() for p in model.parameters()]
    model2, _, _ = _problem(seed=123)
    model2.load_state_dict(saved_model)
    opt2 = trlib.ARC(model2.parameters(), norm="rms")
    opt2.load_state_dict(saved_opt)
    assert _train(model2, opt2, x, y, 6, seed=1) == tail
    assert all(torch.equal(a, b) for a, b in zip(final, model2.parameters()))
    assert opt.counts == opt2.counts and opt.sigma == opt2.sigma
    with pytest.raises(ValueError, match="state_dict"):  # a TrustRegion checkpoint is not an ARC one
        trlib.TrustRegion(model2.parameters(), norm="rms").load_state_dict(saved_opt)


def test_a_rejected_step_leaves_the_weights_and_raises_sigma():
    model, x, y = _problem()
    opt = trlib.ARC(model.parameters(), norm="uniform", sigma=1.0, decrease=3.0)
    calls = []

    def closure():
        calls.append(1)
        loss = nn.functional.cross_entropy(model(x), y)
        return loss if len(calls) % 2 == 1 else loss * float("nan")  # every trial point is NaN

    before = [p.detach().clone() for p in model.parameters()]
    for k in range(3):
        opt.step(closure)
        assert not opt.last["accepted"] and opt.sigma == pytest.approx(3.0 ** (k + 1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(trlib.NonFiniteLossError):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y) * float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_saddle_is_left_along_negative_curvature():
    # f = w0^2 - w1^2 + w1^4 at its saddle 0: the gradient is 0, gtol lets the curvature move
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = trlib.ARC([w], norm="uniform", sigma=1.0, gtol=1e-12)
    f = lambda: w[0] ** 2 - w[1] ** 2 + w[1] ** 4  # noqa: E731
    for _ in range(30):
        opt.step(f)
    assert float(f().detach()) == pytest.approx(-0.25, abs=1e-6)
    assert abs(float(w[1].detach())) == pytest.approx(2 ** -0.5, abs=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.0), "sigma"), (dict(sigma=float("nan")), "sigma"), (dict(min_sigma=-1.0), "min_sigma"),
    (dict(method="cg"), "method"), (dict(eta1=2.0), "eta1"), (dict(decrease=0.5), "decrease"),
    (dict(krylov_tol=1.0), "krylov_tol"), (dict(max_krylov=0), "max_krylov"), (dict(hvp="x"), "hvp"),
    (dict(lr=-1.0), "lr"),
])
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, match):
    model, _, _ = _problem()
    with pytest.raises(ValueError, match=match):
        trlib.ARC(model.parameters(), **kwargs)


# ----------------------------------------------------------------------------- minimize(method="arc")
def test_minimize_arc_solves_rosenbrock_and_least_squares():
    rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # noqa: E731
    res = trlib.minimize(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64), method="arc")
    assert res.success and torch.allclose(res.x, torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert {"sigma", "rho"} <= set(res.history[0]) and "radius" not in res.history[0]
    rng = np.random.default_rng(0)
    A, b = rng.standard_normal((30, 8)), rng.standard_normal(30)
    At, bt = torch.tensor(A), torch.tensor(b)
    res = trlib.minimize(lambda x: ((At @ x - bt) ** 2).sum(), torch.zeros(8, dtype=torch.float64), method="arc",
                         norm="rms")
    np.testing.assert_allclose(res.x.numpy(), np.linalg.lstsq(A, b, rcond=None)[0], atol=1e-6)


@pytest.mark.parametrize("name", ["freudenstein-roth", "beale", "helical-valley", "wood", "brown-dennis"])
def test_minimize_arc_on_more_garbow_hillstrom_problems(name):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _mgh
    problem = next(p for p in _mgh.PROBLEMS if p.name == name)
    res = trlib.minimize(problem.f, problem.x0(), method="arc")
    assert res.success or problem.solved(res.fun), res
    assert problem.solved(res.fun) or res.grad_norm <= 1e-5


def test_minimize_arc_leaves_an_exact_saddle():
    f = lambda x: x[0] ** 2 - x[1] ** 2 + x[1] ** 4  # noqa: E731
    res = trlib.minimize(f, torch.zeros(2, dtype=torch.float64), method="arc")
    assert res.success and res.fun == pytest.approx(-0.25) and any(h["saddle_step"] for h in res.history)
    with pytest.raises(ValueError, match="sigma"):
        trlib.minimize(f, torch.zeros(2, dtype=torch.float64), method="arc", sigma=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_arc_on_the_gpu_takes_the_cpus_steps():
    runs = []
    for device in ("cpu", "cuda"):
        model, x, y = _problem()
        model, x, y = model.double().to(device), x.double().to(device), y.to(device)
        opt = trlib.ARC(model.parameters(), norm="rms")
        losses = _train(model, opt, x, y, 5)
        runs.append((losses, opt.sigma, [p.detach().cpu() for p in model.parameters()]))
    (l0, s0, p0), (l1, s1, p1) = runs
    assert l0 == pytest.approx(l1, rel=1e-8) and s0 == pytest.approx(s1, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(p0, p1))
