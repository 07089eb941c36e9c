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
