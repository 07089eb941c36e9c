"""trlib.minimize on variables of any form: a tensor of any shape, lists, tuples and dicts of
tensors, a module's parameters; each gives the 1-D problem's result, in the input's form."""

import numpy as np
import pytest
import torch
from torch import nn

import trlib


def _rosen_flat(x):
    """An extended Rosenbrock function of a flat vector (pairs of coordinates)."""
    a, b = x[0::2], x[1::2]
    return ((1 - a) ** 2 + 100 * (b - a * a) ** 2).sum()


def _start(n=12):
    return torch.linspace(-1.2, 1.0, n, dtype=torch.float64)


def _same_run(res, ref, unflat):
    assert (res.nit, res.nfev, res.ngev, res.nhvp, res.message) == (ref.nit, ref.nfev, ref.ngev, ref.nhvp, ref.message)
    assert res.fun == ref.fun and res.history == ref.history
    assert torch.equal(unflat, ref.x)


@pytest.mark.parametrize("method", ["gltr", "cg", "exact"])
def test_a_matrix_gives_the_flat_result_in_its_shape(method):
    ref = trlib.minimize(_rosen_flat, _start(), method=method, gtol=1e-10)
    res = trlib.minimize(lambda X: _rosen_flat(X.reshape(-1)), _start().reshape(3, 4), method=method, gtol=1e-10)
    assert ref.success and res.x.shape == (3, 4)
    _same_run(res, ref, res.x.reshape(-1))
    np.testing.assert_allclose(res.x.numpy(), np.ones((3, 4)), atol=1e-8)


def test_a_scalar_variable():
    res = trlib.minimize(lambda t: (t - 2.0) ** 4 + (t - 2.0) ** 2, torch.tensor(0.0, dtype=torch.float64),
                         gtol=1e-12)
    assert res.success and res.x.shape == () and float(res.x) == pytest.approx(2.0, abs=1e-6)


def test_lists_tuples_and_dicts_give_the_flat_result_in_their_form():
    ref = trlib.minimize(_rosen_flat, _start())
    x = _start()
    as_list = [x[:2].clone(), x[2:8].reshape(2, 3).clone(), x[8:].clone()]
    res = trlib.minimize(lambda v: _rosen_flat(torch.cat([t.reshape(-1) for t in v])), as_list)
    assert isinstance(res.x, list) and [t.shape for t in res.x] == [(2,), (2, 3), (4,)]
    _same_run(res, ref, torch.cat([t.reshape(-1) for t in res.x]))
    res = trlib.minimize(lambda v: _rosen_flat(torch.cat([t.reshape(-1) for t in v])), tuple(as_list))
    assert isinstance(res.x, tuple)
    _same_run(res, ref, torch.cat([t.reshape(-1) for t in res.x]))
    as_dict = {"head": as_list[0], "body": as_list[1], "tail": as_list[2]}
    res = trlib.minimize(lambda d: _rosen_flat(torch.cat([d["head"], d["body"].reshape(-1), d["tail"]])), as_dict)
    assert list(res.x) == ["head", "body", "tail"] and res.x["body"].shape == (2, 3)
    _same_run(res, ref, torch.cat([res.x["head"], res.x["body"].reshape(-1), res.x["tail"]]))
    assert torch.equal(as_list[1], x[2:8].reshape(2, 3))  # the start is not modified


def test_a_modules_parameters_reach_the_least_squares_solution_in_place():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    start = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])

    def flat(x):  # the same function of one flat vector
        return ((X @ x[:6].reshape(2, 3).T + x[6:] - Y) ** 2).mean()

    ref = trlib.minimize(flat, start, gtol=1e-12)
    res = trlib.minimize(lambda m: ((m(X) - Y) ** 2).mean(), model, gtol=1e-12)
    assert list(res.x) == ["weight", "bias"] and res.success
    torch.testing.assert_close(torch.cat([res.x["weight"].reshape(-1), res.x["bias"]]), ref.x, rtol=1e-12, atol=1e-14)
    assert (res.nit, res.nhvp) == (ref.nit, ref.nhvp)
    # the independent truth: the normal equations
    A = torch.cat([X, torch.ones(40, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(A, Y).solution
    torch.testing.assert_close(model.weight.detach(), solution[:3].T, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(model.bias.detach(), solution[3], rtol=1e-7, atol=1e-9)


def test_frozen_parameters_and_buffers_of_a_module_are_not_variables():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).double().eval()
    model[1].requires_grad_(False)
    frozen = model[1].weight.detach().clone()
    X = torch.randn(16, 2, dtype=torch.float64)
    res = trlib.minimize(lambda m: ((m(X) - 1.0) ** 2).mean(), model)
    assert list(res.x) == ["0.weight", "0.bias"] and torch.equal(model[1].weight, frozen)


def test_the_callback_and_a_fixed_ellipsoid_take_the_variables_form():
    seen = []
    scale = torch.full((3, 4), 2.0, dtype=torch.float64)
    res = trlib.minimize(lambda X: _rosen_flat(X.reshape(-1)), _start().reshape(3, 4), norm=scale,
                         callback=lambda x, info: seen.append(x.shape) or info["iteration"] >= 2)
    assert seen == [(3, 4)] * 3 and res.message == "stopped by callback"
    ref = trlib.minimize(_rosen_flat, _start(), norm=scale.reshape(-1), max_iter=3)
    flat = trlib.minimize(lambda X: _rosen_flat(X.reshape(-1)), _start().reshape(3, 4), norm=scale, max_iter=3)
    _same_run(flat, ref, flat.x.reshape(-1))


@pytest.mark.parametrize("x0, match", [
    ([], "no variables"),
    (nn.Linear(2, 2).requires_grad_(False), "no variables"),
    ([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], "mix"),
    ({"a": torch.zeros(2, dtype=torch.int32)}, "real floating-point"),
    ([torch.zeros(2, dtype=torch.complex64)], "real floating-point"),
    ("start", "expected a floating-point tensor"),
])
def test_bad_variables_are_a_clear_error(x0, match):
    with pytest.raises(ValueError, match=match):
        trlib.minimize(lambda v: torch.zeros(()), x0)


def test_a_container_ellipsoid_that_does_not_match_is_a_clear_error():
    with pytest.raises(ValueError, match="Invalid norm"):
        trlib.minimize(lambda v: sum((t ** 2).sum() for t in v), [torch.ones(2), torch.ones(3)],
                       norm=[torch.ones(2)])
