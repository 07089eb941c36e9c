"""GGN products against a dense J^T H_L J built with torch.autograd.functional; per-sample gradients against a loop."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trlib
from trlib import analysis, curvature
from trlib.gauss_newton import ggn_operator, per_sample_gradients


def _dense_ggn(net, x, y, loss_fn):
    """J^T H_L J with J = d outputs / d params (jacobian) and H_L = d^2 loss / d outputs^2 (hessian)."""
    params = list(net.parameters())
    view = curvature.FlatView(params)
    names = [n for n, _ in net.named_parameters()]
    flat = view.get()

    def outputs(w):
        return torch.func.functional_call(net, dict(zip(names, view.split(w))), (x,))

    with curvature.frozen_batchnorm_stats(net):  # batch statistics, running ones untouched
        J = torch.autograd.functional.jacobian(lambda w: outputs(w).reshape(-1), flat)
        out = outputs(flat).detach()
    H_L = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out.shape), y), out.reshape(-1))
    return J.T @ H_L @ J


def _classifier(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return net, torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))


def _regressor(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.Softplus(), nn.Linear(6, 2)).double()
    return net, torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)


@pytest.mark.parametrize("case, loss, loss_fn", [
    (_classifier, "cross_entropy", F.cross_entropy),
    (_classifier, nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(reduction="sum")),
    (_regressor, "mse", F.mse_loss),
    (_regressor, nn.MSELoss(reduction="sum"), nn.MSELoss(reduction="sum")),
])
def test_ggn_matches_dense_jacobian_reference_and_is_psd(case, loss, loss_fn):
    net, x, y = case()
    G_ref = _dense_ggn(net, x, y, loss_fn)
    op = ggn_operator(net, x, y, loss)
    G = curvature.dense_hessian(op, G_ref.shape[0], dtype=torch.float64)  # through .batched
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op(v), G_ref @ v, rtol=1e-10, atol=1e-12)
    eig = np.linalg.eigvalsh(G.numpy())
    assert eig[0] >= -1e-12 * eig[-1]


def test_ggn_is_psd_where_the_hessian_is_not():
    net, x, y = _classifier(seed=3)
    params = list(net.parameters())
    g = curvature.flat_grad(F.cross_entropy(net(x), y), params, create_graph=True)
    H = curvature.dense_hessian(curvature.hvp_double_backward(g, params), g.numel(), dtype=torch.float64)
    G = curvature.dense_hessian(ggn_operator(net, x, y), g.numel(), dtype=torch.float64)
    assert np.linalg.eigvalsh(H.numpy())[0] < -1e-3
    assert np.linalg.eigvalsh(G.numpy())[0] >= -1e-12
    # the difference is the residual term sum_k dL/df_k d^2 f_k: zero on the last layer's weights
    last = slice(g.numel() - 3 * 5 - 3, g.numel())
    torch.testing.assert_close(G[last, last], H[last, last], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_equals_the_hessian_for_a_linear_model(loss):
    torch.manual_seed(1)
    net = nn.Linear(4, 3).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,)) if loss == "cross_entropy" else torch.randn(7, 3, dtype=torch.float64)
    fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    params = list(net.parameters())
    g = curvature.flat_grad(fn(net(x), y), params, create_graph=True)
    H = curvature.dense_hessian(curvature.hvp_double_backward(g, params), g.numel(), dtype=torch.float64)
    G = curvature.dense_hessian(ggn_operator(net, x, y, loss), g.numel(), dtype=torch.float64)
    torch.testing.assert_close(G, H, rtol=1e-10, atol=1e-12)


def test_ggn_batchnorm_uses_batch_statistics_and_leaves_running_ones():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().train()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    bn = net[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    op = ggn_operator(net, x, y)
    G = curvature.dense_hessian(op, sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    torch.testing.assert_close(G, _dense_ggn(net, x, y, F.cross_entropy), rtol=1e-10, atol=1e-12)


def test_ggn_works_where_an_hvp_does():
    net, x, y = _classifier(seed=4)
    op = ggn_operator(net, x, y)
    params = list(net.parameters())
    g = curvature.flat_grad(F.cross_entropy(net(x), y), params)
    G = curvature.dense_hessian(op, g.numel(), dtype=torch.float64)
    top = analysis.eigenpairs(op, g, k=2)
    np.testing.assert_allclose(top.values.numpy(), np.linalg.eigvalsh(G.numpy())[::-1][:2], rtol=1e-6)
    krylov = trlib.solve_subproblem(g, op, 0.5, method="gltr", rtol=1e-10)
    exact = trlib.solve_subproblem(g, G, 0.5, method="exact")
    assert float(krylov.model_decrease) == pytest.approx(float(exact.model_decrease), rel=1e-8)


def test_ggn_float32_and_a_parameter_subset():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    last = list(net[2].parameters())
    op = ggn_operator(net, x, y, params=last)
    v = torch.randn(18)
    gv = op(v)
    assert gv.dtype == torch.float32
    ref = _dense_ggn(copy.deepcopy(net).double(), x.double(), y, F.cross_entropy)[-18:, -18:]
    torch.testing.assert_close(gv.double(), ref @ v.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="nll"), "loss"),
    (dict(loss=F.l1_loss), "loss"),
    (dict(loss=nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64))), "loss"),
    (dict(loss="cross_entropy", reduction="none"), "reduction"),
    (dict(loss="mse"), "targets"),
    (dict(params=[torch.zeros(2, requires_grad=True)]), "params"),
])
def test_ggn_bad_input_raises_value_error_naming_it(kwargs, match):
    net, x, y = _classifier()
    with pytest.raises(ValueError, match=match):
        ggn_operator(net, x, y, **kwargs)


def test_ggn_refuses_ignored_targets_and_image_logits():
    net, x, y = _classifier()
    with pytest.raises(ValueError, match="targets"):
        ggn_operator(net, x, torch.full_like(y, -100))
    conv = nn.Conv2d(1, 3, 1).double()
    with pytest.raises(ValueError, match="outputs"):
        ggn_operator(conv, torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, 4, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- per-sample gradients
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_per_sample_gradients_match_a_loop(loss):
    net, x, y = _classifier(seed=6) if loss == "cross_entropy" else _regressor(seed=6)
    fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    params = list(net.parameters())
    G = per_sample_gradients(net, x, y, loss, chunk=4)
    loop = torch.stack([trlib.flat_grad(fn(net(x[i:i + 1]), y[i:i + 1]), params) for i in range(len(x))])
    torch.testing.assert_close(G, loop, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G.mean(0), trlib.flat_grad(fn(net(x), y), params), rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_feed_the_empirical_fisher_norm():
    net, x, y = _classifier(seed=7)
    G = per_sample_gradients(net, x, y)
    rule = trlib.norms.EmpiricalFisher(eps=1e-12)
    a = rule.update(rule.init(G[0]), G.mean(0), per_sample_grads=G)
    torch.testing.assert_close(a, (G**2).mean(0) + 1e-12)


def test_per_sample_gradients_refuse_batchnorm_in_train_mode():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="BatchNorm"):
        per_sample_gradients(net, x, y)
    assert per_sample_gradients(net.eval(), x, y).shape == (6, sum(p.numel() for p in net.parameters()))
    with pytest.raises(ValueError, match="batch"):
        per_sample_gradients(net, x, y[:5])
