r"""Trust-region shapes: spheres and adaptive (diagonal) ellipsoids.

A trust region is the set :math:`\{s : \|s\|_{A} \le \Delta\}` with the norm

.. math:: \|s\|_{A} = \sqrt{s^\top A s} = \sqrt{\textstyle\sum_i a_i s_i^2},
          \qquad A = \operatorname{diag}(a),\ a_i > 0 .

Throughout trlib an *ellipsoid* is the positive vector :math:`a` (``None`` stands for the
sphere, :math:`a = 1`). The adaptive norms below are the diagonal preconditioners of
Adagrad and RMSProp (Kohler, Adolphs & Lucchi, Eqs. 2-3), used as in Corollary 1: the
region's matrix is the *square root* of the second-moment estimate,

.. math:: a_t = \sqrt{v_t} + \epsilon, \qquad
          v_t = \begin{cases} v_{t-1} + g_t^2 & \text{(Adagrad)}\\
                              \beta v_{t-1} + (1-\beta) g_t^2 & \text{(RMSProp)}\end{cases}

The floor :math:`\epsilon` is added at *every* step. (The authors' original code added it
once, at initialisation, so a coordinate whose gradient stayed zero ended with
:math:`a_i \approx 10^{-23}`: an ellipsoid unbounded along that axis.)

A norm is a small stateless *rule*; its state (a dict of tensors) is held by whoever
owns the iteration (:class:`trlib.TrustRegion`, :func:`trlib.minimize`), so that it
travels with ``state_dict()``.

Example
-------
>>> import torch, trlib
>>> rule = trlib.norms.RMS(beta=0.8)
>>> state = rule.init(torch.zeros(3))
>>> a = rule.update(state, torch.tensor([1.0, 0.1, 0.0]))
>>> [round(x, 4) for x in a.tolist()]
[0.4472, 0.0447, 0.0]
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "Norm",
    "Uniform",
    "Adagrad",
    "RMS",
    "Adam",
    "Fixed",
    "get_norm",
    "ellipsoid_norm",
    "equivalence_constant",
]

State = Dict[str, Tensor]


def ellipsoid_norm(s: Tensor, ellipsoid: Optional[Tensor] = None) -> Tensor:
    r""":math:`\|s\|_A = \sqrt{\sum_i a_i s_i^2}` (the Euclidean norm when ``ellipsoid`` is None)."""
    if ellipsoid is None:
        return torch.linalg.vector_norm(s)
    return torch.sqrt(torch.sum(ellipsoid * s * s))


def equivalence_constant(ellipsoid: Optional[Tensor]) -> float:
    r"""The smallest :math:`\mu \ge 1` with :math:`\mu^{-1}\|w\|_A \le \|w\|_2 \le \mu \|w\|_A`.

    Definition 1 of the paper. For :math:`A = \operatorname{diag}(a)`,
    :math:`\|w\|_A / \|w\|_2` ranges over :math:`[\sqrt{\min a}, \sqrt{\max a}]`, so

    .. math:: \mu = \max\{1, \sqrt{\max_i a_i}, 1/\sqrt{\min_i a_i}\}.

    A family of norms is *uniformly equivalent* when this stays bounded over all
    iterations (Lemma 2: true for RMSProp ellipsoids, false for Adagrad's).

    >>> equivalence_constant(torch.tensor([4.0, 0.25]))
    2.0
    """
    if ellipsoid is None:
        return 1.0
    lo = float(ellipsoid.min())
    hi = float(ellipsoid.max())
    if lo <= 0:
        return math.inf
    return max(1.0, math.sqrt(hi), 1.0 / math.sqrt(lo))


class Norm:
    """Base class of trust-region shapes. Subclasses define :meth:`init` and :meth:`update`.

    ``update(state, grad)`` folds the new (flat) gradient into ``state`` in place and
    returns the ellipsoid to use for this step (``None`` for the sphere).
    """

    name = "norm"

    def init(self, like: Tensor) -> State:
        return {}

    def update(self, state: State, grad: Tensor) -> Optional[Tensor]:
        raise NotImplementedError

    def ellipsoid(self, state: State) -> Optional[Tensor]:
        """The current ellipsoid without folding in a new gradient (None before any update)."""
        return None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_eps(eps: float) -> float:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"Invalid eps: {eps!r} (the ellipsoid's floor must be a positive float)")
    return float(eps)


class Uniform(Norm):
    r"""The sphere, :math:`A = I` (the spherical TR method; gradient descent in first order)."""

    name = "uniform"

    def update(self, state: State, grad: Tensor) -> Optional[Tensor]:
        return None


class Adagrad(Norm):
    r"""Adagrad's ellipsoid :math:`a_t = \sqrt{\sum_{k\le t} g_k^2} + \epsilon`.

    Not uniformly equivalent: :math:`a_t` grows without bound, so the region shrinks
    along every coordinate that keeps seeing gradient (the vanishing step size).
    """

    name = "adagrad"

    def __init__(self, eps: float = 1e-8):
        self.eps = _check_eps(eps)

    def init(self, like: Tensor) -> State:
        return {"sum_sq": torch.zeros_like(like)}

    def update(self, state: State, grad: Tensor) -> Tensor:
        state["sum_sq"].addcmul_(grad, grad)
        return self.ellipsoid(state)

    def ellipsoid(self, state: State) -> Tensor:
        return state["sum_sq"].sqrt().add_(self.eps)


class RMS(Norm):
    r"""RMSProp's ellipsoid :math:`a_t = \sqrt{v_t} + \epsilon`, :math:`v_t = \beta v_{t-1} + (1-\beta) g_t^2`.

    The paper's choice. With bounded gradients :math:`\|g_t\| \le L`, every
    :math:`a_{t,i} \in [\epsilon, L + \epsilon]`: uniformly equivalent (Lemma 2).
    ``beta=0.8`` is the authors' setting (a short memory suits the few, expensive
    iterations of a second-order method).
    """

    name = "rms"

    def __init__(self, beta: float = 0.8, eps: float = 1e-8):
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta: {beta!r} (must lie in [0, 1))")
        self.beta = float(beta)
        self.eps = _check_eps(eps)

    def init(self, like: Tensor) -> State:
        return {"square_avg": torch.zeros_like(like)}

    def update(self, state: State, grad: Tensor) -> Tensor:
        state["square_avg"].mul_(self.beta).addcmul_(grad, grad, value=1.0 - self.beta)
        return self.ellipsoid(state)

    def ellipsoid(self, state: State) -> Tensor:
        return state["square_avg"].sqrt().add_(self.eps)


class Adam(Norm):
    r"""Adam's bias-corrected second moment as ellipsoid: :math:`a_t = \sqrt{v_t/(1-\beta^t)} + \epsilon`.

    Uniformly equivalent for the same reason as :class:`RMS`; the bias correction makes
    the first ellipsoids the size of the gradient rather than :math:`\sqrt{1-\beta}` of it.
    """

    name = "adam"

    def __init__(self, beta: float = 0.999, eps: float = 1e-8):
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta: {beta!r} (must lie in [0, 1))")
        self.beta = float(beta)
        self.eps = _check_eps(eps)

    def init(self, like: Tensor) -> State:
        return {"square_avg": torch.zeros_like(like), "count": torch.zeros((), dtype=torch.float64)}

    def update(self, state: State, grad: Tensor) -> Tensor:
        state["square_avg"].mul_(self.beta).addcmul_(grad, grad, value=1.0 - self.beta)
        state["count"] += 1
        return self.ellipsoid(state)

    def ellipsoid(self, state: State) -> Optional[Tensor]:
        t = float(state["count"])
        if t == 0:
            return None
        return (state["square_avg"] / (1.0 - self.beta**t)).sqrt_().add_(self.eps)


class Fixed(Norm):
    """A constant, user-given ellipsoid (for example a known scaling of the variables)."""

    name = "fixed"

    def __init__(self, ellipsoid: Tensor):
        ellipsoid = torch.as_tensor(ellipsoid)
        if ellipsoid.ndim != 1 or not bool(torch.all(torch.isfinite(ellipsoid) & (ellipsoid > 0))):
            raise ValueError("Invalid ellipsoid: must be a 1-D tensor of finite, positive entries")
        self.value = ellipsoid

    def update(self, state: State, grad: Tensor) -> Tensor:
        if self.value.shape != grad.shape:
            raise ValueError(
                f"Invalid ellipsoid: has {self.value.numel()} entries but there are {grad.numel()} parameters"
            )
        return self.value.to(device=grad.device, dtype=grad.dtype)

    def ellipsoid(self, state: State) -> Tensor:
        return self.value


_NAMED = {"uniform": Uniform, "sphere": Uniform, "adagrad": Adagrad, "rms": RMS, "rmsprop": RMS, "adam": Adam}


def get_norm(norm: Union[str, Norm, Tensor, None], **kwargs) -> Norm:
    """A :class:`Norm` from a name (``"uniform"``, ``"adagrad"``, ``"rms"``, ``"adam"``),
    a norm object (returned as is), or a positive tensor (a :class:`Fixed` ellipsoid).

    ``kwargs`` (``beta``, ``eps``) go to the named norm's constructor; those it does not
    take are ignored, so callers can pass one set of hyperparameters for every norm.
    """
    if norm is None:
        return Uniform()
    if isinstance(norm, Norm):
        return norm
    if isinstance(norm, Tensor):
        return Fixed(norm)
    if isinstance(norm, str) and norm.lower() in _NAMED:
        cls = _NAMED[norm.lower()]
        import inspect

        accepted = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in kwargs.items() if k in accepted and v is not None})
    raise ValueError(
        f"Invalid norm: {norm!r}; expected one of {sorted(set(_NAMED))}, a trlib.norms.Norm or a positive tensor"
    )
