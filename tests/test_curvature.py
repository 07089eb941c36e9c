"""Hessian-vector products against central finite differences of the gradient, and each other."""

import pytest
import torch
from torch import nn

import trlib
from trlib import curvature


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3)).double().train()


def _data(model):
    torch.manual_seed(1)
    if isinstance(model[0], nn.Conv2d):
        return torch.randn(8, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    return torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))


def _fd_hvp(model, closure, params, v, h=1e-5):
    """(g(w + h v) - g(w - h v)) / 2h, with BatchNorm's running stats untouched (train-mode batch stats)."""
    view = curvature.FlatView(params)
    with curvature.frozen_batchnorm_stats(model):
        view.add_(v, alpha=h)
        gp = curvature.flat_grad(closure(), params)
        view.add_(v, alpha=-2 * h)
        gm = curvature.flat_grad(closure(), params)
        view.add_(v, alpha=h)
    return (gp - gm) / (2 * h)


@pytest.mark.parametrize("build", [_mlp, _bn_cnn])
def test_both_modes_match_finite_differences(build):
    model = build()
    x, y = _data(model)
    params = list(model.parameters())
    closure = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    torch.manual_seed(2)
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    fd = _fd_hvp(model, closure, params, v)

    with curvature.frozen_batchnorm_stats(model):
        g = curvature.flat_grad(closure(), params, create_graph=True)
    hv_db = curvature.hvp_double_backward(g, params)(v)
    f = curvature.functional_loss(closure, model, params)
    with curvature.frozen_batchnorm_stats(model):
        hv_fr = curvature.hvp_forward_over_reverse(f, params)(v)
    torch.testing.assert_close(hv_db, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(hv_fr, fd, rtol=1e-6, atol=1e-8)


def test_linearized_matches_double_backward():
    model = _mlp()
    x, y = _data(model)
    params = list(model.parameters())
    closure = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    g = curvature.flat_grad(closure(), params, create_graph=True)
    db = curvature.hvp_double_backward(g, params)
    lin = curvature.hvp_linearized(curvature.functional_loss(closure, model, params), params)
    for seed in range(3):
        torch.manual_seed(seed)
        v = torch.randn(g.numel(), dtype=torch.float64)
        torch.testing.assert_close(lin(v), db(v), rtol=1e-9, atol=1e-12)


def test_hvps_do_not_touch_batchnorm_running_stats():
    model = _bn_cnn()
    x, y = _data(model)
    params = list(model.parameters())
    closure = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    bn = model[1]
    g = curvature.flat_grad(closure(), params, create_graph=True)  # one forward: stats move once
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    v = torch.ones(g.numel(), dtype=torch.float64)
    db = curvature.hvp_double_backward(g, params)
    f = curvature.functional_loss(closure, model, params)
    for _ in range(3):
        db(v)
        with curvature.frozen_batchnorm_stats(model):
            curvature.hvp_forward_over_reverse(f, params)(v)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == count
    assert bn.track_running_stats  # restored on exit


def test_dense_hessian_matches_torch_autograd_functional():
    torch.manual_seed(3)
    A = torch.randn(4, 4, dtype=torch.float64)
    fun = lambda w: torch.tanh(A @ w).pow(2).sum() + (w**4).sum()  # noqa: E731
    w0 = torch.randn(4, dtype=torch.float64)
    value, grad, hvp = curvature.function_hvp(fun, w0)
    expected = torch.autograd.functional.hessian(fun, w0)
    torch.testing.assert_close(trlib.dense_hessian(hvp, 4, dtype=torch.float64), expected)
    torch.testing.assert_close(grad, torch.autograd.functional.jacobian(fun, w0))
    assert float(value) == pytest.approx(float(fun(w0)))


def test_zero_hessian_and_unused_parameters():
    w = torch.ones(3, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    g = curvature.flat_grad((2 * w).sum(), [w, unused], create_graph=True)
    assert g.tolist() == [2.0, 2.0, 2.0, 0.0, 0.0]
    hv = curvature.hvp_double_backward(g, [w, unused])(torch.ones(5))
    assert hv.tolist() == [0.0] * 5


def test_flat_view_round_trip():
    a, b = torch.zeros(2, 3), torch.zeros(4)
    view = curvature.FlatView([a, b])
    flat = torch.arange(10.0)
    parts = view.split(flat)
    assert torch.equal(view.flatten(parts), flat)
    view.add_(flat, alpha=2.0)
    assert torch.equal(view.get(), 2 * flat)


def test_forward_over_reverse_needs_module_parameters():
    model = _mlp()
    stranger = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="params"):
        curvature.functional_loss(lambda: model(torch.zeros(1, 5)).sum(), model, [stranger])


def test_batched_products_build_the_same_dense_hessian():
    model = _bn_cnn()
    x, y = _data(model)
    params = list(model.parameters())
    closure = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    with curvature.frozen_batchnorm_stats(model):
        g = curvature.flat_grad(closure(), params, create_graph=True)
        db = curvature.hvp_double_backward(g, params)
        fr = curvature.hvp_forward_over_reverse(curvature.functional_loss(closure, model, params), params)
        n = g.numel()
        looped = trlib.dense_hessian(lambda v: db(v), n, dtype=torch.float64)  # no .batched: one by one
        batched_db = trlib.dense_hessian(db, n, dtype=torch.float64, chunk=50)
        batched_fr = trlib.dense_hessian(fr, n, dtype=torch.float64, chunk=50)
    torch.testing.assert_close(batched_db, looped, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(batched_fr, looped, rtol=1e-9, atol=1e-11)
    v = torch.randn(n, dtype=torch.float64)
    torch.testing.assert_close(looped @ v, db(v), rtol=1e-9, atol=1e-11)


def test_operator_counts_scales_and_densifies():
    torch.manual_seed(4)
    A = torch.randn(5, 5, dtype=torch.float64)
    H = A + A.T
    d = torch.rand(5, dtype=torch.float64) + 0.5
    counts = {"hvp": 0}
    calls = []

    def matvec(v):
        calls.append(1)
        return H @ v

    op = curvature.Operator(matvec, 5, dtype=torch.float64, device="cpu")
    weighted = op.scaled(d).counted(counts, weight=0.25)  # e.g. a product on a quarter of the batch
    v = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(weighted(v), d * (H @ (d * v)))
    torch.testing.assert_close(weighted.dense(), d[:, None] * H * d[None, :])
    assert counts["hvp"] == 0.25 * (1 + 5) and len(calls) == 6
    rows = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(op.batched(rows), rows @ H)
    matrix = curvature.Operator.from_matrix(H).counted(counts)
    assert torch.equal(matrix.dense(), H) and counts["hvp"] == 1.5  # a given matrix costs no products
    with pytest.raises(ValueError, match="square"):
        curvature.Operator.from_matrix(torch.ones(2, 3))


def test_operator_checks_the_shape_of_products_and_can_be_vmapped():
    bad = curvature.Operator(lambda v: torch.cat([v, v]), 3, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="returned"):
        bad(torch.ones(3))
    op = curvature.Operator.from_matrix(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
    torch.testing.assert_close(torch.func.vmap(op)(torch.eye(3)), torch.diag(torch.tensor([1.0, 2.0, 3.0])))
