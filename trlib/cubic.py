r"""The cubic-regularisation (ARC) subproblem in an ellipsoidal norm, solved by Lanczos or densely.

.. math::
    \min_{s \in \mathbb R^d}\; m(s) = g^\top s + \tfrac12 s^\top H s + \tfrac{\sigma}{3} \|s\|_A^3,
    \qquad \|s\|_A = \sqrt{\textstyle\sum_i a_i s_i^2}

(Cartis, Gould & Toint 2011; the paper's footnote 5 carries its ellipsoids over to this model).
Instead of a radius, the weight :math:`\sigma > 0` keeps the step where the model is trusted.
As for the trust region (:mod:`trlib.subproblem`), the change of variables :math:`u = A^{1/2} s`
gives :math:`\tilde g = A^{-1/2} g`, :math:`\tilde H = A^{-1/2} H A^{-1/2}` and the Euclidean
norm. :math:`s^*` is a global minimiser iff, with :math:`\lambda = \sigma \|s^*\|_A`
(Cartis, Gould & Toint 2011, Theorem 3.1),

.. math:: (H + \lambda A)\, s^* = -g, \qquad H + \lambda A \succeq 0 .

In an eigenbasis :math:`\tilde H = V \operatorname{diag}(\theta) V^\top`, :math:`c = V^\top \tilde g`,
the step has coordinates :math:`x_i(\lambda) = -c_i/(\theta_i + \lambda)`, and :math:`\lambda`
is the root of the secular equation :math:`\|x(\lambda)\| = \lambda/\sigma` on
:math:`\lambda > \max(0, -\theta_1)`: the left side decreases, the right increases, so the
root is unique. When :math:`c` vanishes on the leftmost eigenspace and
:math:`\|x(-\theta_1)\| \le -\theta_1/\sigma` there is no such root (the *hard case*):
:math:`\lambda = -\theta_1` and a leftmost eigenvector fills the step up to
:math:`\|x\| = \lambda/\sigma`.

Methods: ``"lanczos"`` (the model on the Lanczos space of :math:`\tilde g`, :func:`solve_cubic`; it
restarts when the Krylov space becomes invariant, which finds the hard case) and ``"exact"`` (the
dense eigendecomposition, for small problems and as a reference).

Example: a saddle, where the Newton step would go uphill.

>>> import torch
>>> H = torch.tensor([[1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
>>> g = torch.tensor([1.0, 1.0], dtype=torch.float64)
>>> r = solve_cubic(g, H, sigma=1.0)
>>> [round(x, 6) for x in r.step.tolist()], round(r.multiplier, 6)
([-0.292669, -2.399046], 2.416832)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .lanczos import Lanczos
from .norms import ellipsoid_norm
from .curvature import MatVec, NonFiniteCurvatureError
from .subproblem import GLTR, Solver, SubproblemResult, _fill_leftmost, model_value

__all__ = ["CubicResult", "CubicSolver", "solve_cubic", "cubic_model", "CUBIC_METHODS"]

CUBIC_METHODS = ("lanczos", "exact")
CUBIC_RULES = ("tc.s", "tc.g")


@dataclass
class CubicResult:
    r"""What :func:`solve_cubic` returns.

    ``step``: :math:`s` (the gradient's shape, dtype and device); ``model_decrease``:
    :math:`m(0) - m(s) \ge 0` (0-d tensor); ``iterations``: Hessian-vector products used;
    ``multiplier``: :math:`\lambda = \sigma\|s\|_A`; ``negative_curvature``: the (Ritz)
    spectrum seen has a negative eigenvalue; ``status``: ``"converged"``, ``"hard_case"``,
    ``"zero_gradient"`` (zero gradient, no negative curvature: :math:`s = 0`) or ``"max_iter"``.
    """

    step: Tensor
    model_decrease: Tensor
    iterations: int
    multiplier: float
    negative_curvature: bool
    status: str


def cubic_model(grad: Tensor, hvp: Union[MatVec, Tensor], sigma: float, step: Tensor,
                ellipsoid: Optional[Tensor] = None) -> Tensor:
    r""":math:`m(s) = g^\top s + \frac12 s^\top H s + \frac\sigma3 \|s\|_A^3` (one product).

    >>> round(cubic_model(torch.tensor([1.0]), torch.tensor([[2.0]]), 3.0, torch.tensor([-1 / 3])).item(), 6)
    -0.185185
    """
    return model_value(grad, hvp, step) + sigma / 3.0 * ellipsoid_norm(step, ellipsoid) ** 3


def _secular(eigvals: np.ndarray, coeffs: np.ndarray, sigma: float) -> Tuple[np.ndarray, float, bool]:
    r"""The cubic model in an eigenbasis (float64): ``(x, lam, hard)`` with the minimiser's
    coordinates, :math:`\lambda = \sigma\|x\|` and whether the hard case occurred.

    The unknown is :math:`t = \lambda + \min(\theta_1, 0) > 0`, so every denominator
    :math:`(\theta_i - \min(\theta_1, 0)) + t` is a sum of non-negative numbers: exact on the
    leftmost eigenspace however close :math:`\lambda` comes to :math:`-\theta_1` (the near
    hard case), and with :math:`\lambda` resolved to its own precision when :math:`\theta_1 > 0`.
    """
    lam1 = float(eigvals[0])
    offset = min(lam1, 0.0)
    shifted = eigvals - offset  # >= 0
    scale = max(float(np.max(np.abs(eigvals))), 1e-300)
    gnorm = float(np.linalg.norm(coeffs))
    tiny = np.finfo(np.float64).tiny
    nonzero = coeffs != 0
    group = eigvals - lam1 <= 1e-12 * scale

    def coords(t, mask=nonzero):
        x = np.zeros_like(coeffs)
        x[mask] = -coeffs[mask] / (shifted[mask] + t)
        return x

    if gnorm == 0.0 and lam1 >= 0:
        return np.zeros_like(coeffs), 0.0, False
    c_group = float(np.linalg.norm(coeffs[group]))
    if lam1 < 0 and c_group <= 1e-13 * max(gnorm, tiny):
        rest = coords(0.0, nonzero & ~group)  # lam = -lam1
        target = -lam1 / sigma
        if np.linalg.norm(rest) <= target:
            return _fill_leftmost(rest, coeffs, group, target), -lam1, True
    # f(t) = ||x(t)|| - (t - offset)/sigma decreases from f(0+) > 0 to f(sqrt(sigma ||c||)) <= 0;
    # Newton on the concave increasing 1/||x|| - sigma/lam, bisection when it leaves the bracket.
    lo, hi = 0.0, math.sqrt(sigma * gnorm) * (1 + 1e-12) + tiny
    t = hi
    for _ in range(300):
        x = coords(t)
        norm = float(np.linalg.norm(x))
        lam = t - offset
        if abs(norm - lam / sigma) <= 1e-15 * max(norm, lam / sigma):
            break
        if norm > lam / sigma:
            lo = t
        else:
            hi = t
        if hi - lo <= 2 * np.finfo(np.float64).eps * hi:
            break
        slope = float(np.sum(coeffs[nonzero] ** 2 / (shifted[nonzero] + t) ** 3)) / max(norm, tiny) ** 3 \
            + sigma / max(lam, tiny) ** 2
        candidate = t - (1.0 / max(norm, tiny) - sigma / max(lam, tiny)) / slope
        t = candidate if lo < candidate < hi else 0.5 * (lo + hi)
    return coords(t), float(t - offset), False


def _model(eigvals: np.ndarray, coeffs: np.ndarray, x: np.ndarray, sigma: float) -> float:
    return float(coeffs @ x + 0.5 * np.sum(eigvals * x * x) + sigma / 3.0 * np.linalg.norm(x) ** 3)


def _lanczos(lz: Lanczos, sigma: float, rtol: float, max_iter: int, rule: str = "tc.s"):
    """The model on the Krylov space of ``lz``, grown (from where it stands) until it is solved."""
    gamma = lz.start_norm  # g = gamma q_1 (0: the first block starts at random)
    if lz.k == 0:
        lz.step()
    while True:
        theta, y = lz.eigh()
        x, lam, hard = _secular(theta, gamma * y[0], sigma)
        h = y @ x
        # ||grad m(Q h)|| = beta_{k+1} |h_k|: the model is solved exactly in the Krylov space
        residual = lz.last_beta * abs(h[-1])
        hnorm = float(np.linalg.norm(h))
        if gamma > 0:
            tol = rtol * (min(1.0, hnorm) if rule == "tc.s" else 1.0) * gamma  # Cartis, Gould & Toint's rules
        else:
            tol = rtol * max(lz.scale, 1e-300) * max(hnorm, 1e-300)
        if lz.broke_down:
            # An invariant block grown from g says nothing of the complement, which may hold lower
            # curvature: go on with a random block. One grown from a random vector holds the leftmost
            # eigenvalue of the rest (with probability 1), and g has no component there: done.
            closed = lz.block_starts[-2] if lz.block_starts[-1] == lz.k else lz.block_starts[-1]
            settled = gamma == 0 or closed > 0
        elif gamma == 0 or len(lz.block_starts) > 1 or (theta[0] < 0 and lam + theta[0] <= 1e-2 * max(lam, 1e-300)):
            # a block started at random, or a (near) hard case in the Krylov space: the step
            # leans on the leftmost Ritz pair, so that pair must have converged
            _, yb = lz.eigh(lz.block_starts[-1])
            settled = lz.last_beta * abs(yb[-1, 0]) <= rtol * max(lz.scale, 1e-300)
        else:
            settled = True
        converged = lz.exhausted or (residual <= tol and settled)
        if converged or lz.k >= max_iter:
            break
        lz.step()
    u = lz.combine(h)
    value = _model(theta, gamma * y[0], x, sigma)
    return u, -value, lam, bool(theta[0] < 0), hard, converged


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"Invalid sigma: {sigma!r} (must be positive and finite)")
    return float(sigma)


class CubicSolver(Solver):
    r"""The ARC subproblem at one point: ``query`` once, :meth:`solve` for each :math:`\sigma`.

    A :class:`trlib.subproblem.Solver` for the cubic model (the same ``query``, checks, change of
    variables and product counting): ``"lanczos"`` keeps its Krylov basis between solves, so a
    larger :math:`\sigma` after a rejected step (or a tighter ``rtol``) costs only the products
    that extend the basis, often none; ``"exact"`` decomposes the Hessian once. :meth:`solve`
    returns a :class:`trlib.subproblem.SubproblemResult` (``on_boundary`` is False: the cubic
    model has no boundary; ``multiplier`` is :math:`\lambda = \sigma\|s\|_A`; ``iterations`` the
    products spent by that call), so :func:`trlib.region.iterate` treats both models alike.

    >>> H = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))
    >>> solver = CubicSolver().query(torch.ones(3, dtype=torch.float64), H)
    >>> [(round(float(r.model_decrease), 4), r.iterations) for r in (solver.solve(1.0), solver.solve(4.0))]
    [(1.7612, 3), (0.6929, 0)]
    """

    name = "cubic"

    def __init__(self, method: str = "lanczos", *, rtol: float = 1e-6, max_iter: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, rule: str = "tc.s"):
        if method not in CUBIC_METHODS:
            raise ValueError(f"Invalid method: {method!r}; expected one of {CUBIC_METHODS}")
        if rule not in CUBIC_RULES:
            raise ValueError(f"Invalid rule: {rule!r}; expected one of {CUBIC_RULES}")
        super().__init__(rtol=rtol, max_iter=max_iter, generator=generator)
        self.method, self.rule = method, rule

    def _setup(self):
        if self.method == "lanczos":
            self.lz = Lanczos(self.op, self.g, generator=self.generator)
            return
        # float64 on the host: a badly scaled ellipsoid's small eigenvalues are lost to a float32 eigh
        H = self.op.dense().detach().double().cpu().numpy()
        if not np.all(np.isfinite(H)):
            raise NonFiniteCurvatureError()
        self.eigvals, self.eigvecs = np.linalg.eigh(0.5 * (H + H.T))
        self.coeffs = self.eigvecs.T @ self.g.detach().double().cpu().numpy()

    def _vector(self, x: np.ndarray) -> Tensor:
        return torch.as_tensor(x, dtype=self.g.dtype).to(self.g.device)

    def solve(self, sigma: float, rtol: Optional[float] = None) -> SubproblemResult:
        """The minimiser of the model for weight ``sigma`` (and a Lanczos tolerance ``rtol``, default the solver's)."""
        return super().solve(_check_sigma(sigma), rtol)

    def _solve(self, sigma, rtol):
        if self.method == "exact":
            x, lam, hard = _secular(self.eigvals, self.coeffs, sigma)
            u = self._vector(self.eigvecs @ x)
            decrease, negative, converged = -_model(self.eigvals, self.coeffs, x, sigma), self.eigvals[0] < 0, True
        else:
            u, decrease, lam, negative, hard, converged = _lanczos(self.lz, sigma, rtol, self.limit, self.rule)
        status = "hard_case" if hard else "zero_gradient" if lam == 0.0 else "converged" if converged else "max_iter"
        return u, decrease, False, negative, lam, status

    def leftmost(self):
        """``(curvature, direction)``: the leftmost Ritz pair found so far, as a direction :math:`s`
        with its Rayleigh quotient in the region's norm; None before any product."""
        if self.method == "exact":
            u = self._vector(self.eigvecs[:, 0])
            return float(self.eigvals[0]), u if self.scale is None else self.scale * u
        return GLTR.leftmost(self) if self.lz.k else None


def solve_cubic(
    grad: Tensor,
    hvp: Union[MatVec, Tensor],
    sigma: float,
    *,
    ellipsoid: Optional[Tensor] = None,
    method: str = "lanczos",
    rtol: float = 1e-6,
    max_iter: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    rule: str = "tc.s",
) -> CubicResult:
    r"""Minimise :math:`g^\top s + \frac12 s^\top H s + \frac\sigma3\|s\|_A^3` (the ARC subproblem).

    ``"lanczos"`` builds the Lanczos basis :math:`Q_k` of :math:`\tilde g` and
    :math:`T_k = Q_k^\top \tilde H Q_k`, minimises the model exactly on that space through
    :math:`T_k`'s eigendecomposition and the secular equation, and stops once the model's
    gradient is small, which needs no further product:

    .. math:: \|\nabla m(u_k)\| = \beta_{k+1} |e_k^\top h_k|
              \le \mathrm{rtol}\cdot \min(1, \|u_k\|)\, \|\tilde g\|

    (Cartis, Gould & Toint 2011, the TC.s rule, ``rule="tc.s"``; norms in the region's
    variables), or without the factor :math:`\min(1, \|u_k\|)` (their TC.g rule when ``rtol``
    carries :math:`\min(\kappa, \|g\|^{1/2})`, ``rule="tc.g"``: the accuracy asked of a
    trust-region step, and far fewer products when steps are short, as in training). A zero
    gradient starts from a random vector and stops when the leftmost Ritz pair has converged.

    Args:
        grad: :math:`g`, a 1-D floating tensor.
        hvp: a callable ``v -> H v`` on 1-D tensors, or a dense square tensor.
        sigma: the regularisation weight :math:`\sigma > 0`.
        ellipsoid: the positive vector :math:`a` of :math:`A = \operatorname{diag}(a)`
            (``None``: the sphere), e.g. a :mod:`trlib.norms` ellipsoid.
        method: ``"lanczos"`` or ``"exact"`` (dense, ``n`` products for a callable).
        rtol: ``"lanczos"``'s tolerance (``0``: until the basis spans the space).
        max_iter: most products for ``"lanczos"`` (default: the dimension).
        generator: random numbers for restarts (zero gradient, hard case); default seed 0.
        rule: ``"tc.s"`` or ``"tc.g"``, ``"lanczos"``'s stopping rule (above).

    Returns:
        :class:`CubicResult`. Vectors stay on ``grad``'s device and in its dtype; the small
        tridiagonal and secular problems are solved in float64 on the host (one
        synchronisation per product).

    >>> H = torch.diag(torch.tensor([-1.0, 2.0], dtype=torch.float64))
    >>> r = solve_cubic(torch.zeros(2, dtype=torch.float64), H, 2.0)   # a saddle: s = (|theta_1|/sigma) v_1
    >>> r.status, round(abs(float(r.step[0])), 6), round(float(r.model_decrease), 6)
    ('hard_case', 0.5, 0.041667)

    References: Cartis, Gould & Toint, *Adaptive cubic regularisation methods for unconstrained
    optimization, Part I*, Math. Program. 127 (2011), §3 and §6; Gould, Lucidi, Roma & Toint,
    SIAM J. Optim. 9 (1999) (the Lanczos approach); Nesterov & Polyak, Math. Program. 108 (2006).
    """
    solver = CubicSolver(method, rtol=rtol, max_iter=max_iter, generator=generator, rule=rule)
    sigma = _check_sigma(sigma)  # before the products of a query
    r = solver.query(grad, hvp, ellipsoid).solve(sigma)
    return CubicResult(r.step, r.model_decrease, r.iterations, r.multiplier, r.negative_curvature, r.status)
