"""TrustRegion: every norm through the same contract (validation, state round-trip, NaN handling, counts)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import trlib
from trlib import curvature
from reference import tr_reference

NORMS = ["uniform", "adagrad", "rms", "adam"]


def _problem(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 3)]
    model = nn.Sequential(*layers)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return model, x, y


def _closure(model, x, y, idx=None):
    xb, yb = (x, y) if idx is None else (x[idx], y[idx])
    return lambda: nn.functional.cross_entropy(model(xb), yb)


def _train(model, opt, x, y, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        losses.append(float(opt.step(_closure(model, x, y, idx))))
    return losses, g


@pytest.mark.parametrize("norm", NORMS + ["hutchinson"])
@pytest.mark.parametrize("method", ["cg", "gltr"])
def test_state_dict_round_trip_resumes_bit_for_bit(norm, method):
    if norm == "hutchinson":
        norm = trlib.norms.Hutchinson(probes=2)
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters(), norm=norm, method=method)
    _train(model, opt, x, y, 5)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    tail, _ = _train(model, opt, x, y, 6, seed=1)
    final = [p.detach().clone() for p in model.parameters()]

    model2, _, _ = _problem(seed=123)  # different weights, overwritten by the checkpoint
    model2.load_state_dict(saved_model)
    opt2 = trlib.TrustRegion(model2.parameters(), norm=norm, method=method)
    opt2.load_state_dict(saved_opt)
    tail2, _ = _train(model2, opt2, x, y, 6, seed=1)
    assert tail == tail2
    for a, b in zip(final, model2.parameters()):
        assert torch.equal(a, b)
    assert opt.counts == opt2.counts and opt.radius == opt2.radius


@pytest.mark.parametrize("norm", NORMS + ["hutchinson"])
def test_counts_are_exact(norm, monkeypatch):
    # a norm that spends products (uses_curvature) gets the counted operator: they are counted too
    norm = trlib.norms.Hutchinson(probes=2) if norm == "hutchinson" else norm
    model, x, y = _problem()
    products, forwards = [], []
    real = curvature.hvp_double_backward

    def counting(g, params):
        op = real(g, params)

        def hvp(v):
            products.append(1)
            return op(v)

        return hvp

    monkeypatch.setattr(curvature, "hvp_double_backward", counting)
    opt = trlib.TrustRegion(model.parameters(), norm=norm)
    for _ in range(7):
        def closure():
            forwards.append(1)
            return nn.functional.cross_entropy(model(x), y)

        opt.step(closure)
    assert opt.counts["hvp"] == len(products) > 0
    assert opt.counts["gradient"] == 7
    assert opt.counts["gradient"] + opt.counts["forward"] == len(forwards)
    assert opt.backprops == 7 + len(products)


@pytest.mark.parametrize("norm", NORMS)
def test_training_decreases_loss(norm):
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters(), norm=norm)
    start = float(_closure(model, x, y)())
    for _ in range(40):
        opt.step(_closure(model, x, y))
    assert float(_closure(model, x, y)()) < 0.7 * start


def test_least_squares_reaches_closed_form_solution():
    torch.manual_seed(4)
    A, b = torch.randn(50, 5, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = trlib.TrustRegion([w], norm="uniform", radius=0.1, method="gltr", krylov_tol=1e-3, eta2=0.75, increase=2.0)
    for _ in range(60):
        opt.step(lambda: 0.5 * ((A @ w - b) ** 2).mean())
    expected = torch.linalg.lstsq(A, b).solution
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-8)


def test_one_exact_step_is_the_subproblem_minimiser():
    # On a quadratic the model is exact: rho = 1, and the step equals the reference minimiser.
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    H = (q * np.array([-2.0, 0.5, 1.0, 3.0])) @ q.T
    c = rng.standard_normal(4)
    Ht, ct = torch.tensor(H), torch.tensor(c)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = trlib.TrustRegion([w], norm="uniform", radius=0.3, method="exact")
    opt.step(lambda: ct @ w + 0.5 * w @ Ht @ w)
    s_ref, _ = tr_reference(H, c, 0.3)
    np.testing.assert_allclose(w.detach().numpy(), s_ref, rtol=1e-8, atol=1e-10)
    assert opt.last["accepted"] and opt.last["rho"] == pytest.approx(1.0, abs=1e-8)
    assert opt.radius == pytest.approx(0.3 * 1.1)


def test_nan_loss_at_current_point_raises_and_leaves_weights():
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(trlib.NonFiniteLossError, match="loss is nan"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y) * float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError):  # also a ValueError, for callers that catch those
        opt.step(lambda: nn.functional.cross_entropy(model(x), y) + float("inf"))


def test_nan_trial_loss_is_rejected_and_radius_shrinks():
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters(), norm="uniform", radius=0.5, decrease=2.0)
    calls = []

    def closure():
        calls.append(1)
        loss = nn.functional.cross_entropy(model(x), y)
        return loss if len(calls) % 2 == 1 else loss * float("nan")  # every trial point is NaN

    before = [p.detach().clone() for p in model.parameters()]
    for k in range(3):
        opt.step(closure)
        assert not opt.last["accepted"] and math.isnan(opt.last["trial_loss"])
        assert opt.radius == pytest.approx(0.5 / 2 ** (k + 1))
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored bit for bit


def test_zero_gradient_does_not_crash():
    w = torch.ones(3, requires_grad=True)
    for method in ("cauchy", "cg", "gltr", "exact"):
        opt = trlib.TrustRegion([w], method=method)
        loss = opt.step(lambda: (w * 0).sum() + 1.0)
        assert float(loss) == 1.0 and torch.equal(w.detach(), torch.ones(3))


def test_gtol_zero_gradient_escapes_saddle_with_gltr():
    # Algorithm 1 step 4: at a saddle, g := 0 and the step follows negative curvature.
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = trlib.TrustRegion([w], norm="uniform", radius=0.5, method="gltr", gtol=1e-8)
    f = lambda: w[0] ** 2 - w[1] ** 2 + w[1] ** 4  # noqa: E731
    for _ in range(30):
        opt.step(f)
    assert float(f()) == pytest.approx(-0.25, abs=1e-6)


def test_batchnorm_running_stats_move_once_per_step():
    model, x, y = _problem(bn=True)
    reference = copy.deepcopy(model)
    opt = trlib.TrustRegion(model.parameters(), module=model)
    opt.step(_closure(model, x, y))
    reference(x)  # one forward at the same starting weights
    bn, ref_bn = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_forward_over_reverse_matches_double_backward():
    model, x, y = _problem(bn=True)
    model, x = model.double(), x.double()  # float64: rounding must not flip a stopping test
    model2 = copy.deepcopy(model)
    a = trlib.TrustRegion(model.parameters(), module=model, norm="rms")
    b = trlib.TrustRegion(model2.parameters(), module=model2, norm="rms", hvp="forward_over_reverse")
    for _ in range(5):
        a.step(_closure(model, x, y))
        b.step(_closure(model2, x, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
    assert a.counts == b.counts


@pytest.mark.parametrize("kwargs, match", [
    (dict(radius=-1.0), "radius"),
    (dict(radius=100.0), "radius"),
    (dict(max_radius=0.0), "max_radius"),
    (dict(eta1=1.5), "eta1"),
    (dict(eta1=0.9, eta2=0.5), "eta1"),
    (dict(eta2=-0.1), "eta2"),
    (dict(increase=0.5), "increase"),
    (dict(decrease=1.0), "decrease"),
    (dict(method="dogleg"), "method"),
    (dict(krylov_tol=0.0), "krylov_tol"),
    (dict(max_krylov=0), "max_krylov"),
    (dict(beta=1.0), "beta"),
    (dict(eps=-1e-8), "eps"),
    (dict(gtol=-1.0), "gtol"),
    (dict(norm="ball"), "norm"),
    (dict(hvp="finite_differences"), "hvp"),
    (dict(hvp="forward_over_reverse"), "module"),
    (dict(check_every=0), "check_every"),
])
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, match):
    model, _, _ = _problem()
    with pytest.raises(ValueError, match=match):
        trlib.TrustRegion(model.parameters(), **kwargs)


def test_bad_closures_and_groups():
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters())
    with pytest.raises(ValueError, match="closure"):
        opt.step(None)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: model(x))  # not a scalar
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y).detach())
    with pytest.raises(ValueError, match="only \\['lr', 'weight_decay'\\] may differ"):
        trlib.TrustRegion([{"params": [model[0].weight]}, {"params": [model[2].weight], "method": "gltr"}])


@pytest.mark.parametrize("method", ["cauchy", "cg", "gltr", "exact"])
def test_an_hvp_of_the_wrong_shape_is_a_clear_error(method):
    g = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Invalid hvp: returned .*3.* for a vector of shape \(4,\)"):
        trlib.solve_subproblem(g, lambda v: v[:3], 1.0, method=method)


def test_last_step_is_readable():
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters(), norm="rms")
    opt.step(_closure(model, x, y))
    last = opt.last
    for key in ("radius", "rho", "accepted", "loss", "trial_loss", "model_decrease", "iterations",
                "on_boundary", "negative_curvature", "grad_norm", "status"):
        assert key in last
    assert last["radius"] > 0
    assert opt.ellipsoid is not None and opt.ellipsoid.shape == (sum(p.numel() for p in model.parameters()),)


@pytest.mark.parametrize("norm", ["uniform", "rms"])
def test_automatic_first_radius_is_the_cauchy_step_length(norm):
    rng = np.random.default_rng(6)
    A = rng.standard_normal((5, 5))
    H = torch.tensor(A @ A.T + np.eye(5))
    c = torch.tensor(rng.standard_normal(5))
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = trlib.TrustRegion([w], norm=norm)
    assert opt.radius is None
    opt.step(lambda: c @ w + 0.5 * w @ H @ w)
    g = c  # the gradient at w = 0
    a = torch.ones(5, dtype=torch.float64) if norm == "uniform" else (0.2 * g * g).sqrt() + 1e-8
    gt = g / a.sqrt()
    Ht = H / torch.outer(a.sqrt(), a.sqrt())
    expected = float(gt.norm() ** 3 / (gt @ Ht @ gt))
    assert opt.last["radius"] == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------- state, torch-style
HYPERPARAMETERS = ("norm", "radius", "max_radius", "eta1", "eta2", "increase", "decrease", "method", "krylov_tol",
                   "max_krylov", "beta", "eps", "gtol", "hvp", "check_every", "seed")


def test_every_hyperparameter_is_in_defaults_and_the_state_dict():
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters(), norm="adagrad", eps=1e-6, seed=7, method="gltr")
    opt.step(_closure(model, x, y))
    group = opt.state_dict()["param_groups"][0]
    assert set(HYPERPARAMETERS) <= set(opt.defaults) and set(HYPERPARAMETERS) <= set(group)
    assert (group["norm"], group["eps"], group["seed"], group["method"]) == ("adagrad", 1e-6, 7, "gltr")
    # the optimizer-wide state lives under the first parameter, as L-BFGS keeps its own
    assert list(opt.state_dict()["state"]) == [0]
    assert opt.state_dict()["state"][0]["radius"] == opt.radius


def test_checkpoint_of_another_norm_is_refused():
    model, x, y = _problem()
    rms = trlib.TrustRegion(model.parameters(), norm="rms")
    rms.step(_closure(model, x, y))
    adagrad = trlib.TrustRegion(model.parameters(), norm="adagrad")
    with pytest.raises(ValueError, match="norm 'rms'.*'adagrad'"):
        adagrad.load_state_dict(rms.state_dict())


def test_loaded_beta_rules_a_named_norm():
    model, x, y = _problem()
    a = trlib.TrustRegion(model.parameters(), norm="rms", beta=0.5)
    a.step(_closure(model, x, y))
    b = trlib.TrustRegion(model.parameters(), norm="rms", beta=0.9)
    b.load_state_dict(a.state_dict())
    assert b.norm.beta == 0.5 and b.param_groups[0]["beta"] == 0.5


def _damaged(kind, sd):
    sd = copy.deepcopy(sd)
    if kind == "empty":
        return {}
    if kind == "no_groups":
        del sd["param_groups"]
    elif kind == "missing_key":
        del sd["param_groups"][0]["eta1"]
    elif kind == "bad_hyperparameter":
        sd["param_groups"][0]["decrease"] = 0.5
    elif kind in ("nan_radius", "negative_radius"):
        sd["state"][0]["radius"] = math.nan if kind == "nan_radius" else -1.0
    elif kind == "missing_state":
        del sd["state"][0]["norm_state"]
    elif kind == "nan_norm_state":
        sd["state"][0]["norm_state"]["square_avg"][0] = math.nan
    return sd


@pytest.mark.parametrize("kind, match", [
    ("empty", "state_dict"), ("no_groups", "state_dict"), ("missing_key", "eta1"),
    ("bad_hyperparameter", "decrease"), ("nan_radius", "radius"), ("negative_radius", "radius"),
    ("missing_state", "norm_state"), ("nan_norm_state", "NaN"),
])
def test_damaged_state_dict_is_a_clear_error(kind, match):
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters(), norm="rms")
    opt.step(_closure(model, x, y))
    fresh = trlib.TrustRegion(model.parameters(), norm="rms")
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(_damaged(kind, opt.state_dict()))


def test_checkpoint_of_another_model_is_refused_at_load():
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters(), norm="uniform")
    opt.step(_closure(model, x, y))
    other = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
    with pytest.raises(ValueError, match="another model"):
        trlib.TrustRegion(other.parameters(), norm="uniform").load_state_dict(opt.state_dict())


def test_reading_attributes_creates_no_state():
    model, _, _ = _problem()
    opt = trlib.TrustRegion(model.parameters(), radius=0.3)
    assert (opt.radius, opt.counts, opt.backprops, opt.last, opt.ellipsoid) == (
        0.3, {"gradient": 0, "hvp": 0, "forward": 0}, 0, {}, None)
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}


def test_writing_the_groups_radius_sets_the_live_radius_and_max_radius_caps_it():
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters(), norm="uniform", radius=0.5, eta1=0.0, eta2=0.0, increase=2.0)
    opt.step(_closure(model, x, y))
    assert opt.radius == pytest.approx(1.0)  # rho >= eta2 = 0: grown
    opt.param_groups[0]["radius"] = 0.01
    opt.step(_closure(model, x, y))
    assert opt.last["radius"] == 0.01
    opt.param_groups[0]["max_radius"] = 0.005
    opt.step(_closure(model, x, y))
    assert opt.last["radius"] == 0.005


@pytest.mark.parametrize("params, match", [
    (lambda m: [m[0].weight, m[0].weight], "more than once"),
    (lambda m: [m[0].weight.detach().half().requires_grad_()], "float16"),
    (lambda m: [torch.zeros(3, dtype=torch.complex64, requires_grad=True)], "complex64"),
])
def test_parameters_it_cannot_handle_are_refused(params, match):
    model, _, _ = _problem()
    with pytest.raises(ValueError, match=match):
        trlib.TrustRegion(params(model))


def test_changing_requires_grad_after_the_first_step_is_a_clear_error():
    model, x, y = _problem()
    opt = trlib.TrustRegion(model.parameters())
    opt.step(_closure(model, x, y))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="require grad changed"):
        opt.step(_closure(model, x, y))


# ---------------------------------------------------------------------------- non-finite curvature
def test_non_finite_products_stop_with_a_clear_error_and_leave_everything(monkeypatch):
    # |w|^1.5 has a finite gradient but an infinite second derivative at 0.
    w = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    for method in ("cauchy", "cg", "gltr", "exact"):
        opt = trlib.TrustRegion([w], norm="rms", method=method, radius=0.1)
        opt.step(lambda: (w[1] - 2.0) ** 2 + w[0] ** 2)  # a regular first step
        w.data[0] = 0.0
        before, state = w.detach().clone(), copy.deepcopy(opt.state_dict())
        with pytest.raises(trlib.NonFiniteCurvatureError, match="NaN or inf"):
            opt.step(lambda: torch.abs(w[0]) ** 1.5 + (w[1] - 2.0) ** 2)
        assert torch.equal(w.detach(), before)
        after = opt.state_dict()
        assert after["state"][0]["radius"] == state["state"][0]["radius"]
        assert torch.equal(after["state"][0]["norm_state"]["square_avg"], state["state"][0]["norm_state"]["square_avg"])
        assert after["state"][0]["steps"] == state["state"][0]["steps"]


def test_forward_over_reverse_with_mse_loss_matches_double_backward():
    # mean-reduced mse_loss has a broken forward-mode rule in torch; the products fall back to
    # reverse-over-reverse through torch.func.vjp.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    model2 = copy.deepcopy(model)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    a = trlib.TrustRegion(model.parameters(), module=model)
    b = trlib.TrustRegion(model2.parameters(), module=model2, hvp="forward_over_reverse")
    for loss in (nn.functional.mse_loss, nn.functional.huber_loss):
        for _ in range(3):
            a.step(lambda: loss(model(x), y))
            b.step(lambda: loss(model2(x), y))
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    assert a.counts == b.counts


def test_a_non_finite_gradient_of_a_finite_loss_raises_and_leaves_weights():
    # the gradient's screen (its sum) fails on NaN or inf; the entrywise test confirms it
    for bad in (math.nan, math.inf):
        w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        opt = trlib.TrustRegion([w])
        scale = torch.tensor([1.0, bad, 1.0])

        with pytest.raises(trlib.NonFiniteLossError, match="the gradient contains NaN/inf"):
            opt.step(lambda: (w * w).sum() + _Spike.apply(w, scale))
        assert torch.equal(w.detach(), torch.tensor([0.5, -1.0, 2.0]))


class _Spike(torch.autograd.Function):
    """Value 0, gradient ``scale`` (a finite loss whose gradient may be NaN or inf)."""

    @staticmethod
    def forward(ctx, w, scale):
        ctx.save_for_backward(scale)
        return w.sum() * 0.0

    @staticmethod
    def backward(ctx, grad_output):
        (scale,) = ctx.saved_tensors
        return grad_output * scale, None
