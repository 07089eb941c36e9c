r"""The radius rule, and the one trust-region iteration that :func:`trlib.minimize` and
:class:`trlib.TrustRegion` share.

After a trial step :math:`s_t` with model decrease :math:`m_t(0) - m_t(s_t) > 0`, the
agreement between function and model is

.. math:: \rho_t = \frac{\mathcal L(w_t) - \mathcal L(w_t + s_t)}{m_t(0) - m_t(s_t)} .

The step is accepted when :math:`\rho_t \ge \eta_1`; the radius grows by ``increase``
(capped at ``max_radius``) when :math:`\rho_t \ge \eta_2` and shrinks by ``decrease``
when the step is rejected (Algorithm 1; Conn, Gould & Toint 2000, Alg. 6.1.1). The
deterministic :func:`trlib.minimize` grows it only after steps that reached the boundary.

Guards the authors' code lacked: a non-finite trial loss is a rejection (never an
accepted step); decreases at rounding level count as agreement (see
:func:`reduction_ratio`) instead of dividing noise by noise (the authors set
:math:`\rho = 1` below a fixed threshold of 1e-15); and a step whose predicted decrease is
below the loss's rounding level is solved again with a tighter Krylov tolerance before it
is tried (:func:`iterate`): an inexact solve of a badly scaled model can return a step too
short to be measured, and shrinking the radius would never cure that.

Adaptive cubic regularisation (:class:`trlib.ARC`, ``minimize(method="arc")``) runs the same
iteration with a weight :math:`\sigma` in place of the radius and :class:`SigmaRule` in place
of :class:`RadiusRule`.

>>> rule = RadiusRule(eta1=0.1, eta2=0.9, increase=2.0, decrease=4.0, max_radius=10.0)
>>> rule.update(radius=1.0, rho=0.95)
(2.0, True)
>>> rule.update(radius=1.0, rho=0.05)
(0.25, False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .norms import ellipsoid_norm
from .subproblem import SubproblemResult

__all__ = ["RadiusRule", "SigmaRule", "reduction_ratio", "iterate", "Trial"]


def reduction_ratio(loss: float, trial_loss: float, model_decrease: float, eps: float = 2.0**-52) -> float:
    r""":math:`\rho` = actual / predicted decrease, guarded against rounding.

    Both decreases are shifted by :math:`\delta = 10\,\epsilon \max(1, |\mathcal L|)`
    (Conn, Gould & Toint 2000, §17.4.2), with ``eps`` the machine epsilon of the dtype the
    loss was computed in: when both are at rounding level, :math:`\rho \approx 1` instead of
    a coin flip, so a converged method is not driven to a zero radius by noise.
    A non-finite trial loss gives ``-inf`` (a rejection).
    """
    if not math.isfinite(trial_loss):
        return -math.inf
    delta = 10.0 * eps * max(1.0, abs(loss))
    return (loss - trial_loss + delta) / (max(model_decrease, 0.0) + delta)


@dataclass(frozen=True)
class RadiusRule:
    """The trust-region radius update (see the module docstring). Validates on construction."""

    eta1: float = 0.01
    eta2: float = 0.95
    increase: float = 1.1
    decrease: float = 1.5
    max_radius: float = 10.0
    grow_on_boundary_only: bool = False

    def __post_init__(self):
        for name in ("eta1", "eta2"):
            if not (isinstance(getattr(self, name), (int, float)) and 0.0 <= getattr(self, name) <= 1.0):
                raise ValueError(f"Invalid {name}: {getattr(self, name)!r} (must lie in [0, 1])")
        if self.eta1 > self.eta2:
            raise ValueError(f"Invalid eta1: {self.eta1!r} (must not exceed eta2={self.eta2!r})")
        if not (isinstance(self.increase, (int, float)) and math.isfinite(self.increase) and self.increase >= 1):
            raise ValueError(f"Invalid increase: {self.increase!r} (must be a finite number >= 1)")
        if not (isinstance(self.decrease, (int, float)) and math.isfinite(self.decrease) and self.decrease > 1):
            raise ValueError(f"Invalid decrease: {self.decrease!r} (must be a finite number > 1)")
        if not (isinstance(self.max_radius, (int, float)) and math.isfinite(self.max_radius) and self.max_radius > 0):
            raise ValueError(f"Invalid max_radius: {self.max_radius!r} (must be a positive finite number)")

    def update(self, radius: float, rho: float, on_boundary: bool = True, step_norm: float = math.inf):
        """Returns ``(new_radius, accepted)``.

        A rejection shrinks from ``min(radius, step_norm)``: after an interior step, shrinking
        the radius alone could leave the same step feasible, and it would be tried again.
        With ``grow_on_boundary_only`` (the classical deterministic rule) an interior step
        never grows the radius: it was not limited by it.
        """
        accepted = rho >= self.eta1
        if rho >= self.eta2 and (on_boundary or not self.grow_on_boundary_only):
            radius = min(radius * self.increase, self.max_radius)
        elif not accepted:
            if math.isfinite(step_norm) and step_norm > 0:
                radius = min(radius, step_norm)
            radius = radius / self.decrease
        return radius, accepted


@dataclass(frozen=True)
class SigmaRule:
    r"""The regularisation-weight update of adaptive cubic regularisation (ARC), the counterpart
    of :class:`RadiusRule`: the weight :math:`\sigma` plays the inverse of a radius.

    .. math:: \sigma_{t+1} = \begin{cases}
              \max(\sigma_t / \gamma_{\rm inc},\ \sigma_{\min}) & \rho_t \ge \eta_2 \text{ (very successful)}\\
              \sigma_t & \eta_1 \le \rho_t < \eta_2 \text{ (successful)}\\
              \gamma_{\rm dec}\,\sigma_t & \rho_t < \eta_1 \text{ (unsuccessful: rejected)}
              \end{cases}

    with :math:`\gamma_{\rm inc}` = ``increase`` and :math:`\gamma_{\rm dec}` = ``decrease``
    named, as in :class:`RadiusRule`, for what they do to the region the model is trusted in
    (its size scales like :math:`1/\sigma`). Cartis, Gould & Toint (2011), *Adaptive cubic
    regularisation methods for unconstrained optimization, Part I*, Math. Program. 127,
    Algorithm 2.1 (their :math:`\gamma_1 = \gamma_2 = \gamma_{\rm dec}`, and a decrease on very
    successful steps floored at :math:`\sigma_{\min}`, as in their §7).

    >>> rule = SigmaRule(eta1=0.1, eta2=0.9, increase=2.0, decrease=2.0, min_sigma=1e-8)
    >>> rule.update(1.0, rho=0.95), rule.update(1.0, rho=0.5), rule.update(1.0, rho=0.05)
    ((0.5, True), (1.0, True), (2.0, False))
    """

    eta1: float = 0.1
    eta2: float = 0.9
    increase: float = 2.0
    decrease: float = 2.0
    min_sigma: float = 1e-8

    def __post_init__(self):
        RadiusRule(self.eta1, self.eta2, self.increase, self.decrease)  # the same four checks
        if not (isinstance(self.min_sigma, (int, float)) and math.isfinite(self.min_sigma) and self.min_sigma > 0):
            raise ValueError(f"Invalid min_sigma: {self.min_sigma!r} (must be a positive finite number)")

    def update(self, sigma: float, rho: float, on_boundary: bool = True, step_norm: float = math.inf):
        r"""Returns ``(new_sigma, accepted)`` (``on_boundary`` and ``step_norm``, which a radius
        needs, are ignored: the cubic term already shrinks the step as :math:`\sigma` grows)."""
        accepted = rho >= self.eta1
        if rho >= self.eta2:
            sigma = max(sigma / self.increase, self.min_sigma)
        elif not accepted:
            sigma = sigma * self.decrease
        return sigma, accepted


@dataclass
class Trial:
    """What one iteration did: the subproblem ``result`` (``iterations``: all its products),
    ``rho``, ``accepted``, the ``radius`` for the next iteration, the ``trial_loss``, the
    step's length in the region's norm, the Krylov tolerance it ended with and the model
    decrease as a number."""

    result: SubproblemResult
    rho: float
    accepted: bool
    radius: float
    trial_loss: float
    step_norm: float
    rtol: float
    model_decrease: float = math.nan


def iterate(solve: Callable[[float, float], SubproblemResult], trial: Callable[[Tensor], float],
            undo: Callable[[], None], loss: float, radius: float, rule: RadiusRule, *,
            ellipsoid: Optional[Tensor] = None, rtol: float = 0.1, eps: float = 2.0**-52) -> Trial:
    r"""One trust-region iteration: subproblem, trial point, :math:`\rho`, radius rule, accept or undo.

    ``solve(radius, rtol)`` answers the subproblem at the current point (a
    :class:`trlib.subproblem.Solver`'s ``solve``; for ARC, ``radius`` is the weight
    :math:`\sigma`, ``solve`` a :class:`trlib.cubic.CubicSolver`'s and ``rule`` a
    :class:`SigmaRule`); ``trial(step)`` moves to the trial point and
    returns the loss there; ``undo()`` moves back (called on a rejection). A step from a solve
    that stopped on its tolerance is solved again with a tolerance 100 times tighter (down to
    1e-12), at the same radius, when its predicted decrease lies below the loss's rounding
    level :math:`10\,\epsilon\max(1, |\mathcal L|)` (it cannot be measured: it is not tried), or
    when it is rejected with a predicted decrease below :math:`\sqrt\epsilon\max(1, |\mathcal L|)`
    (the loss's own rounding, from cancellations, can exceed the first level by orders of
    magnitude): the radius never shrinks for noise.
    """
    result = solve(radius, rtol)
    products, scale = result.iterations, max(1.0, abs(loss))
    while True:
        step = result.step
        # the decrease and the step's length in one read (one synchronisation on a GPU); a finite
        # length implies a finite step (a NaN/inf entry makes the sum of squares non-finite
        # whatever the weights), so only a non-finite one pays for the entrywise test
        decrease, length = torch.stack([torch.as_tensor(result.model_decrease, device=step.device).double().reshape(()),
                                        ellipsoid_norm(step, ellipsoid).double()]).tolist()
        finite = math.isfinite(decrease) and (math.isfinite(length) or bool(torch.isfinite(step).all()))
        inexact = finite and result.status in ("converged", "interior") and rtol * 1e-2 >= 1e-12
        trial_loss = math.nan
        if not (inexact and decrease <= 10.0 * eps * scale):  # below f's rounding level: not worth a trial
            trial_loss = trial(result.step) if finite else math.nan  # a non-finite step never moves the point
            rho = reduction_ratio(loss, trial_loss, decrease, eps=eps)
            if rho >= rule.eta1 or not (inexact and decrease <= math.sqrt(eps) * scale):
                break
        tighter = solve(radius, rtol * 1e-2)
        products, rtol = products + tighter.iterations, rtol * 1e-2
        if tighter.iterations == 0:  # the solve had nothing more to give: keep this step
            if math.isnan(trial_loss):
                trial_loss = trial(result.step)
                rho = reduction_ratio(loss, trial_loss, decrease, eps=eps)
            break
        if not math.isnan(trial_loss):
            undo()
        result = tighter
    step_norm = length if finite else math.inf
    new_radius, accepted = rule.update(radius, rho, result.on_boundary, step_norm)
    if finite and not accepted:
        undo()
    result.iterations = products
    return Trial(result, rho, accepted, new_radius, trial_loss, step_norm, rtol, decrease)
