"""TrustRegion.step's stochastic options: Hessian-vector products on a sub-batch
(``hessian_closure``, ``hessian_fraction``), the free gradient-noise estimate, and the ratio
test on an independent batch (``test_closure``), against dense linear algebra and direct
autograd computations."""

import math

import numpy as np
import pytest
import torch

import trlib



def least_squares(n=64, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d)
    y = x @ torch.randn(d, generator=g) + 0.3 * torch.randn(n, generator=g)
    return x, y


def loss_on(w, x, y):
    return 0.5 * (x @ w - y).pow(2).mean()


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_sub_batch_products_give_the_sub_sampled_newton_step():
    x, y = least_squares()
    w = torch.zeros(5, requires_grad=True)
    opt = trlib.TrustRegion([w], norm="uniform", method="exact", radius=1e3, max_radius=1e4, eta1=0.0)
    opt.step(lambda: loss_on(w, x, y), hessian_closure=lambda: loss_on(w, x[:16], y[:16]), hessian_fraction=16 / 64)
    xs, xb, yb = x[:16].numpy(), x.numpy(), y.numpy()
    h_sub, g = xs.T @ xs / 16, xb.T @ (-yb) / 64  # the sub-batch's Hessian, the batch's gradient at w = 0
    newton = -np.linalg.solve(h_sub, g)
    assert opt.last["accepted"] and not opt.last["on_boundary"]
    np.testing.assert_allclose(w.detach().numpy(), newton, rtol=1e-9, atol=1e-12)
    assert opt.last["model_decrease"] == pytest.approx(-(g @ newton + 0.5 * newton @ h_sub @ newton), rel=1e-9)
    # the batch's own Hessian would give another step: the products came from the sub-batch
    assert not np.allclose(newton, -np.linalg.solve(xb.T @ xb / 64, g), rtol=1e-3)
    counts = opt.counts
    assert counts["gradient"] == 1 + 1 / 4 and counts["hvp"] == opt.last["iterations"] / 4
    assert opt.backprops == counts["gradient"] + counts["hvp"] and opt.last["hessian_fraction"] == 1 / 4


@pytest.mark.parametrize("hvp", ["double_backward", "forward_over_reverse"])
def test_counts_weigh_each_product_by_the_fraction_and_both_product_modes_agree(hvp):
    torch.manual_seed(0)
    x, labels = torch.randn(96, 6), torch.randint(0, 3, (96,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    f = torch.nn.functional.cross_entropy
    opts = [trlib.TrustRegion(m.parameters(), hvp=mode, module=m, radius=0.1)
            for m, mode in ((model, "double_backward"), (twin, hvp))]
    products = []
    for step in range(5):
        batch = slice(16 * step, 16 * step + 16)
        for m, opt in zip((model, twin), opts):
            opt.step(lambda: f(m(x[batch]), labels[batch]), hessian_closure=lambda: f(m(x[batch][:4]), labels[batch][:4]),
                     hessian_fraction=0.25)
        products.append(opts[0].last["iterations"])
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert opts[0].counts == dict(gradient=5 * 1.25, hvp=0.25 * sum(products), forward=5)
    assert opts[1].counts["hvp"] == opts[0].counts["hvp"]
    # forward-over-reverse forms no sub-batch gradient: no pass for it, and no noise estimate
    assert opts[1].counts["gradient"] == (5 if hvp == "forward_over_reverse" else 5 * 1.25)
    assert ("noise" in opts[1].last) == (hvp == "double_backward")


@pytest.mark.parametrize("norm", ["uniform", "rms"])
def test_the_noise_estimate_is_the_sub_batch_difference_in_the_region_metric(norm):
    x, y = least_squares(seed=1)
    w = torch.full((5,), 0.3, requires_grad=True)
    opt = trlib.TrustRegion([w], norm=norm, radius=0.01)
    opt.step(lambda: loss_on(w, x, y), hessian_closure=lambda: loss_on(w, x[:16], y[:16]), hessian_fraction=0.25)
    w0 = torch.full((5,), 0.3, requires_grad=True)
    g_b = torch.autograd.grad(loss_on(w0, x, y), w0)[0]
    g_s = torch.autograd.grad(loss_on(w0, x[:16], y[:16]), w0)[0]
    dual = torch.ones(5) if norm == "uniform" else 1 / opt.ellipsoid  # the gradient's metric A^{-1}
    assert opt.last["noise_var"] == pytest.approx(float((dual * (g_s - g_b) ** 2).sum()) / 3, rel=1e-12)
    assert opt.last["grad_sq"] == pytest.approx(float((dual * g_b ** 2).sum()), rel=1e-12)
    assert opt.last["noise"] == pytest.approx(opt.last["noise_var"] / opt.last["grad_sq"], rel=1e-12)


def test_the_noise_estimate_is_unbiased_for_the_batch_gradient_variance():
    # Over random sub-batches S of a fixed batch B, E||g_S - g_B||^2 / (|B|/|S| - 1) = s^2 / |B|, with
    # s^2 the unbiased sample variance of the per-sample gradients: the variance of g_B.
    x, y = least_squares(n=48, seed=2)
    w0 = torch.full((5,), -0.2)
    per_sample = x * (x @ w0 - y)[:, None]  # closed form of each sample's gradient
    s2 = float(((per_sample - per_sample.mean(0)) ** 2).sum()) / (48 - 1)
    g = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(3000):
        w = w0.clone().requires_grad_(True)
        idx = torch.randperm(48, generator=g)[:12]
        opt = trlib.TrustRegion([w], norm="uniform", radius=1e-3)
        opt.step(lambda: loss_on(w, x, y), hessian_closure=lambda: loss_on(w, x[idx], y[idx]), hessian_fraction=0.25)
        estimates.append(opt.last["noise_var"])
    mean, sem = np.mean(estimates), np.std(estimates) / math.sqrt(len(estimates))
    assert abs(mean - s2 / 48) < 4 * sem and sem < 0.05 * s2 / 48


def test_an_independent_batch_decides_acceptance():
    x, y = least_squares(seed=3)
    w = torch.zeros(5, requires_grad=True)
    opt = trlib.TrustRegion([w], norm="uniform", radius=0.5)
    test_x, test_y = x[32:], y[32:]
    opt.step(lambda: loss_on(w, x[:32], y[:32]), test_closure=lambda: loss_on(w, test_x, test_y))
    last, w1 = opt.last, w.detach().clone()
    before, after = float(loss_on(torch.zeros(5), test_x, test_y)), float(loss_on(w1, test_x, test_y))
    assert last["accepted"] and last["test_loss"] == pytest.approx(before, rel=1e-14)
    assert last["trial_loss"] == pytest.approx(after, rel=1e-14)
    assert last["rho"] == pytest.approx((before - after) / last["model_decrease"], rel=1e-9)
    assert last["loss"] == pytest.approx(float(loss_on(torch.zeros(5), x[:32], y[:32])), rel=1e-14)
    assert opt.counts["forward"] == 2
    # a test batch whose loss rises along the step rejects it, and the weights come back bit for bit
    flipped = -test_y
    opt.step(lambda: loss_on(w, x[:32], y[:32]), test_closure=lambda: loss_on(w, test_x, flipped))
    assert not opt.last["accepted"] and opt.last["rho"] < 0 and torch.equal(w.detach(), w1)


def test_bad_stochastic_options_are_clear_errors():
    x, y = least_squares()
    w = torch.zeros(5, requires_grad=True)
    opt = trlib.TrustRegion([w])
    closure, sub = (lambda: loss_on(w, x, y)), (lambda: loss_on(w, x[:8], y[:8]))
    with pytest.raises(ValueError, match="a hessian_closure needs hessian_fraction"):
        opt.step(closure, hessian_closure=sub)
    with pytest.raises(ValueError, match="it describes a hessian_closure, and none was given"):
        opt.step(closure, hessian_fraction=0.5)
    for bad in (0, -0.5, math.nan, math.inf, True, "1/8"):
        with pytest.raises(ValueError, match="Invalid hessian_fraction"):
            opt.step(closure, hessian_closure=sub, hessian_fraction=bad)
    with pytest.raises(ValueError, match="Invalid test_closure: expected a function"):
        opt.step(closure, test_closure=torch.tensor(1.0))
    with pytest.raises(ValueError, match="Invalid test_closure: it must return the loss as a scalar tensor"):
        opt.step(closure, test_closure=lambda: (x @ w - y).detach())
    with pytest.raises(ValueError, match="Invalid hessian_closure: the loss does not depend on the parameters"):
        opt.step(closure, hessian_closure=lambda: loss_on(w, x, y).detach(), hessian_fraction=0.5)
    assert opt.counts["forward"] == 0 and torch.equal(w, torch.zeros(5))


def test_non_finite_sub_batch_curvature_leaves_the_weights_and_state_alone():
    x, y = least_squares()
    w = torch.zeros(5, requires_grad=True)
    opt = trlib.TrustRegion([w], norm="rms", radius=0.1)
    opt.step(lambda: loss_on(w, x, y))
    w1, state = w.detach().clone(), opt.state_dict()
    with pytest.raises(trlib.NonFiniteCurvatureError):
        opt.step(lambda: loss_on(w, x, y), hessian_closure=lambda: loss_on(w, x[:8], y[:8]) * math.inf,
                 hessian_fraction=0.125)
    assert torch.equal(w.detach(), w1) and opt.state_dict()["state"][0]["steps"] == state["state"][0]["steps"] == 1
    assert torch.equal(opt.state_dict()["state"][0]["norm_state"]["square_avg"], state["state"][0]["norm_state"]["square_avg"])


def test_counts_stay_integers_without_a_sub_batch():
    x, y = least_squares()
    w = torch.zeros(5, requires_grad=True)
    opt = trlib.TrustRegion([w], radius=0.1)
    for _ in range(3):
        opt.step(lambda: loss_on(w, x, y))
    assert all(type(v) is int for v in opt.counts.values()) and type(opt.backprops) is int
