r"""Deterministic trust-region minimisation of a function of one flat tensor.

The same loop as :class:`trlib.TrustRegion` without mini-batches: gradients and
Hessian-vector products of ``fun`` come from autograd, the subproblem from
:func:`trlib.solve_subproblem`, the radius from :class:`trlib.RadiusRule`.

Unlike a method that stops at the first point with a small gradient, it checks the
curvature there: with :math:`\|g\| \le` ``gtol`` it sets :math:`g := 0` (Algorithm 1,
step 4), estimates the Hessian's smallest eigenvalue by Lanczos and, if it is below
:math:`-`\ ``htol`` (a test on the Hessian itself, whatever the region's norm), steps to the
boundary along that eigenvector (the eigenpoint). So it leaves strict saddle points, where
scipy's ``trust-krylov`` (which stops on the gradient test alone) stays.

Example: the Rosenbrock function.

>>> import torch, trlib
>>> rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
>>> res = trlib.minimize(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64))
>>> res.success, [round(v, 6) for v in res.x.tolist()]
(True, [1.0, 1.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor

from . import norms
from .curvature import function_hvp
from .region import RadiusRule, reduction_ratio
from .lanczos import smallest_eigenpair
from .subproblem import METHODS, SubproblemResult, solve_subproblem

__all__ = ["minimize", "MinimizeResult"]


@dataclass
class MinimizeResult:
    """Like ``scipy.optimize.OptimizeResult``: the solution ``x``, its value ``fun``, the final
    ``grad_norm``, ``success`` and ``message``; iterations ``nit``; evaluations of the function
    (``nfev``), its gradient (``ngev``) and Hessian-vector products (``nhvp``); the final
    ``radius`` and a per-iteration ``history`` (value, radius, rho, acceptance, products)."""

    x: Tensor
    fun: float
    grad_norm: float
    success: bool
    message: str
    nit: int
    nfev: int
    ngev: int
    nhvp: int
    radius: float
    history: List[dict] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"MinimizeResult(success={self.success}, fun={self.fun:.6g}, grad_norm={self.grad_norm:.3g}, "
                f"nit={self.nit}, nfev={self.nfev}, ngev={self.ngev}, nhvp={self.nhvp}, message={self.message!r})")


def minimize(
    fun: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    method: str = "gltr",
    norm=None,
    gtol: float = 1e-5,
    htol: float = 1e-6,
    max_iter: int = 1000,
    radius: float = 1.0,
    max_radius: float = 1e3,
    eta1: float = 0.1,
    eta2: float = 0.75,
    increase: float = 2.0,
    decrease: float = 4.0,
    max_krylov: Optional[int] = None,
    callback: Optional[Callable[[Tensor, dict], Optional[bool]]] = None,
) -> MinimizeResult:
    r"""Minimise ``fun(x)`` (a scalar tensor) from ``x0`` by a trust-region Newton method.

    Args:
        fun: a twice-differentiable function of one 1-D tensor, written in torch.
        x0: the start (a 1-D floating tensor; its dtype and device are used throughout).
        method: subproblem solver: ``"gltr"`` (default), ``"cg"``, ``"cauchy"``, ``"exact"``.
        norm: the region's shape: None or ``"uniform"`` (sphere), ``"rms"``, ``"adagrad"``,
            ``"adam"``, a :class:`trlib.norms.Norm`, or a positive tensor (a fixed ellipsoid).
        gtol: stop when :math:`\|\nabla f\| \le` ``gtol`` and no curvature below ``-htol``.
        htol: tolerance on the smallest Hessian eigenvalue at a stationary point.
        max_iter: most iterations (accepted or rejected).
        radius, max_radius, eta1, eta2, increase, decrease: the radius rule (:class:`trlib.RadiusRule`).
        max_krylov: most products per subproblem (None: as many as needed).
        callback: ``callback(x, info)`` after every iteration; returning True stops.

    The Krylov tolerance is :math:`\min(1/2, \sqrt{\|g\|})`, which gives superlinear
    local convergence (Conn, Gould & Toint 2000, §7.5).
    """
    if not isinstance(x0, Tensor) or x0.ndim != 1 or not x0.is_floating_point():
        raise ValueError("Invalid x0: expected a 1-D floating-point tensor")
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r}; expected one of {METHODS}")
    for name, value in (("gtol", gtol), ("htol", htol)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"Invalid {name}: {value!r} (must be >= 0)")
    if not (isinstance(max_iter, int) and max_iter >= 0):
        raise ValueError(f"Invalid max_iter: {max_iter!r} (must be a non-negative int)")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"Invalid radius: {radius!r} (must be a positive finite number)")
    rule = RadiusRule(eta1, eta2, increase, decrease, max_radius, grow_on_boundary_only=True)
    shape = norms.get_norm(norm)
    norm_state = shape.init(x0)
    generator = torch.Generator().manual_seed(0)

    x = x0.detach().clone()
    value, grad, hvp = function_hvp(fun, x)
    nfev, ngev, nhvp = 1, 1, 0
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"Invalid x0: fun(x0) = {f}")
    history: List[dict] = []
    message, success = "maximum number of iterations reached", False
    for it in range(max_iter):
        ellipsoid = shape.update(norm_state, grad)
        gnorm = float(torch.linalg.vector_norm(grad))
        stationary = gnorm <= gtol
        if stationary:
            # Step 4 of Algorithm 1: with g := 0 only curvature can move us. The test is on the
            # Hessian's own smallest eigenvalue (Lanczos from a random start), whatever the
            # region's shape; the step is the eigenpoint, on the region's boundary.
            lam_min, v, products = smallest_eigenpair(hvp, torch.zeros_like(grad), rtol=1e-8,
                                                      max_iter=max_krylov, generator=generator)
            nhvp += products
            if lam_min >= -htol:
                message, success = "converged: gradient below gtol, no curvature below -htol", True
                break
            step = v * (radius / float(norms.ellipsoid_norm(v, ellipsoid)))
            if float(torch.dot(grad, step)) > 0:
                step = -step
            decrease = -(torch.dot(grad, step) + 0.5 * lam_min * torch.dot(step, step))
            res = SubproblemResult(step, decrease, True, True, products, None, "eigenpoint")
        else:
            res = solve_subproblem(grad, hvp, radius, ellipsoid=ellipsoid, method=method,
                                   rtol=min(0.5, math.sqrt(gnorm)), max_iter=max_krylov, generator=generator)
            nhvp += res.iterations
        decrease_model = float(res.model_decrease)
        x_trial = (x + res.step).detach().requires_grad_(True)
        with torch.enable_grad():
            trial = fun(x_trial)
        nfev += 1
        f_trial = float(trial.detach())
        rho = reduction_ratio(f, f_trial, decrease_model, eps=torch.finfo(x.dtype).eps)
        used_radius = radius
        step_norm = float(norms.ellipsoid_norm(res.step, ellipsoid))
        radius, accepted = rule.update(radius, rho, res.on_boundary, step_norm)
        if accepted:
            x = x_trial.detach()
            with torch.enable_grad():
                (g_new,) = torch.autograd.grad(trial, x_trial, create_graph=True, allow_unused=True)
            ngev += 1
            if g_new is None:
                g_new = torch.zeros_like(x)
            grad_graph = g_new
            grad = g_new.detach()

            def hvp(v, grad_graph=grad_graph, x_trial=x_trial):
                if not grad_graph.requires_grad:
                    return torch.zeros_like(v)
                (hv,) = torch.autograd.grad(grad_graph, x_trial, grad_outputs=v, retain_graph=True, allow_unused=True)
                return torch.zeros_like(v) if hv is None else hv

            f = f_trial
        info = dict(iteration=it, fun=f, trial_fun=f_trial, radius=used_radius, rho=rho, accepted=accepted,
                    grad_norm=gnorm, hvps=res.iterations, model_decrease=decrease_model, on_boundary=res.on_boundary,
                    negative_curvature=res.negative_curvature, saddle_step=stationary)
        history.append(info)
        if callback is not None and callback(x, info):
            message = "stopped by callback"
            break
        if radius < 1e-14 * max(1.0, float(torch.linalg.vector_norm(x))):
            message = "radius fell below machine precision: no further progress possible"
            success = float(torch.linalg.vector_norm(grad)) <= gtol
            break
    gnorm = float(torch.linalg.vector_norm(grad))
    return MinimizeResult(x=x.detach(), fun=f, grad_norm=gnorm, success=success, message=message,
                          nit=len(history), nfev=nfev, ngev=ngev, nhvp=nhvp, radius=radius, history=history)
