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

A solver is an object: :meth:`Solver.query` does the work of a point (the products: a
Krylov basis, a factorization), :meth:`Solver.solve` answers for each radius. By name:

``"cauchy"``
    the minimiser along :math:`-A^{-1} g` (one product);
``"cg"``
    Steihaug-Toint truncated CG, the paper's solver (re-runs for each radius);
``"gltr"``
    Lanczos (GLTR): the subproblem solved exactly on the Krylov space; a smaller radius
    costs no product. After a breakdown it starts a new block only on a sign of a hard
    case (multiplier at minus the leftmost Ritz value) or with ``rtol=0``. An exact hard
    case (``g`` orthogonal to the leftmost eigenvector) is invisible to every Krylov space
    of ``g``: ``certificate=True`` looks for it by Lanczos from a random start (products
    counted) and adds what it finds;
``"exact"``
    dense Moré-Sorensen via an eigendecomposition, for small problems.

A non-finite product makes every solver raise :class:`trlib.NonFiniteCurvatureError`.

Example
-------
>>> import torch, trlib
>>> H = torch.tensor([[1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
>>> g = torch.tensor([1.0, 0.0], dtype=torch.float64)    # orthogonal to the negative curvature
>>> r = trlib.solve_subproblem(g, H, 1.0, method="exact")   # the hard case
>>> round(float(r.model_decrease), 4), r.on_boundary
(1.1667, True)
>>> solver = trlib.subproblem.GLTR(certificate=True).query(g, H)   # one query, two radii
>>> [(round(float(r.model_decrease), 4), r.iterations) for r in (solver.solve(1.0), solver.solve(0.5))]
[(1.1667, 4), (0.4167, 0)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Type, Union

import numpy as np
import torch
from torch import Tensor

from .curvature import NonFiniteCurvatureError, Operator, as_operator
from .lanczos import Lanczos

__all__ = ["SubproblemResult", "Solver", "Cauchy", "SteihaugCG", "GLTR", "Exact", "SOLVERS", "METHODS",
           "get_solver", "solve_subproblem", "model_value", "eigenpoint"]

HVP = Union[Callable[[Tensor], Tensor], Tensor, Operator]


@dataclass
class SubproblemResult:
    """What a subproblem solver returns.

    ``step``: the step :math:`s` (same shape, dtype and device as the gradient);
    ``model_decrease``: :math:`m(0) - m(s) \\ge 0` (a 0-d tensor);
    ``on_boundary``: :math:`\\|s\\|_A = \\Delta` (to relative precision);
    ``negative_curvature``: the solver met a direction with :math:`p^\\top H p \\le 0`;
    ``iterations``: Hessian-vector products spent by this call;
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


def model_value(grad: Tensor, hvp: HVP, step: Tensor) -> Tensor:
    """:math:`m(s) = g^\\top s + \\frac12 s^\\top H s` (one Hessian-vector product)."""
    return torch.dot(grad, step) + 0.5 * torch.dot(step, as_operator(hvp, grad)(step))


def eigenpoint(grad: Tensor, radius: float, curvature: float, direction: Tensor, *,
               ellipsoid: Optional[Tensor] = None) -> Tensor:
    r"""The eigenpoint :math:`s^E = \pm\Delta\, v / \|v\|_A` of Assumption 2, with the sign that goes
    downhill (:math:`g^\top s^E \le 0`; :math:`+v` on a tie); zero when ``curvature``
    (:math:`v^\top H v / \|v\|_A^2`) is not negative.

    >>> g = torch.tensor([1.0, 0.0])
    >>> eigenpoint(g, 2.0, -1.0, torch.tensor([1.0, 1.0])).tolist()
    [-1.4142135381698608, -1.4142135381698608]

    Reference: Conn, Gould & Toint (2000), §6.6; Kohler, Adolphs & Lucchi, Assumption 2.
    """
    if curvature >= 0:
        return torch.zeros_like(grad)
    length = torch.linalg.vector_norm(direction) if ellipsoid is None else torch.sqrt(
        torch.sum(ellipsoid * direction * direction))
    step = direction * (radius / length)
    return -step if float(torch.dot(grad, step)) > 0 else step


def _fill_leftmost(x: np.ndarray, coeffs: np.ndarray, group: np.ndarray, length: float) -> np.ndarray:
    """The hard case's step: ``x`` (orthogonal to the leftmost eigenspace ``group``) completed to
    norm ``length`` along that eigenspace, down its (tiny) gradient when it has one."""
    z = np.zeros_like(coeffs)
    c_group = float(np.linalg.norm(coeffs[group]))
    if c_group > 0:
        z[group] = -coeffs[group] / c_group
    else:
        z[np.flatnonzero(group)[0]] = 1.0
    return x + math.sqrt(max(length**2 - float(x @ x), 0.0)) * z


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
        if lam1 >= 0:  # a singular PSD Hessian: the minimum-norm interior minimiser
            return x, 0.0, True
        return _fill_leftmost(x, coeffs, group, radius), -lam1, True

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


# ----------------------------------------------------------------------------- solver objects
class Solver:
    """A subproblem solver: :meth:`query` once at a point, :meth:`solve` for each radius.

    Options: ``rtol`` (Krylov methods stop once the residual
    :math:`\\|\\tilde H u + \\lambda u + \\tilde g\\|` is below ``rtol`` times :math:`\\|\\tilde g\\|`,
    in the region's norm), ``max_iter`` (most products per query; None: the dimension for
    GLTR, ten times it for CG), ``check_every`` (CG looks at its stopping test, a
    host-device synchronisation on GPUs, once every this many products), ``generator``
    (GLTR's random vectors; default: a fixed seed, so solves are deterministic) and
    ``certificate`` (GLTR's hard-case search).
    """

    name = ""

    def __init__(self, *, rtol: float = 1e-6, max_iter: Optional[int] = None, check_every: int = 1,
                 generator: Optional[torch.Generator] = None, certificate: bool = False):
        if not (isinstance(rtol, (int, float)) and rtol >= 0):
            raise ValueError(f"Invalid rtol: {rtol!r} (must be >= 0)")
        if max_iter is not None and not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"Invalid max_iter: {max_iter!r} (must be a positive int or None)")
        if not (isinstance(check_every, int) and check_every >= 1):
            raise ValueError(f"Invalid check_every: {check_every!r} (must be a positive int)")
        self.rtol, self.max_iter, self.check_every = float(rtol), max_iter, check_every
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.certificate = bool(certificate)

    def query(self, grad: Tensor, hvp: HVP, ellipsoid: Optional[Tensor] = None) -> "Solver":
        """Set up at a point: gradient, curvature (a callable, a dense matrix or an
        :class:`trlib.curvature.Operator`) and the ellipsoid (None: the sphere)."""
        if not isinstance(grad, Tensor) or grad.ndim != 1 or not grad.is_floating_point():
            raise ValueError("Invalid grad: expected a 1-D floating-point tensor")
        op = as_operator(hvp, grad)
        self.scale = None
        if ellipsoid is not None:
            if not isinstance(ellipsoid, Tensor) or ellipsoid.shape != grad.shape:
                raise ValueError(f"Invalid ellipsoid: expected a tensor of shape {tuple(grad.shape)}")
            self.scale = ellipsoid.to(grad.dtype).rsqrt()  # u = A^{1/2} s, s = scale * u
            op = op.scaled(self.scale)
        self.spent = {"hvp": 0}
        self._reported = 0
        self.g = grad if self.scale is None else self.scale * grad
        self.op = op.counted(self.spent)
        # ||g~|| and a screen of the inputs in one read (one host-device synchronisation on a GPU):
        # a finite ||g~||, sum and positive minimum of the scale (rsqrt maps 0, inf and NaN outside
        # (0, inf)) imply valid inputs; only a failed screen pays for the entrywise checks
        reads = [torch.linalg.vector_norm(self.g)] + ([] if self.scale is None else [self.scale.sum(), self.scale.min()])
        gnorm, *screen = torch.stack(reads).double().tolist()
        if not (math.isfinite(gnorm) and all(map(math.isfinite, screen)) and (not screen or screen[1] > 0)):
            if not bool(torch.isfinite(grad).all()):
                raise ValueError("Invalid grad: contains NaN or inf")
            if ellipsoid is not None and not bool((torch.isfinite(ellipsoid) & (ellipsoid > 0)).all()):
                raise ValueError("Invalid ellipsoid: entries must be positive and finite")
        self.gnorm = gnorm
        self.limit = self.max_iter or (10 if self.name == "cg" else 1) * grad.numel()
        self._setup()
        return self

    def solve(self, radius: float, rtol: Optional[float] = None) -> SubproblemResult:
        """The step for ``radius`` (and a Krylov tolerance ``rtol``, default the solver's)."""
        radius = float(radius)
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"Invalid radius: {radius!r} (must be positive and finite)")
        u, decrease, boundary, negative, lam, status = self._solve(radius, self.rtol if rtol is None else float(rtol))
        used, self._reported = self.spent["hvp"] - self._reported, self.spent["hvp"]
        step = u if self.scale is None else self.scale * u
        decrease = torch.as_tensor(decrease, dtype=self.g.dtype, device=self.g.device)
        # clamp: rounding may leave a zero decrease at -1e-17
        return SubproblemResult(step, torch.clamp(decrease, min=0.0), bool(boundary), bool(negative), int(used),
                                None if lam is None else float(lam), status)

    def leftmost(self):
        """``(curvature, direction)``: the leftmost Ritz pair the query found, as a direction
        :math:`s` (any scale) with its Rayleigh quotient in the region's norm; None if none."""
        return None

    def _setup(self) -> None:
        pass

    def _solve(self, radius: float, rtol: float):
        raise NotImplementedError


class Cauchy(Solver):
    """The minimiser of the model along :math:`-A^{-1} g` (one product per query)."""

    name = "cauchy"

    def _setup(self):
        self.curvature = float(torch.dot(self.g, self.op(self.g))) if self.gnorm > 0 else 0.0
        if not math.isfinite(self.curvature):
            raise NonFiniteCurvatureError()

    def _solve(self, radius, rtol):
        gnorm, curvature = self.gnorm, self.curvature
        if gnorm == 0.0:
            return torch.zeros_like(self.g), 0.0, False, False, None, "zero_gradient"
        # tau = 1 on non-positive curvature, else the 1-D minimiser capped at the boundary.
        tau = min(gnorm**3 / (radius * curvature), 1.0) if curvature > 0 else 1.0
        t = tau * radius / gnorm
        value = -t * gnorm**2 + 0.5 * t**2 * curvature
        return -t * self.g, -value, tau >= 1.0, curvature <= 0, None, "boundary" if tau >= 1.0 else "interior"


class SteihaugCG(Solver):
    """Steihaug-Toint truncated conjugate gradients (each radius re-runs the iteration)."""

    name = "cg"

    def _solve(self, radius, rtol):
        # Written without data-dependent Python branches inside the loop: all decisions are
        # 0-d tensors, so on a GPU the host only waits when it checks `done` (every
        # `check_every` products). Products computed after termination are counted.
        # Vector updates are in place, fused (addcmul) and masked by 0-d factors rather than by
        # torch.where on whole vectors: once finished, p is kept (times 1, minus 0 r) and u, hu, r
        # move by 0.
        g, op = self.g, self.op
        zero, one = torch.zeros((), dtype=g.dtype, device=g.device), torch.ones((), dtype=g.dtype, device=g.device)
        minus_one = -one  # (made on the device: a tensor built from host numbers would wait for its queue)
        u, hu, r = torch.zeros_like(g), torch.zeros_like(g), g.clone()
        p = -r
        rr = torch.dot(r, r)
        tol2 = (rtol**2) * rr
        done = rr == 0
        hit_boundary = negative = torch.zeros((), dtype=torch.bool, device=g.device)
        finite = torch.ones((), dtype=torch.bool, device=g.device)  # a NaN/inf in H p shows in p^T H p
        for k in range(self.limit):
            if k % self.check_every == 0 and bool(done | ~finite):
                break
            hp = op(p)
            php, pp, up, uu = torch.stack([torch.dot(p, hp), torch.dot(p, p), torch.dot(u, p), torch.dot(u, u)])
            finite = finite & torch.isfinite(php)
            safe_pp = torch.where(pp > 0, pp, one)
            # Positive root of ||u + tau p||^2 = radius^2.
            tau = (-up + torch.sqrt(torch.clamp(up * up + pp * (radius**2 - uu), min=0.0))) / safe_pp
            curv = php <= 0
            alpha = rr / torch.where(curv, one, php)
            hit = curv | (alpha >= tau)
            a = torch.where(done, zero, torch.where(hit, tau, alpha))
            u.addcmul_(p, a)
            hu.addcmul_(hp, a)
            r.addcmul_(hp, a)
            rr_new = torch.dot(r, r)
            finished = done | hit | (rr_new <= tol2)
            # the iteration that meets negative curvature or the boundary is the last one
            negative, hit_boundary = torch.where(done, negative, curv), torch.where(done, hit_boundary, hit)
            beta = rr_new / rr  # (NaN when rr = 0, but then finished and unused)
            p.mul_(torch.where(finished, one, beta)).addcmul_(r, torch.where(finished, zero, minus_one))
            rr, done = rr_new, finished
        finite, boundary, done, negative = torch.stack([finite, hit_boundary, done, negative]).tolist()  # one read
        if not finite:
            raise NonFiniteCurvatureError()
        value = torch.dot(g, u) + 0.5 * torch.dot(u, hu)
        status = "boundary" if boundary else ("converged" if done else "max_iter")
        if self.gnorm == 0.0:
            status = "zero_gradient"
        return u, -value, boundary, negative, None, status


class GLTR(Solver):
    """Lanczos (GLTR): the subproblem solved exactly on a growing Krylov space (see the module
    docstring); the tridiagonal matrix is kept, so a smaller radius costs no products."""

    name = "gltr"

    def _setup(self):
        self.lz = Lanczos(self.op, self.g, generator=self.generator)
        self.gamma = self.lz.start_norm  # g = gamma q_1 (0: the first block starts at random)
        self.certified, self.extra = False, None

    def _project(self, radius):
        lz = self.lz
        if self.extra is None:
            eigvals, eigvecs = lz.eigh()
        else:  # T bordered by the certificate's vector v: the projection of H onto [Q, v]
            v, border, corner = self.extra
            t = np.diag(np.asarray(lz.alphas + [corner]))
            t[np.arange(lz.k - 1), np.arange(1, lz.k)] = t[np.arange(1, lz.k), np.arange(lz.k - 1)] = lz.betas[:lz.k - 1]
            t[:-1, -1] = t[-1, :-1] = border
            eigvals, eigvecs = np.linalg.eigh(t)
        x, lam, hard = _secular(eigvals, self.gamma * eigvecs[0], radius)  # V^T (gamma e_1)
        return eigvals, eigvecs, x, lam, hard, eigvecs @ x

    def _settled(self, sol, rtol, radius) -> bool:
        lz, (eigvals, eigvecs, _, lam, _, h) = self.lz, sol
        floor = rtol * max(lz.scale, 1e-300)
        near_hard = eigvals[0] < 0 and lam + eigvals[0] <= 1e-2 * lam  # lam > 0: on the boundary
        if lz.broke_down:
            # An invariant space. One grown from a random vector holds the leftmost eigenvalue of
            # everything not yet explored (with probability 1): done. One grown from g is explored
            # further only on a sign of a hard case (or with rtol = 0), or when the residual taken
            # for rounding would still move the step (in float32 a badly scaled ellipsoid leaves
            # real couplings near 100 eps ||H q||).
            if self.gamma == 0 or len(lz.block_starts) > 1:
                return True
            return not (rtol == 0 or near_hard or lz.residual_beta * abs(h[-1]) > rtol * self.gamma)
        if self.gamma == 0 or len(lz.block_starts) > 1:
            # a block started at random must resolve its leftmost curvature first
            if lz.leftmost_residual() > floor:
                return False
        elif near_hard and lz.last_beta * abs(eigvecs[-1, 0]) > floor:
            return False  # the step is dominated by the leftmost Ritz vector: wait for it to converge
        tol = rtol * self.gamma if self.gamma > 0 else floor * radius
        return lz.last_beta * abs(h[-1]) <= tol

    def _budget(self) -> int:
        # the certificate's products: what max_iter leaves (one for the new vector), or the dimension
        return self.max_iter - self.lz.k - 1 if self.max_iter else self.g.numel()

    def _certify(self, lam, rtol):
        # Lanczos from a random start estimates the leftmost eigenpair of H. Above -lam it certifies
        # H + lam I >= 0 (with probability 1); below, its Ritz vector, made orthogonal to the
        # Krylov space, joins the basis: the hard case's missing direction.
        self.certified = True
        probe = Lanczos(self.op, torch.zeros_like(self.g), generator=self.generator)
        while not probe.exhausted and probe.k < self._budget():
            probe.step()
            # converged when the leftmost Ritz value is resolved relative to itself and to lam
            # (not to ||H||: with a badly scaled ellipsoid the deciding eigenvalues are tiny)
            theta = float(probe.eigh()[0][0])
            if probe.broke_down or probe.leftmost_residual() <= math.sqrt(rtol) * max(abs(theta), lam) + rtol * probe.scale:
                break
        theta, y = probe.eigh()
        if probe.k == 0 or theta[0] >= -lam:
            return
        q = self.lz.basis
        v = probe.combine(y[:, 0])
        for _ in range(2):
            v = v - q.T @ (q @ v)
        size = float(torch.linalg.vector_norm(v))
        if size <= 1e-8:  # the direction is (numerically) in the Krylov space already
            return
        v = v / size
        hv = self.op(v)
        border = (q @ hv).double().cpu().numpy()
        corner = float(torch.dot(v, hv))
        if not (math.isfinite(corner) and np.all(np.isfinite(border))):
            raise NonFiniteCurvatureError()
        self.extra = (v, border, corner)

    def _solve(self, radius, rtol):
        lz, settled = self.lz, self.certified
        while not settled:
            if lz.k:
                sol = self._project(radius)
                settled = self._settled(sol, rtol, radius)
            if settled or lz.exhausted or lz.k >= self.limit:
                break
            lz.step()
        if self.certified:
            sol = self._project(radius)
        elif self.certificate and not lz.exhausted and self._budget() > 0:
            self._certify(sol[3], rtol)
            sol = self._project(radius)
        eigvals, _, x, lam, hard, h = sol
        value = self.gamma * h[0] + 0.5 * float(np.sum(eigvals * x * x))  # m(Qh) = gamma h_1 + h^T T h / 2
        boundary = lam > 0 or float(np.linalg.norm(h)) >= radius * (1 - 1e-8)
        status = "hard_case" if hard else ("boundary" if boundary else "interior")
        converged = settled or lz.exhausted or self.certified
        u = lz.combine(h[:lz.k]) + (0.0 if self.extra is None else float(h[-1]) * self.extra[0])
        return u, -value, boundary, eigvals[0] < 0, lam, status if converged else "max_iter"

    def leftmost(self):
        theta, y = self.lz.eigh()  # (the Krylov space's; a certificate's vector is not needed here)
        u = self.lz.combine(y[:, 0])
        return float(theta[0]), u if self.scale is None else self.scale * u


class Exact(Solver):
    """Dense Moré-Sorensen: one eigendecomposition per query (``size`` products unless the
    Hessian is given as a matrix), then every radius is a secular equation."""

    name = "exact"

    def _setup(self):
        dense = self.op.dense()
        if not bool(torch.all(torch.isfinite(dense))):
            raise NonFiniteCurvatureError()
        eigvals, self.eigvecs = torch.linalg.eigh(0.5 * (dense + dense.T))
        self.eigvals = eigvals.detach().double().cpu().numpy()
        self.coeffs = (self.eigvecs.T @ self.g).detach().double().cpu().numpy()

    def _solve(self, radius, rtol):
        x, lam, hard = _secular(self.eigvals, self.coeffs, radius)
        u = self.eigvecs @ torch.as_tensor(x, dtype=self.g.dtype).to(self.g.device)
        value = float(self.coeffs @ x + 0.5 * np.sum(self.eigvals * x * x))
        boundary = lam > 0 or float(np.linalg.norm(x)) >= radius * (1 - 1e-8)
        return u, -value, boundary, self.eigvals[0] < 0, lam, "hard_case" if hard else (
            "boundary" if boundary else "interior")

    def leftmost(self):
        u = self.eigvecs[:, 0]
        return float(self.eigvals[0]), u if self.scale is None else self.scale * u


#: The registered solvers by name: ``"cauchy"``, ``"cg"``, ``"gltr"``, ``"exact"``.
SOLVERS: Dict[str, Type[Solver]] = {cls.name: cls for cls in (Cauchy, SteihaugCG, GLTR, Exact)}
#: The names of :data:`SOLVERS`.
METHODS = tuple(SOLVERS)


def get_solver(method: str, **options) -> Solver:
    """A solver by name (``"cauchy"``, ``"cg"``, ``"gltr"``, ``"exact"``) with its options."""
    if method not in SOLVERS:
        raise ValueError(f"Invalid method: {method!r}; expected one of {METHODS}")
    return SOLVERS[method](**options)


def solve_subproblem(grad: Tensor, hvp: HVP, radius: float, *, ellipsoid: Optional[Tensor] = None,
                     method: str = "cg", rtol: float = 1e-6, max_iter: Optional[int] = None, check_every: int = 1,
                     generator: Optional[torch.Generator] = None, certificate: bool = False) -> SubproblemResult:
    r"""Approximately minimise :math:`g^\top s + \frac12 s^\top H s` s.t. :math:`\|s\|_A \le \Delta`.

    ``grad``: :math:`g` (1-D); ``hvp``: a callable ``v -> H v``, a dense square tensor or a
    :class:`trlib.curvature.Operator`; ``radius``: :math:`\Delta > 0`; ``ellipsoid``: the
    positive :math:`a` of :math:`A = \operatorname{diag}(a)` (None: the sphere); ``method``: a
    name of :data:`SOLVERS`; the rest: the solver's options (:class:`Solver`). Returns a
    :class:`SubproblemResult`, computed on ``grad``'s device and in its dtype (the small
    tridiagonal and secular problems in float64 on the host). One query and one solve: for
    several radii at one point keep the solver, ``get_solver(method).query(grad, hvp, ellipsoid)``.

    References: Steihaug (1983); Toint (1981); Gould, Lucidi, Roma & Toint (1999);
    Moré & Sorensen (1983); Conn, Gould & Toint (2000), chapter 7.
    """
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"Invalid radius: {radius!r} (must be positive and finite)")
    solver = get_solver(method, rtol=rtol, max_iter=max_iter, check_every=check_every, generator=generator,
                        certificate=certificate)
    return solver.query(grad, hvp, ellipsoid).solve(radius)
