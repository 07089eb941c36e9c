"""Curvature analysis against dense eigendecompositions (numpy.linalg.eigh) of small networks' Hessians."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from trlib import analysis, curvature


def _network_hessian(build, dtype=torch.float64, batch=40, seed=0):
    """(hvp, like, dense H as NumPy) for the cross-entropy of a small network on random data."""
    torch.manual_seed(seed)
    net = build().to(dtype)
    x = torch.randn(batch, 6, dtype=dtype)
    y = torch.randint(0, 3, (batch,))
    params = list(net.parameters())
    g = curvature.flat_grad(nn.functional.cross_entropy(net(x), y), params, create_graph=True)
    hvp = curvature.hvp_double_backward(g, params)
    dense = curvature.dense_hessian(hvp, g.numel(), dtype=dtype)
    return hvp, g.detach(), dense.double().numpy()


def _tanh_mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _softplus_mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 5), nn.Softplus(), nn.Linear(5, 3))


@pytest.mark.parametrize("build", [_tanh_mlp, _softplus_mlp])
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_eigenpairs_match_numpy_eigh_on_network_hessians(build, which):
    hvp, like, H = _network_hessian(build)
    w, U = np.linalg.eigh(H)
    order = {"largest": np.argsort(-w), "smallest": np.argsort(w), "magnitude": np.argsort(-np.abs(w))}[which][:5]
    res = analysis.eigenpairs(hvp, like, k=5, which=which, tol=1e-8)
    assert res.converged and res.products < len(w)
    values, vectors = res.values.numpy(), res.vectors.numpy()
    scale = np.abs(w).max()
    # the residuals Lanczos reports are the true ones, and below the stated tolerance
    true_residuals = np.linalg.norm(vectors @ H - values[:, None] * vectors, axis=1)
    np.testing.assert_allclose(true_residuals, res.residuals.numpy(), rtol=1e-3, atol=1e-12 * scale)
    assert np.all(true_residuals <= 1e-8 * scale * 1.001)
    # Kahan: each value within its residual of the eigenvalue it stands for; none is missed
    assert np.all(np.abs(values - w[order]) <= true_residuals + 1e-13 * scale)
    # vectors: unit norm, and within angle residual / gap of the true eigenvector
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-12)
    gaps = np.array([np.min(np.abs(np.delete(w, i) - w[i])) for i in order])
    sines = np.sqrt(np.clip(1 - (np.sum(vectors * U[:, order].T, axis=1)) ** 2, 0, None))
    assert np.all(sines <= true_residuals / gaps + 1e-7)


def test_eigenpairs_float32_network():
    hvp, like, H = _network_hessian(_tanh_mlp, dtype=torch.float32)
    w = np.linalg.eigvalsh(H)
    res = analysis.eigenpairs(hvp, like, k=3, tol=1e-5)
    assert res.vectors.dtype == torch.float32 and res.converged
    np.testing.assert_allclose(res.values.numpy(), w[::-1][:3], atol=1e-5 * np.abs(w).max())


def test_multiple_eigenvalue_found_once_the_krylov_space_is_invariant():
    # A 5-D operator with a double top eigenvalue: the Krylov space of a random start is
    # 4-D and invariant; the restart in its complement finds the second copy.
    d = torch.tensor([5.0, 1.0, 5.0, 2.0, 3.0], dtype=torch.float64)
    res = analysis.eigenpairs(lambda v: d * v, d, k=3)
    np.testing.assert_allclose(res.values.numpy(), [5.0, 5.0, 3.0], atol=1e-12)
    gram = res.vectors @ res.vectors.T
    torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_eigenpairs_warns_when_max_iter_stops_it():
    d = torch.linspace(0.0, 1.0, 500, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        res = analysis.eigenpairs(lambda v: d * v, d, k=2, max_iter=6)
    assert not res.converged and res.products == 6


def test_eigenpairs_deterministic_and_seedable():
    hvp, like, _ = _network_hessian(_tanh_mlp)
    a = analysis.eigenpairs(hvp, like, k=2)
    b = analysis.eigenpairs(hvp, like, k=2)
    c = analysis.eigenpairs(hvp, like, k=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.vectors, b.vectors)
    torch.testing.assert_close(a.values, c.values, rtol=1e-8, atol=0)


def test_hutchinson_exact_over_all_sign_patterns():
    # E over z uniform on {-1, 1}^n is an average over the 2^n patterns: exact trace and diagonal.
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 6))
    H = torch.tensor(A + A.T)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=6)), dtype=torch.float64)
    like = torch.zeros(6, dtype=torch.float64)
    tr = analysis.hutchinson_trace(lambda v: H @ v, like, probes=signs)
    diag = analysis.hutchinson_diagonal(lambda v: H @ v, like, probes=signs)
    assert float(tr.value) == pytest.approx(float(torch.trace(H)), abs=1e-12)
    torch.testing.assert_close(diag.value, torch.diagonal(H), atol=1e-12, rtol=0)
    assert tr.products == diag.products == 64


def test_hutchinson_within_its_variance_bound_on_a_network_hessian():
    hvp, like, H = _network_hessian(_tanh_mlp)
    m = 400
    off = H - np.diag(np.diag(H))
    # Rademacher variances (closed form): Var[z'Hz] = 2 sum_{i!=j} H_ij^2, Var[(z*Hz)_i] = sum_{j!=i} H_ij^2
    sd_trace = math.sqrt(2 * np.sum(off**2) / m)
    sd_diag = np.sqrt(np.sum(off**2, axis=1) / m)
    tr = analysis.hutchinson_trace(hvp, like, probes=m)
    diag = analysis.hutchinson_diagonal(hvp, like, probes=m)
    assert abs(float(tr.value) - np.trace(H)) <= 4 * sd_trace
    assert float(tr.stderr) == pytest.approx(sd_trace, rel=0.25)
    z = (diag.value.numpy() - np.diag(H)) / sd_diag
    assert np.abs(z).max() <= 4.5  # 83 entries, Bonferroni at ~1e-3
    assert 0.6 <= np.mean(z**2) <= 1.5  # standardised errors have unit variance
    assert np.median(diag.stderr.numpy() / sd_diag) == pytest.approx(1.0, abs=0.15)


def test_hutchinson_batched_operator_gives_the_same_estimate():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 2, (12,))
    params = list(net.parameters())
    f = curvature.functional_loss(lambda: nn.functional.cross_entropy(net(x), y), net, params)
    op = curvature.hvp_forward_over_reverse(f, params)
    assert hasattr(op, "batched")
    like = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    calls = []

    def plain(v):
        calls.append(1)
        return op(v)

    a = analysis.hutchinson_diagonal(op, like, probes=20, chunk=8)
    b = analysis.hutchinson_diagonal(plain, like, probes=20)
    torch.testing.assert_close(a.value, b.value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-8, atol=1e-12)
    assert len(calls) == 20 and a.products == 20


def test_slq_moments_are_gauss_quadrature_exact():
    # s Lanczos steps integrate polynomials of degree <= 2s - 1 exactly against each probe's measure.
    hvp, like, H = _network_hessian(_tanh_mlp)
    n, s = len(like), 6
    probes = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sld = analysis.spectral_density(hvp, like, probes=probes, steps=s)
    v = probes.numpy() / np.linalg.norm(probes.numpy(), axis=1, keepdims=True)
    for p in range(2 * s):
        exact = np.mean(np.einsum("ji,ji->j", v @ np.linalg.matrix_power(H, p), v))
        assert sld.moment(p) == pytest.approx(exact, rel=1e-8, abs=1e-12 * np.abs(H).max() ** p)
    assert sld.products == 3 * s
    torch.testing.assert_close(sld.weights.sum(1), torch.ones(3, dtype=torch.float64))


def test_slq_density_against_the_exact_eigenvalue_histogram():
    hvp, like, H = _network_hessian(_tanh_mlp)
    w = np.linalg.eigvalsh(H)
    n, m, steps = len(w), 50, 30
    sld = analysis.spectral_density(hvp, like, probes=m, steps=steps)
    # moments: unbiased, with the Rademacher variance of v'H^p v, v = z / sqrt(n)
    for p in (1, 2):
        Hp = np.linalg.matrix_power(H, p)
        sd = math.sqrt(2 * np.sum((Hp - np.diag(np.diag(Hp))) ** 2) / n**2 / m)
        assert abs(sld.moment(p) - np.mean(w**p)) <= 4 * sd
    # CDF: Wasserstein-1 distance to the exact spectral measure, small against the spectrum's width
    t = np.linspace(w[0] - 0.05, w[-1] + 0.05, 2001)
    exact_cdf = (w[None, :] <= t[:, None]).mean(1)
    wasserstein = np.trapezoid(np.abs(sld.cdf(torch.tensor(t)).numpy() - exact_cdf), t)
    assert wasserstein <= 0.01 * (w[-1] - w[0])  # measured 0.004; uniform weights give 0.1
    # the broadened density integrates to one and is close (L1) to the exact broadened histogram
    sigma = 0.05
    grid = np.linspace(w[0] - 5 * sigma, w[-1] + 5 * sigma, 2001)
    est = sld.density(torch.tensor(grid), sigma=sigma).numpy()
    exact = np.mean(np.exp(-0.5 * ((grid[:, None] - w[None, :]) / sigma) ** 2), axis=1) / (sigma * math.sqrt(2 * math.pi))
    assert np.trapezoid(est, grid) == pytest.approx(1.0, abs=1e-6)
    assert np.trapezoid(np.abs(est - exact), grid) <= 0.1  # measured 0.03; uniform weights give 0.7


def test_slq_stops_a_probe_at_breakdown():
    d = torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64)  # 3 distinct eigenvalues
    sld = analysis.spectral_density(lambda v: d * v, d, probes=2, steps=4)
    assert sld.products == 6
    assert torch.all(sld.weights[:, 3] == 0)
    # three nodes are then the exact spectral measure of each probe: every moment is exact
    for p in range(8):
        assert sld.moment(p) == pytest.approx(float(torch.mean(d**p)), rel=1e-12)


def test_diagonal_mass_closed_forms():
    assert analysis.diagonal_mass(torch.eye(4)) == 1.0
    assert analysis.diagonal_mass(torch.ones(5, 5)) == pytest.approx(0.2)
    # R diag(a, b) R^T with rotation theta: diagonal a + b, off-diagonal |b - a| |cos sin| twice
    a, b, th = 0.02, 1.0, math.radians(30)
    c, s = math.cos(th), math.sin(th)
    R = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    A = R @ torch.diag(torch.tensor([a, b], dtype=torch.float64)) @ R.T
    assert analysis.diagonal_mass(A) == pytest.approx((a + b) / (a + b + 2 * abs(b - a) * c * s), rel=1e-12)
    assert analysis.diagonal_mass(np.diag([1.0, -2.0])) == 1.0


@pytest.mark.parametrize("call, match", [
    (lambda: analysis.diagonal_mass(torch.ones(2, 3)), "matrix"),
    (lambda: analysis.diagonal_mass(torch.zeros(2, 2)), "matrix"),
    (lambda: analysis.eigenpairs(lambda v: v, torch.ones(3), k=4), "k"),
    (lambda: analysis.eigenpairs(lambda v: v, torch.ones(3), which="top"), "which"),
    (lambda: analysis.eigenpairs(lambda v: v, torch.ones(3), tol=-1.0), "tol"),
    (lambda: analysis.eigenpairs(lambda v: v, torch.ones(3), k=2, max_iter=1), "max_iter"),
    (lambda: analysis.eigenpairs("H", torch.ones(3)), "matvec"),
    (lambda: analysis.eigenpairs(lambda v: v, torch.ones(3, 1)), "like"),
    (lambda: analysis.hutchinson_trace(lambda v: v, torch.ones(3), probes=0), "probes"),
    (lambda: analysis.hutchinson_trace(lambda v: v, torch.ones(3), probes=torch.ones(2, 4)), "probes"),
    (lambda: analysis.hutchinson_diagonal(lambda v: v, torch.ones(3), chunk=0), "chunk"),
    (lambda: analysis.spectral_density(lambda v: v, torch.ones(3), steps=0), "steps"),
    (lambda: analysis.spectral_density(lambda v: v, torch.ones(2), probes=torch.zeros(1, 2)), "probes"),
    (lambda: analysis.spectral_density(lambda v: v, torch.ones(2)).density([0.0], sigma=0.0), "sigma"),
])
def test_bad_input_raises_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_finite_products_raise():
    with pytest.raises(FloatingPointError):
        analysis.eigenpairs(lambda v: v * float("nan"), torch.ones(3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_results_live_on_the_operators_device():
    d = torch.linspace(-1.0, 2.0, 300, device="cuda")
    res = analysis.eigenpairs(lambda v: d * v, d, k=2)
    assert res.vectors.device.type == "cuda"
    np.testing.assert_allclose(res.values.numpy(), [2.0, 2.0 - 3.0 / 299], rtol=1e-5)
    tr = analysis.hutchinson_trace(lambda v: d * v, d, probes=4)
    assert tr.value.device.type == "cuda" and float(tr.value) == pytest.approx(float(d.sum()), rel=1e-5)
    sld = analysis.spectral_density(lambda v: d * v, d, probes=2, steps=10)
    assert sld.moment(1) == pytest.approx(float(d.mean()), abs=1e-5)
