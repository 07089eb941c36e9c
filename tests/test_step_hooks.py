"""step(curvature=...) and step(per_sample_grads=...): GGN curvature and the empirical Fisher norm in TrustRegion and ARC."""

import numpy as np
import pytest
import torch
from torch import nn

import trlib
from trlib.gauss_newton import ggn_operator, per_sample_gradients
from reference import tr_reference
from test_cubic import cubic_reference


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    return model, x, y


def _dense_ggn(model, x, y):
    """J^T H_L J from the dense Jacobian of the logits and the softmax Hessian, sample by sample."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    view = trlib.FlatView(params)
    w = view.get().detach()
    J = torch.autograd.functional.jacobian(
        lambda v: torch.func.functional_call(model, dict(zip(names, view.split(v))), (x,)), w)  # (B, C, n)
    p = torch.softmax(model(x).detach(), dim=1)
    G = torch.zeros(w.numel(), w.numel(), dtype=torch.float64)
    for i in range(x.shape[0]):
        HL = torch.diag(p[i]) - torch.outer(p[i], p[i])
        G += J[i].T @ HL @ J[i] / x.shape[0]
    return G.numpy()


def _trial_recorder(model, x, y):
    view = trlib.FlatView(list(model.parameters()))
    start, trials = view.get().clone(), []

    def closure():
        if not torch.is_grad_enabled():
            trials.append((view.get() - start).numpy())
        return nn.functional.cross_entropy(model(x), y)

    return closure, trials


@pytest.mark.parametrize("cls", ["TrustRegion", "ARC"])
def test_a_ggn_step_is_the_subproblem_minimiser_for_the_dense_ggn(cls):
    model, x, y = _problem()
    G = _dense_ggn(model, x, y)
    g = trlib.flat_grad(nn.functional.cross_entropy(model(x), y), list(model.parameters())).detach().numpy()
    closure, trials = _trial_recorder(model, x, y)
    if cls == "ARC":
        opt = trlib.ARC(model.parameters(), norm="uniform", sigma=3.0, method="exact")
        s_ref, _ = cubic_reference(G, g, 3.0)
    else:
        opt = trlib.TrustRegion(model.parameters(), norm="uniform", radius=0.5, method="exact")
        s_ref, _ = tr_reference(G, g, 0.5)
    n = g.size
    opt.step(closure, curvature=lambda: ggn_operator(model, x, y, "cross_entropy"))
    np.testing.assert_allclose(trials[0], s_ref, rtol=1e-7, atol=1e-9)
    # the dense solver spent n products on G; its setup is one forward pass; no double backward
    assert opt.counts == {"gradient": 1, "hvp": n, "forward": 2}


def test_ggn_on_a_sub_batch_weighs_its_fraction_and_trains():
    model, x, y = _problem()
    opt = trlib.ARC(model.parameters(), norm="rms")
    losses = []
    for _ in range(15):
        losses.append(float(opt.step(lambda: nn.functional.cross_entropy(model(x), y),
                                     curvature=lambda: ggn_operator(model, x[:5], y[:5]), hessian_fraction=0.25)))
    assert losses[-1] < 0.7 * losses[0]
    c = opt.counts
    assert c["gradient"] == 15 and c["forward"] == pytest.approx(15 + 15 * 0.25)
    assert (c["hvp"] / 0.25) == pytest.approx(round(c["hvp"] / 0.25))


def test_fisher_norm_gets_the_per_sample_gradients():
    model, x, y = _problem()
    params = list(model.parameters())
    rows = []  # the per-sample gradients one sample at a time: the independent truth
    for i in range(x.shape[0]):
        rows.append(trlib.flat_grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params).detach())
    F = torch.stack(rows).pow(2).mean(0)
    opt = trlib.TrustRegion(params, norm="fisher", eps=1e-8)
    opt.step(lambda: nn.functional.cross_entropy(model(x), y),
             per_sample_grads=lambda: per_sample_gradients(model, x, y))
    torch.testing.assert_close(opt.ellipsoid, F + 1e-8, rtol=1e-10, atol=1e-12)  # first step: bias-corrected F
    assert opt.counts["gradient"] == 2  # the batch gradient and the per-sample pass


def test_the_hooks_refuse_what_cannot_work():
    model, x, y = _problem()
    loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    with pytest.raises(ValueError, match="per_sample_grads"):
        trlib.TrustRegion(model.parameters(), norm="fisher").step(loss)
    with pytest.raises(ValueError, match="per_sample_grads"):
        trlib.ARC(model.parameters(), norm="rms").step(loss, per_sample_grads=lambda: per_sample_gradients(model, x, y))
    opt = trlib.TrustRegion(model.parameters())
    with pytest.raises(ValueError, match="curvature"):
        opt.step(loss, curvature=lambda: ggn_operator(model, x, y), hessian_closure=loss, hessian_fraction=1.0)
    with pytest.raises(ValueError, match="curvature"):
        opt.step(loss, curvature=lambda: "not an operator")
    with pytest.raises(ValueError, match="not the operator itself"):
        opt.step(loss, curvature=ggn_operator(model, x, y))
    with pytest.raises(ValueError, match="loss"):  # GGN needs a loss convex in the outputs with a known Hessian
        opt.step(loss, curvature=lambda: ggn_operator(model, x, y, nn.functional.l1_loss))
