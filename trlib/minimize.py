r"""Deterministic trust-region minimisation of a function of one flat tensor.

The same iteration as :class:`trlib.TrustRegion` (:func:`trlib.region.iterate`) without
mini-batches: gradients and Hessian-vector products of ``fun`` come from autograd, the
subproblem from a :class:`trlib.subproblem.Solver` queried once per accepted point (a
rejected step re-solves at the smaller radius: no new products for ``"gltr"``,
``"exact"`` and ``"cauchy"``), the radius from :class:`trlib.RadiusRule`.

Unlike a method that stops at the first point with a small gradient, it checks the
curvature there: with :math:`\|g\| \le` ``gtol`` it sets :math:`g := 0` (Algorithm 1,
step 4), estimates the Hessian's smallest eigenvalue by Lanczos (started from the last
subproblem's leftmost Ritz vector, so that an accurate one costs a few products) and, if it
is below :math:`-`\ ``htol`` (a test on the Hessian itself, whatever the region's norm),
steps to the boundary along that eigenvector (the eigenpoint). So it leaves strict saddle
points, where scipy's ``trust-krylov`` (which stops on the gradient test alone) stays.

``method="arc"`` runs adaptive cubic regularisation through the same iteration: the cubic
model (:class:`trlib.cubic.CubicSolver`, Lanczos) with a weight :math:`\sigma` updated by
:class:`trlib.region.SigmaRule` in place of the radius (Cartis, Gould & Toint 2011), and at a
saddle the cubic model's minimiser along the leftmost eigenvector.

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
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn

from . import curvature, norms
from .lanczos import smallest_eigenpair
from .cubic import CubicSolver
from .region import RadiusRule, SigmaRule, iterate
from .subproblem import SubproblemResult, eigenpoint, get_solver

__all__ = ["minimize", "MinimizeResult"]


@dataclass
class MinimizeResult:
    r"""Like ``scipy.optimize.OptimizeResult``: the solution ``x`` (shaped like ``x0``), its value ``fun``, the final
    ``grad_norm``, ``success`` and ``message``; iterations ``nit``; evaluations of the function
    (``nfev``), its gradient (``ngev``) and Hessian-vector products (``nhvp``, the final
    curvature test included); the final ``radius`` (for ``method="arc"``: the final weight
    :math:`\sigma`) and a per-iteration ``history`` (value, radius or sigma, rho, acceptance,
    products)."""

    x: Any
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


class _Point:
    """The current point of ``fun``: value, gradient and counted curvature operator, built from
    the one evaluation that also served as the trial (no second forward on acceptance)."""

    def __init__(self, fun, x: Tensor):
        self.counts = {"fun": 0, "grad": 0, "hvp": 0}
        self.fun = fun
        self._move(x)

    def _evaluate(self, x: Tensor) -> Tensor:
        self.counts["fun"] += 1
        with torch.enable_grad():
            value = self.fun(x)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError("Invalid fun: must return a scalar tensor")
        return value.reshape(())

    def _move(self, x: Tensor, value: Optional[Tensor] = None) -> None:
        x = x.detach().requires_grad_(True) if value is None else x
        value = self._evaluate(x) if value is None else value
        self.counts["grad"] += 1
        with torch.enable_grad():
            grad = curvature.flat_grad(value, [x], create_graph=True)
        self.x, self.f, self.grad = x, float(value.detach()), grad.detach()
        self.op = curvature.as_operator(curvature.hvp_double_backward(grad, [x]), grad).counted(self.counts)

    def trial(self, step: Tensor) -> float:
        self._trial_x = (self.x.detach() + step).requires_grad_(True)
        self._trial_value = self._evaluate(self._trial_x)
        return float(self._trial_value.detach())

    def accept(self) -> None:
        self._move(self._trial_x, self._trial_value)


class _Variables:
    """The variables of ``fun`` as one flat tensor, and back: a tensor of any shape, a list,
    tuple or dict of tensors, or the trainable parameters of an ``nn.Module``."""

    def __init__(self, x0):
        self.kind, self.keys, self.module = type(x0), None, None
        if isinstance(x0, nn.Module):
            named = [(name, p) for name, p in x0.named_parameters() if p.requires_grad]
            self.module, self.keys = x0, [name for name, _ in named]
            tensors = [p for _, p in named]
        elif isinstance(x0, Tensor):
            tensors = [x0]
        elif isinstance(x0, (list, tuple)):
            tensors = list(x0)
        elif isinstance(x0, dict):
            self.keys, tensors = list(x0), list(x0.values())
        else:
            raise ValueError("Invalid x0: expected a floating-point tensor (of any shape), a list, tuple or dict of "
                             f"them, or an nn.Module, got {type(x0).__name__}")
        if not tensors:
            raise ValueError("Invalid x0: no variables (an empty container, or a module without parameters that "
                             "require grad)")
        for t in tensors:
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"Invalid x0: expected real floating-point tensors, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
        kinds = sorted({f"{t.dtype} on {t.device}" for t in tensors})
        if len(kinds) > 1:
            raise ValueError(f"Invalid x0: the tensors mix {kinds}; they must share one dtype and device")
        self.tensors, self.view = tensors, curvature.FlatView(tensors)
        self.start = torch.cat([t.detach().reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor):
        parts = self.view.split(flat)
        if self.keys is not None:
            return dict(zip(self.keys, parts))
        return parts[0] if issubclass(self.kind, Tensor) else self.kind(parts)

    def function(self, fun: Callable) -> Callable[[Tensor], Tensor]:
        if self.module is None:
            return lambda x: fun(self.unflatten(x))
        module = self.module
        loss = curvature.functional_loss(lambda: fun(module), module, self.tensors)
        return lambda x: loss(self.view.split(x))

    def flat_norm(self, norm):
        """A fixed ellipsoid given in the variables' shape, as one flat tensor."""
        if isinstance(norm, Tensor) and issubclass(self.kind, Tensor) and norm.shape == self.tensors[0].shape:
            return norm.reshape(-1)
        if isinstance(norm, (list, tuple, dict)):
            parts = list(norm) if not isinstance(norm, dict) else [norm.get(k) for k in (self.keys or [])]
            if len(parts) != len(self.tensors) or any(not isinstance(p, Tensor) or p.shape != t.shape
                                                       for p, t in zip(parts, self.tensors)):
                raise ValueError("Invalid norm: a fixed ellipsoid given as a container must match x0's tensors "
                                 "one for one, in shape (and keys)")
            return torch.cat([p.reshape(-1) for p in parts])
        return norm

    def finish(self, flat: Tensor):
        """The solution in x0's form; a module's parameters are set to it in place."""
        if self.module is not None:
            with torch.no_grad():
                for p, value in zip(self.tensors, self.view.split(flat)):
                    p.copy_(value)
        return self.unflatten(flat)


def minimize(
    fun: Callable[[Any], Tensor],
    x0: Any,
    *,
    method: str = "gltr",
    norm=None,
    gtol: float = 1e-5,
    htol: float = 1e-6,
    max_iter: int = 1000,
    radius: float = 1.0,
    max_radius: float = 1e8,
    sigma: float = 1.0,
    eta1: float = 0.1,
    eta2: float = 0.75,
    increase: float = 2.0,
    decrease: float = 4.0,
    max_krylov: Optional[int] = None,
    certificate: bool = False,
    callback: Optional[Callable[[Any, dict], Optional[bool]]] = None,
) -> MinimizeResult:
    r"""Minimise ``fun(x)`` (a scalar tensor) from ``x0`` by a trust-region Newton method.

    Args:
        fun: a twice-differentiable function, written in torch, of variables like ``x0``: a
            tensor of ``x0``'s shape, a list, tuple or dict like ``x0``, or for a module the
            module itself (``fun(model)``, evaluated with its parameters set to the iterate).
        x0: the start: a real floating-point tensor of any shape; a list, tuple or dict of
            them; or an ``nn.Module``, whose parameters that require grad are the variables
            (set in place to the solution at the end). One dtype and device throughout.
            The iteration runs on one flat vector of all variables, so the result is the one
            of the 1-D problem; ``res.x`` has ``x0``'s form (a dict of parameters for a module).
        method: subproblem solver: ``"gltr"`` (default), ``"cg"``, ``"cauchy"``, ``"exact"``; or
            ``"arc"``: adaptive cubic regularisation instead of a trust region (see above).
        norm: the region's shape: None or ``"uniform"`` (sphere), ``"rms"``, ``"adagrad"``,
            ``"adam"``, a :class:`trlib.norms.Norm`, or a positive tensor (a fixed ellipsoid,
            flat or in ``x0``'s form).
            An adaptive norm folds in the gradient of every accepted point, once.
        gtol: stop when :math:`\|\nabla f\| \le` ``gtol`` and no curvature below ``-htol``.
        htol: tolerance on the smallest Hessian eigenvalue at a stationary point.
        max_iter: most iterations (accepted or rejected).
        radius, max_radius, eta1, eta2, increase, decrease: the radius rule (:class:`trlib.RadiusRule`).
        sigma: ``"arc"``'s initial weight :math:`\sigma_0`; its rule is :class:`trlib.SigmaRule` with
            the same ``eta1``, ``eta2``, ``increase`` (divides :math:`\sigma` after a very successful
            step), ``decrease`` (multiplies it after a rejection) and ``1/max_radius`` as its floor.
        max_krylov: most products per subproblem (None: as many as needed).
        certificate: GLTR's search for an exact hard case (:mod:`trlib.subproblem`).
        callback: ``callback(x, info)`` after every iteration (``x`` in ``x0``'s form);
            returning True stops.

    The Krylov tolerance is :math:`\min(1/2, \sqrt{\|g\|})`, which gives superlinear
    local convergence (Conn, Gould & Toint 2000, §7.5).

    Example: least squares on a module's parameters, which end at the solution.

    >>> X = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    >>> Y = X @ torch.tensor([[1.0], [2.0]], dtype=torch.float64) + 3.0
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(2, 1, dtype=torch.float64)
    >>> res = minimize(lambda m: ((m(X) - Y) ** 2).mean(), model)
    >>> sorted(res.x), [round(v, 6) for v in model.weight.flatten().tolist()], round(model.bias.item(), 6)
    (['bias', 'weight'], [1.0, 2.0], 3.0)
    """
    variables = _Variables(x0)
    fun, x0, norm = variables.function(fun), variables.start, variables.flat_norm(norm)
    if callback is not None:
        shaped_callback = callback
        callback = lambda x, info: shaped_callback(variables.unflatten(x), info)  # noqa: E731
    for name, value in (("gtol", gtol), ("htol", htol)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"Invalid {name}: {value!r} (must be >= 0)")
    if not (isinstance(max_iter, int) and max_iter >= 0):
        raise ValueError(f"Invalid max_iter: {max_iter!r} (must be a non-negative int)")
    arc = method == "arc"
    name, value = ("sigma", sigma) if arc else ("radius", radius)  # the first radius or weight
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid {name}: {value!r} (must be a positive finite number)")
    generator = torch.Generator().manual_seed(0)
    if arc:
        RadiusRule(eta1, eta2, increase, decrease, max_radius)  # the same checks, with the names given here
        rule, radius = SigmaRule(eta1, eta2, increase, decrease, 1.0 / max_radius), float(sigma)
        solver = CubicSolver(max_iter=max_krylov, generator=generator)
    else:
        rule = RadiusRule(eta1, eta2, increase, decrease, max_radius, grow_on_boundary_only=True)
        solver = get_solver(method, max_iter=max_krylov, generator=generator, certificate=certificate)
    shape = norms.get_norm(norm)
    if shape.uses_per_sample_gradients:
        raise ValueError(f"Invalid norm: {shape.name!r} needs per-sample gradients; a function of x has none")
    norm_state = shape.init(x0)
    eps = torch.finfo(x0.dtype).eps

    point = _Point(fun, x0)
    if not math.isfinite(point.f):
        raise ValueError(f"Invalid x0: fun(x0) = {point.f}")
    history: List[dict] = []
    message, success = "maximum number of iterations reached", False
    fresh, saddle, last, spent = True, None, None, 0
    for it in range(max_iter):
        if fresh:  # a new point: the norm and the solver look at it once
            ellipsoid = shape.update(norm_state, point.grad, **({"hvp": point.op} if shape.uses_curvature else {}))
            gnorm = float(torch.linalg.vector_norm(point.grad))
            fresh, saddle = False, None
            if gnorm > gtol:
                last = solver.query(point.grad, point.op, ellipsoid)
        if gnorm <= gtol:
            if saddle is None:
                # Step 4 of Algorithm 1: with g := 0 only curvature can move us. The test is on the
                # Hessian's own smallest eigenvalue, whatever the region's shape.
                start = torch.randn(point.grad.shape, generator=generator, dtype=point.grad.dtype).to(point.grad.device)
                start /= torch.linalg.vector_norm(start)
                guess = last.leftmost() if last is not None else None
                if guess is not None:  # the last Lanczos' leftmost Ritz vector, kept honest by the random part
                    start += guess[1] / torch.linalg.vector_norm(guess[1])
                lam_min, v, spent = smallest_eigenpair(point.op, start, rtol=1e-8, max_iter=max_krylov,
                                                       generator=generator)
                if lam_min >= -htol:
                    message, success = "converged: gradient below gtol, no curvature below -htol", True
                    break
                saddle = (lam_min, v)

            def solve(r, rtol, lam_min=saddle[0], v=saddle[1]):
                if arc:  # the cubic model's minimiser along v: ||s||_A = -mu / sigma, mu = v'Hv / ||v||_A^2
                    mu = lam_min / float(norms.ellipsoid_norm(v, ellipsoid)) ** 2
                    step = eigenpoint(point.grad, -mu / r, lam_min, v, ellipsoid=ellipsoid)
                    cubic = r / 3.0 * norms.ellipsoid_norm(step, ellipsoid) ** 3
                else:
                    step, cubic = eigenpoint(point.grad, r, lam_min, v, ellipsoid=ellipsoid), 0.0
                gain = -(torch.dot(point.grad, step) + 0.5 * lam_min * torch.dot(step, step) + cubic)
                return SubproblemResult(step, gain, not arc, True, 0, None, "eigenpoint")
        else:
            solve = last.solve
        used = radius
        t = iterate(solve, point.trial, lambda: None, point.f, radius, rule, ellipsoid=ellipsoid,
                    rtol=min(0.5, math.sqrt(gnorm)), eps=eps)
        radius, res, spent = t.radius, t.result, spent + t.result.iterations
        if t.accepted:
            point.accept()
            fresh = True
        info = dict(iteration=it, fun=point.f, trial_fun=t.trial_loss, **{"sigma" if arc else "radius": used},
                    rho=t.rho, accepted=t.accepted,
                    grad_norm=gnorm, hvps=spent, model_decrease=float(res.model_decrease),
                    on_boundary=res.on_boundary, negative_curvature=res.negative_curvature, saddle_step=gnorm <= gtol)
        history.append(info)
        spent = 0
        if callback is not None and callback(point.x.detach(), info):
            message = "stopped by callback"
            break
        scale = max(1.0, float(torch.linalg.vector_norm(point.x.detach())))
        if ((t.step_norm < 1e-14 * scale and not t.accepted) or radius > 1e30) if arc else radius < 1e-14 * scale:
            message = ("steps fell below machine precision: no further progress possible" if arc else
                       "radius fell below machine precision: no further progress possible")
            success = float(torch.linalg.vector_norm(point.grad)) <= gtol
            break
    c = point.counts
    return MinimizeResult(x=variables.finish(point.x.detach()), fun=point.f, success=success, message=message,
                          grad_norm=float(torch.linalg.vector_norm(point.grad)), nit=len(history), nfev=c["fun"],
                          ngev=c["grad"], nhvp=c["hvp"], radius=radius, history=history)
