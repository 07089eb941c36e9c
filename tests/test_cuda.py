"""The same contracts on a GPU. Skipped cleanly (and visibly) without CUDA."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import trlib
from reference import model, tr_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("method", ["cauchy", "cg", "gltr", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solvers_run_on_the_gpu_in_the_input_dtype(method, dtype):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    H = (q * np.linspace(-2, 5, 30)) @ q.T
    g = rng.standard_normal(30)
    a = 10 ** rng.uniform(-3, 3, 30)
    Ht = torch.tensor(H, dtype=dtype, device="cuda")
    res = trlib.solve_subproblem(torch.tensor(g, dtype=dtype, device="cuda"), lambda v: Ht @ v, 0.7,
                                 ellipsoid=torch.tensor(a, dtype=dtype, device="cuda"), method=method,
                                 rtol=0.0 if method == "gltr" else 1e-6)
    assert res.step.device.type == "cuda" and res.step.dtype == dtype
    s = res.step.double().cpu().numpy()
    assert np.sqrt(np.sum(a * s * s)) <= 0.7 * (1 + 1e-4)
    if method in ("gltr", "exact"):
        ref, _ = tr_reference(H, g, 0.7, a)
        assert model(H, g, s) <= model(H, g, ref) + 1e-3 * abs(model(H, g, ref))


def test_optimizer_on_gpu_matches_cpu():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()
    gpu = copy.deepcopy(net).cuda()
    x, y = torch.randn(128, 10, dtype=torch.float64), torch.randint(0, 3, (128,))
    xg, yg = x.cuda(), y.cuda()
    a = trlib.TrustRegion(net.parameters(), module=net)
    b = trlib.TrustRegion(gpu.parameters(), module=gpu)
    for _ in range(5):
        a.step(lambda: nn.functional.cross_entropy(net(x), y))
        b.step(lambda: nn.functional.cross_entropy(gpu(xg), yg))
    for p, q in zip(net.parameters(), gpu.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-6, atol=1e-9)
    state = b.state_dict()
    # a CG stopping test sitting on the tolerance may flip by rounding: products may differ by a few
    assert b.counts["gradient"] == a.counts["gradient"] and b.counts["forward"] == a.counts["forward"]
    assert abs(b.counts["hvp"] - a.counts["hvp"]) <= 5
    assert state["state"][0]["norm_state"]["square_avg"].is_cuda  # kept under the first parameter


def test_forward_over_reverse_on_gpu():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 10)).cuda()
    x, y = torch.randn(32, 3, 8, 8, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    opt = trlib.TrustRegion(net.parameters(), module=net, hvp="forward_over_reverse")
    for _ in range(3):
        opt.step(lambda: nn.functional.cross_entropy(net(x), y))
    assert opt.counts["gradient"] == 3 and all(torch.isfinite(p).all() for p in net.parameters())
