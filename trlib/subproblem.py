r"""The trust-region subproblem in an ellipsoidal norm, and four ways to solve it.

.. math::
    \min_{s \in \mathbb R^d}\; m(s) = g^\top s + \tfrac12 s^\top H s
    \quad\text{subject to}\quad \|s\|_A = \sqrt{\textstyle\sum_i a_i s_i^2} \le \Delta
    \qquad \text{(Eq. 7)}

Every solver works through the change of variables :math:`u = A^{1/2} s`, which turns
the ellipsoid into the ball :math:`\|u\| \le \Delta` and the model into
:math:`\tilde g^\top u + \frac12 u^\top \tilde H u` with
:math:`\tilde g = A^{-1/2} g`, :math:`\tilde H = A^{-1/2} H A^{-1/2}`. (This is exactly
preconditioned CG/Lanczos with preconditioner :math:`A`; Conn, Gould & Toint 2000, §7.2.)

:math:`s^*` is a global solution iff, for some :math:`\lambda \ge 0` (Moré & Sorensen 1983),

.. math:: (H + \lambda A) s^* = -g, \quad H + \lambda A \succeq 0, \quad
          \lambda (\Delta - \|s^*\|_A) = 0 .

Methods of :func:`solve_subproblem`:

``"cauchy"``  the minimiser along :math:`-A^{-1} g` (one Hessian-vector product);
``"cg"``      Steihaug-Toint truncated CG, the paper's solver;
``"gltr"``    Lanczos (GLTR): keeps improving on the boundary; restarts when the Krylov space
              becomes invariant, which solves the hard case (``g`` orthogonal to the
              leftmost eigenvector) once that space is exhausted. A gradient spread over
              many eigenvalues can meet the stopping test first: ``rtol=0`` explores
              until breakdown (at most the dimension), ``"exact"`` is always global;
``"exact"``   dense Moré-Sorensen via an eigendecomposition, for small problems.

Example
-------
>>> import torch, trlib
>>> H = torch.tensor([[1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
>>> g = torch.tensor([1.0, 0.0], dtype=torch.float64)    # orthogonal to the negative curvature
>>> r = trlib.solve_subproblem(g, H, 1.0, method="exact")   # the hard case
>>> round(float(r.model_decrease), 4), r.on_boundary
(1.1667, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .lanczos import Lanczos

__all__ = ["SubproblemResult", "solve_subproblem", "model_value", "METHODS"]

Operator = Callable[[Tensor], Tensor]
METHODS = ("cauchy", "cg", "gltr", "exact")


@dataclass
class SubproblemResult:
    """What a subproblem solver returns.

    ``step``: the step :math:`s` (same shape, dtype and device as the gradient);
    ``model_decrease``: :math:`m(0) - m(s) \\ge 0` (a 0-d tensor);
    ``on_boundary``: :math:`\\|s\\|_A = \\Delta` (to relative precision);
    ``negative_curvature``: the solver met a direction with :math:`p^\\top H p \\le 0`;
    ``iterations``: Hessian-vector products used;
    ``multiplier``: the Lagrange multiplier :math:`\\lambda` (``"gltr"``, ``"exact"``; else None);
    ``status``: why the solver stopped.
    """

    step: Tensor
    model_decrease: Tensor
    on_boundary: bool
    negative_curvature: bool
    iterations: int
    multiplier: Optional[float] = None
    status: str = ""


def model_value(grad: Tensor, hvp: Union[Operator, Tensor], step: Tensor) -> Tensor:
    """:math:`m(s) = g^\\top s + \\frac12 s^\\top H s` (one Hessian-vector product)."""
    op = _as_operator(hvp)
    return torch.dot(grad, step) + 0.5 * torch.dot(step, op(step))


def _as_operator(hvp: Union[Operator, Tensor]) -> Operator:
    if isinstance(hvp, Tensor):
        if hvp.ndim != 2 or hvp.shape[0] != hvp.shape[1]:
            raise ValueError(f"Invalid hvp: a dense Hessian must be a square matrix, got shape {tuple(hvp.shape)}")
        return lambda v: hvp @ v
    if not callable(hvp):
        raise ValueError("Invalid hvp: expected a callable v -> H v or a square tensor")
    return hvp


# ----------------------------------------------------------------------------- Cauchy point
def _cauchy(g: Tensor, op: Operator, radius: float) -> SubproblemResult:
    gnorm = torch.linalg.vector_norm(g)
    if float(gnorm) == 0.0:
        return _result(torch.zeros_like(g), torch.zeros((), dtype=g.dtype, device=g.device), False, False, 0,
                       status="zero_gradient")
    hg = op(g)
    curvature = torch.dot(g, hg)
    # tau = 1 on non-positive curvature, else the 1-D minimiser capped at the boundary.
    tau = torch.where(curvature > 0, torch.clamp(gnorm**3 / (radius * curvature.clamp_min(1e-300)), max=1.0),
                      torch.ones_like(gnorm))
    t = tau * radius / gnorm
    u = -t * g
    value = -t * gnorm**2 + 0.5 * t**2 * curvature
    negative, boundary = bool(curvature <= 0), bool(tau >= 1.0)
    return _result(u, -value, boundary, negative, 1, status="boundary" if boundary else "interior")


# ----------------------------------------------------------------------------- Steihaug-Toint CG
def _steihaug(g: Tensor, op: Operator, radius: float, rtol: float, max_iter: int, check_every: int) -> SubproblemResult:
    # Written without data-dependent Python branches inside the loop: all decisions are
    # 0-d tensors, so on a GPU the host only waits when it checks `done` (every
    # `check_every` products). Products computed after termination are counted.
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    u = torch.zeros_like(g)
    hu = torch.zeros_like(g)
    r = g.clone()
    p = -r
    rr = torch.dot(r, r)
    tol2 = (rtol**2) * rr
    radius2 = radius**2
    done = rr == 0
    hit_boundary = torch.zeros((), dtype=torch.bool, device=g.device)
    negative = torch.zeros((), dtype=torch.bool, device=g.device)
    iterations = 0
    for k in range(max_iter):
        if k % check_every == 0 and bool(done):
            break
        hp = op(p)
        iterations += 1
        php, pp, up, uu = torch.stack([torch.dot(p, hp), torch.dot(p, p), torch.dot(u, p), torch.dot(u, u)])
        safe_pp = torch.where(pp > 0, pp, torch.ones_like(pp))
        # Positive root of ||u + tau p||^2 = radius^2.
        tau = (-up + torch.sqrt(torch.clamp(up * up + pp * (radius2 - uu), min=0.0))) / safe_pp
        curv = php <= 0
        alpha = rr / torch.where(curv, torch.ones_like(php), php)
        hit = curv | (alpha >= tau)
        a = torch.where(done, zero, torch.where(hit, tau, alpha))
        u = u + a * p
        hu = hu + a * hp
        r_new = r + a * hp
        rr_new = torch.dot(r_new, r_new)
        converged = rr_new <= tol2
        beta = rr_new / torch.where(rr > 0, rr, torch.ones_like(rr))
        finished = done | hit | converged
        negative = negative | (~done & curv)
        hit_boundary = hit_boundary | (~done & hit)
        p = torch.where(finished, p, -r_new + beta * p)
        r, rr, done = r_new, rr_new, finished
    value = torch.dot(g, u) + 0.5 * torch.dot(u, hu)
    boundary = bool(hit_boundary)
    status = "boundary" if boundary else ("converged" if bool(done) else "max_iter")
    if iterations == 0 and float(rr) == 0.0:
        status = "zero_gradient"
    return _result(u, -value, boundary, bool(negative), iterations, status=status)


# ----------------------------------------------------------------------------- dense Moré-Sorensen
def _secular(eigvals: np.ndarray, coeffs: np.ndarray, radius: float):
    """Solve the subproblem in an eigenbasis: ``H = V diag(eigvals) V^T``, ``coeffs = V^T g``.

    Returns ``(x, lam, hard)`` with the solution's coordinates ``x`` in that basis, the
    multiplier ``lam`` and whether the hard case occurred. Float64 NumPy throughout.

    The search runs over the shift ``mu = lam + eigvals[0]``: denominators become
    ``(eigvals - eigvals[0]) + mu``, exact for the leftmost eigenspace even when the root
    sits within rounding of ``-eigvals[0]`` (the near hard case).
    """
    lam1 = float(eigvals[0])
    gap = eigvals - lam1
    scale = max(float(np.max(np.abs(eigvals))), 1e-300)
    gnorm = float(np.linalg.norm(coeffs))
    tiny = np.finfo(np.float64).tiny
    nonzero = coeffs != 0

    def coords(mu, mask=nonzero):
        x = np.zeros_like(coeffs)
        x[mask] = -coeffs[mask] / (gap[mask] + mu)
        return x

    if lam1 > 0:
        x = coords(lam1)
        if np.linalg.norm(x) <= radius:
            return x, 0.0, False
    mu_low = max(lam1, 0.0)
    group = gap <= 1e-12 * scale
    c_group = float(np.linalg.norm(coeffs[group]))

    def hard_case():
        x = coords(0.0, nonzero & ~group)
        slack = radius**2 - float(x @ x)
        if lam1 >= 0:  # a singular PSD Hessian: the minimum-norm interior minimiser
            return x, 0.0, True
        z = np.zeros_like(coeffs)
        if c_group > 0:  # move down the (tiny) gradient inside the eigenspace
            z[group] = -coeffs[group] / c_group
        else:
            z[np.flatnonzero(group)[0]] = 1.0
        return x + math.sqrt(max(slack, 0.0)) * z, -lam1, True

    if lam1 <= 0 and c_group <= 1e-13 * max(gnorm, tiny):
        if np.linalg.norm(coords(0.0, nonzero & ~group)) <= radius:
            return hard_case()
    # phi(mu) = 1/||x(mu)|| - 1/radius is increasing and concave on (mu_low, inf):
    # safeguarded Newton, bisection when Newton leaves the bracket.
    lo, hi = mu_low, max(mu_low, gnorm / radius) * (1 + 1e-12) + tiny
    while np.linalg.norm(coords(hi)) > radius:
        hi = 2.0 * hi
    mu = hi
    for _ in range(300):
        x = coords(mu)
        norm = float(np.linalg.norm(x))
        if abs(norm - radius) <= 1e-14 * radius:
            break
        if norm > radius:
            lo = mu
        else:
            hi = mu
        if hi - lo <= 2 * np.finfo(np.float64).eps * hi:
            mu = hi  # the feasible end of the bracket
            x = coords(mu)
            break
        slope = float(np.sum(coeffs[nonzero] ** 2 / (gap[nonzero] + mu) ** 3)) / max(norm, tiny) ** 3
        candidate = mu - (1.0 / max(norm, tiny) - 1.0 / radius) / slope if slope > 0 else lo
        mu = candidate if lo < candidate < hi else 0.5 * (lo + hi)
    if float(np.linalg.norm(x)) < radius * (1 - 1e-10) and mu <= tiny * 1e10 and lam1 < 0:
        return hard_case()  # the root is below float64's resolution of mu = 0
    return x, float(mu - lam1), False


def _exact(g: Tensor, op: Operator, radius: float, dense: Optional[Tensor]) -> SubproblemResult:
    n = g.numel()
    if dense is None:
        eye = torch.eye(n, dtype=g.dtype, device=g.device)
        dense = torch.stack([op(eye[i]) for i in range(n)], dim=1)
        products = n
    else:
        products = 0
    dense = 0.5 * (dense + dense.T)
    eigvals, eigvecs = torch.linalg.eigh(dense)
    coeffs = eigvecs.T @ g
    lam_np = eigvals.detach().double().cpu().numpy()
    c_np = coeffs.detach().double().cpu().numpy()
    x, lam, hard = _secular(lam_np, c_np, radius)
    u = eigvecs @ torch.as_tensor(x, dtype=g.dtype).to(g.device)
    value = float(c_np @ x + 0.5 * np.sum(lam_np * x * x))
    boundary = lam > 0 or float(np.linalg.norm(x)) >= radius * (1 - 1e-8)
    status = "hard_case" if hard else ("boundary" if boundary else "interior")
    return _result(u, torch.tensor(-value, dtype=g.dtype, device=g.device), boundary, bool(lam_np[0] < 0), products,
                   multiplier=lam, status=status)


# ----------------------------------------------------------------------------- GLTR (Lanczos)
def _gltr(g: Tensor, op: Operator, radius: float, rtol: float, max_iter: int,
          generator: Optional[torch.Generator]) -> SubproblemResult:
    lz = Lanczos(op, g, generator=generator)
    gamma = lz.start_norm  # g = gamma q_1 (0: the first block starts at random)
    while True:
        lz.step()
        eigvals, eigvecs = lz.eigh()
        x, lam, hard = _secular(eigvals, gamma * eigvecs[0], radius)  # V^T (gamma e_1)
        h = eigvecs @ x
        residual = lz.last_beta * abs(h[-1])
        tol = rtol * gamma if gamma > 0 else rtol * max(lz.scale, 1e-300) * radius
        exploring = gamma == 0 or len(lz.block_starts) > 1
        if lz.broke_down:
            settled = False  # a fresh block: the complement may hold lower curvature
        elif exploring:
            # A block started at random must resolve its leftmost curvature before we
            # can trust that the solution does not move into it.
            _, y = lz.eigh(lz.block_starts[-1])
            settled = lz.last_beta * abs(y[-1, 0]) <= rtol * max(lz.scale, 1e-300)
        elif eigvals[0] < 0 and lam + eigvals[0] <= 1e-2 * max(lam, 1e-300):
            # A (near) hard case inside the Krylov space: the step is dominated by the
            # leftmost Ritz vector, so wait until that Ritz pair has converged.
            settled = lz.last_beta * abs(eigvecs[-1, 0]) <= rtol * max(lz.scale, 1e-300)
        else:
            settled = True
        if lz.exhausted or lz.k >= max_iter or (residual <= tol and settled):
            break
    u = lz.combine(h)
    value = gamma * h[0] + 0.5 * float(np.sum(eigvals * x * x))  # m(Qh) = gamma h_1 + h^T T h / 2
    boundary = lam > 0 or float(np.linalg.norm(h)) >= radius * (1 - 1e-8)
    status = "hard_case" if hard else ("boundary" if boundary else "interior")
    if not (lz.exhausted or residual <= tol):
        status = "max_iter"
    return _result(u, torch.tensor(-value, dtype=g.dtype, device=g.device), boundary, bool(eigvals[0] < 0), lz.k,
                   multiplier=lam, status=status)


def _result(u, decrease, boundary, negative, iterations, multiplier=None, status=""):
    # clamp: rounding may leave a zero decrease at -1e-17
    return SubproblemResult(u, torch.clamp(decrease, min=0.0), bool(boundary), bool(negative), int(iterations),
                            None if multiplier is None else float(multiplier), status)


# ----------------------------------------------------------------------------- front door
def solve_subproblem(
    grad: Tensor,
    hvp: Union[Operator, Tensor],
    radius: float,
    *,
    ellipsoid: Optional[Tensor] = None,
    method: str = "cg",
    rtol: float = 1e-6,
    max_iter: Optional[int] = None,
    check_every: int = 1,
    generator: Optional[torch.Generator] = None,
) -> SubproblemResult:
    r"""Approximately minimise :math:`g^\top s + \frac12 s^\top H s` s.t. :math:`\|s\|_A \le \Delta`.

    Args:
        grad: the gradient :math:`g`, a 1-D floating tensor.
        hvp: the curvature: a callable ``v -> H v`` on 1-D tensors, or a dense square tensor.
        radius: :math:`\Delta > 0`.
        ellipsoid: the positive vector :math:`a` of :math:`A = \operatorname{diag}(a)`;
            ``None`` is the sphere.
        method: ``"cauchy"``, ``"cg"``, ``"gltr"`` or ``"exact"`` (see the module docstring).
        rtol: Krylov methods stop once the residual :math:`\|\tilde H u + \lambda u + \tilde g\|`
            is below ``rtol`` times :math:`\|\tilde g\|` (in the norm of the region).
        max_iter: most Hessian-vector products for ``"cg"`` and ``"gltr"``; None: as many
            as needed (up to the dimension for GLTR, ten times it for CG).
        check_every: ``"cg"`` looks at its stopping test (a host-device synchronisation on
            GPUs) once every this many products.
        generator: random numbers for GLTR's restarts (zero gradient, hard case);
            default: a fixed seed, so the solver is deterministic.

    Returns:
        :class:`SubproblemResult`. All computation happens on ``grad``'s device and in its
        dtype (the small tridiagonal and secular problems are solved in float64 on the host).

    References: Steihaug (1983); Toint (1981); Gould, Lucidi, Roma & Toint (1999);
    Moré & Sorensen (1983); Conn, Gould & Toint (2000), chapter 7.
    """
    if not isinstance(grad, Tensor) or grad.ndim != 1 or not grad.is_floating_point():
        raise ValueError("Invalid grad: expected a 1-D floating-point tensor")
    if not bool(torch.all(torch.isfinite(grad))):
        raise ValueError("Invalid grad: contains NaN or inf")
    op = _as_operator(hvp)
    dense = hvp if isinstance(hvp, Tensor) else None
    if dense is not None and dense.shape[0] != grad.numel():
        raise ValueError(f"Invalid hvp: matrix of size {dense.shape[0]} for a gradient of size {grad.numel()}")
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"Invalid radius: {radius!r} (must be positive and finite)")
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r}; expected one of {METHODS}")
    if not (isinstance(rtol, (int, float)) and rtol >= 0):
        raise ValueError(f"Invalid rtol: {rtol!r} (must be >= 0)")
    n = grad.numel()
    if max_iter is None:
        max_iter = 10 * n if method == "cg" else n
    elif not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"Invalid max_iter: {max_iter!r} (must be a positive int or None)")
    if not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"Invalid check_every: {check_every!r} (must be a positive int)")

    if ellipsoid is None:
        scale = None
        g = grad
    else:
        if not isinstance(ellipsoid, Tensor) or ellipsoid.shape != grad.shape:
            raise ValueError(f"Invalid ellipsoid: expected a tensor of shape {tuple(grad.shape)}")
        if not bool(torch.all(torch.isfinite(ellipsoid) & (ellipsoid > 0))):
            raise ValueError("Invalid ellipsoid: entries must be positive and finite")
        scale = ellipsoid.to(grad.dtype).rsqrt()  # u = A^{1/2} s, s = scale * u
        g = scale * grad
        inner = op
        op = lambda v: scale * inner(scale * v)  # noqa: E731
        if dense is not None:
            dense = scale[:, None] * dense * scale[None, :]

    if method == "cauchy":
        res = _cauchy(g, op, radius)
    elif method == "cg":
        res = _steihaug(g, op, radius, float(rtol), max_iter, check_every)
    elif method == "gltr":
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        res = _gltr(g, op, radius, float(rtol), max_iter, generator)
    else:
        res = _exact(g, op, radius, dense)
    if scale is not None:
        res.step = scale * res.step
    return res
