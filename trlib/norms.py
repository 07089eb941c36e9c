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

Beyond the paper's two: Adam's bias-corrected ellipsoid, a Hutchinson estimate of the
Hessian's diagonal (the paper's conclusion, Bekas et al. 2007), the empirical Fisher diagonal,
and :class:`Safeguarded`, which keeps any of them uniformly equivalent (Definition 1).

A norm is a small stateless *rule*; its state (a dict of tensors) is held by whoever
owns the iteration (:class:`trlib.TrustRegion`, :func:`trlib.minimize`), so that it
travels with ``state_dict()``. Most rules see only the gradient, ``update(state, grad)``.
A rule that needs more says so with a class attribute, and the owner passes it:

* ``uses_curvature = True``: ``update(state, grad, hvp=operator)`` with the (counted)
  Hessian-vector product ``v -> H v`` at the current point (:class:`Hutchinson`);
* ``uses_per_sample_gradients = True``: ``update(state, grad, per_sample_grads=G)`` with
  the ``(B, n)`` gradients of the ``B`` per-sample losses whose mean is the loss
  (:class:`EmpiricalFisher`; :func:`trlib.gauss_newton.per_sample_gradients` computes them).

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

import inspect
import math
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from .curvature import NonFiniteCurvatureError

__all__ = ["Norm", "Uniform", "Adagrad", "RMS", "Adam", "Hutchinson", "EmpiricalFisher", "Safeguarded", "Fixed",
           "get_norm", "ellipsoid_norm", "equivalence_constant", "volume_matched_radius"]

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
    uses_curvature = False
    uses_per_sample_gradients = False

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


def _check_beta(beta: float) -> float:
    if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
        raise ValueError(f"Invalid beta: {beta!r} (must lie in [0, 1))")
    return float(beta)


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {what}: {value!r} (must be a positive int)")
    return value


def _debiased(state: State, key: str, beta: float) -> Optional[Tensor]:
    # an average started at zero, divided by 1 - beta^t (None before the first update)
    t = float(state["count"])
    return None if t == 0 else state[key] / (1.0 - beta**t)


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
        self.beta, self.eps = _check_beta(beta), _check_eps(eps)

    def init(self, like: Tensor) -> State:
        return {"square_avg": torch.zeros_like(like)}

    def update(self, state: State, grad: Tensor) -> Tensor:
        state["square_avg"].mul_(self.beta).addcmul_(grad, grad, value=1.0 - self.beta)
        return self.ellipsoid(state)

    def ellipsoid(self, state: State) -> Tensor:
        return state["square_avg"].sqrt().add_(self.eps)


class Adam(RMS):
    r"""Adam's bias-corrected second moment as ellipsoid: :math:`a_t = \sqrt{v_t/(1-\beta^t)} + \epsilon`,
    :math:`v_t = \beta v_{t-1} + (1-\beta) g_t^2`.

    This is exactly the denominator of ``torch.optim.Adam`` (``exp_avg_sq.sqrt() /
    sqrt(bias_correction2) + eps`` with ``beta = betas[1]``), so Adam without momentum
    (``betas=(0, beta)``) takes the Cauchy step of the linear model in this ellipsoid
    (Corollary 1): :math:`-\eta\, g_t / a_t` is the minimiser of :math:`g_t^\top s` over
    :math:`\|s\|_{A_t} \le \eta \|g_t\|_{A_t^{-1}}`. Uniformly equivalent for the same reason
    as :class:`RMS`; the bias correction makes the first ellipsoids the size of the gradient
    rather than :math:`\sqrt{1-\beta}` of it.

    Reference: Kingma & Ba, *Adam* (ICLR 2015), Algorithm 1.
    """

    name = "adam"

    def __init__(self, beta: float = 0.999, eps: float = 1e-8):
        super().__init__(beta, eps)

    def init(self, like: Tensor) -> State:
        return {**super().init(like), "count": torch.zeros((), dtype=torch.float64)}

    def update(self, state: State, grad: Tensor) -> Tensor:
        state["count"] += 1
        return super().update(state, grad)

    def ellipsoid(self, state: State) -> Optional[Tensor]:
        v = _debiased(state, "square_avg", self.beta)
        return None if v is None else v.sqrt_().add_(self.eps)


class Hutchinson(Norm):
    r"""A diagonal-Hessian ellipsoid from Hutchinson probes (Bekas, Kokiopoulou & Saad 2007).

    Each update estimates :math:`\operatorname{diag} H_t` from ``probes`` Rademacher vectors
    :math:`z` (one Hessian-vector product each, :func:`trlib.analysis.hutchinson_diagonal`),
    averages the estimates over time and takes the absolute value:

    .. math:: D_t = \frac1p \sum_{j=1}^{p} z_j \odot H_t z_j, \qquad
              m_t = \beta m_{t-1} + (1-\beta) D_t, \qquad
              a_t = \Big|\frac{m_t}{1-\beta^t}\Big| + \epsilon .

    Why this shape. :math:`A_t \approx |\operatorname{diag} H|` makes the model's curvature
    in the region's variables, :math:`A^{-1/2} H A^{-1/2}`, close to unit on its diagonal
    (Jacobi scaling of the Krylov solver). The Hessian's diagonal may be negative or zero
    (non-convexity, dead units), and an ellipsoid must be positive: the absolute value keeps
    the size of the curvature along each axis whatever its sign (as saddle-free Newton does
    with :math:`|H|`, Dauphin et al. 2014), and the floor :math:`\epsilon`, added every step,
    keeps :math:`A_t \succ 0`. The floor is a curvature, not a gradient scale: 1e-4 by default,
    since the noise of one probe can cancel in :math:`m_t` on any axis and leave it near zero,
    and a floor of 1e-8 then lets the region reach :math:`10^4` times further along that axis
    (on the Fashion-MNIST MLP, trust-region training with 1e-8 blew the weights up in its first
    step). The average comes *before* the absolute value because the
    estimator's noise has mean zero and cancels in :math:`m_t`; an average of :math:`|D_t|`
    would keep it as a bias. With a bounded Hessian the entries stay in
    :math:`[\epsilon, \epsilon + \max_t \|D_t\|_\infty]`: uniformly equivalent, as in Lemma 2.

    Needs Hessian-vector products: ``uses_curvature = True``, and the owner of the
    iteration passes ``update(state, grad, hvp=operator)`` (products are counted there).
    ``every`` > 1 refreshes the estimate only every that many updates (the ellipsoid is
    reused in between, without products). The probes are drawn from ``seed`` and the update
    count, so a resumed run draws the same ones.

    >>> H = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    >>> rule = Hutchinson(beta=0.9)
    >>> state = rule.init(torch.zeros(2))
    >>> [round(a, 6) for a in rule.update(state, torch.ones(2), hvp=lambda v: H @ v).tolist()]   # |diag H| + eps
    [2.0001, 3.0001]

    References: Bekas, Kokiopoulou & Saad, *Applied Numerical Mathematics* 57 (2007);
    Yao et al., *AdaHessian* (AAAI 2021); Dauphin et al. (NeurIPS 2014).
    """

    name = "hutchinson"
    uses_curvature = True

    def __init__(self, beta: float = 0.95, eps: float = 1e-4, probes: int = 1, every: int = 1, seed: int = 0):
        self.beta, self.eps = _check_beta(beta), _check_eps(eps)
        self.probes, self.every = _positive_int(probes, "probes"), _positive_int(every, "every")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r} (must be an int)")
        self.seed = seed

    def init(self, like: Tensor) -> State:
        return {"diag_avg": torch.zeros_like(like), "count": torch.zeros((), dtype=torch.float64),
                "calls": torch.zeros((), dtype=torch.float64)}

    def update(self, state: State, grad: Tensor, hvp=None) -> Optional[Tensor]:
        if hvp is None or not callable(hvp):
            raise ValueError("Invalid hvp: the Hutchinson ellipsoid needs Hessian-vector products; call "
                             "update(state, grad, hvp=operator) (its class sets uses_curvature = True)")
        calls = int(state["calls"])
        if calls % self.every == 0:
            generator = torch.Generator(device=grad.device).manual_seed((self.seed * 1_000_003 + calls) % 2**63)
            z = torch.randint(0, 2, (self.probes, grad.numel()), generator=generator, device=grad.device)
            z = (2 * z - 1).to(grad.dtype)
            batched = getattr(hvp, "batched", None)
            hz = batched(z) if batched is not None and self.probes > 1 else torch.stack([hvp(row) for row in z])
            estimate = (z * hz).mean(0)
            if not bool(torch.all(torch.isfinite(estimate))):  # before the state is touched (one sync)
                raise NonFiniteCurvatureError()
            state["diag_avg"].mul_(self.beta).add_(estimate, alpha=1.0 - self.beta)
            state["count"] += 1
        state["calls"] += 1
        return self.ellipsoid(state)

    def ellipsoid(self, state: State) -> Optional[Tensor]:
        m = _debiased(state, "diag_avg", self.beta)
        return None if m is None else m.abs_().add_(self.eps)


class EmpiricalFisher(Norm):
    r"""The empirical Fisher diagonal as ellipsoid: the mean of squared *per-sample* gradients.

    For a loss :math:`\frac1B \sum_{i=1}^B \ell_i(w)` with per-sample gradients
    :math:`g_{t,i} = \nabla \ell_i(w_t)`,

    .. math:: F_t = \frac1B \sum_{i=1}^B g_{t,i} \odot g_{t,i}, \qquad
              f_t = \beta f_{t-1} + (1-\beta) F_t, \qquad
              a_t = \frac{f_t}{1-\beta^t} + \epsilon .

    :math:`F_t` is the diagonal of :math:`\frac1B \sum_i g_i g_i^\top`, a Gauss-Newton-type
    curvature (:mod:`trlib.gauss_newton`); :math:`\|s\|_{F}^2` approximates twice the
    KL divergence between the model's predictions at :math:`w` and :math:`w + s`, the metric of
    natural-gradient trust regions, so :math:`a_t` has the units of curvature (no square root).
    It is not the square of the batch gradient: :math:`\frac1B\sum_i g_i^2 = \bar g^2 +
    \operatorname{Var}_i[g_i]` keeps the per-sample spread that RMSProp's :math:`\bar g^2` averages away.
    Entries lie in :math:`[\epsilon, \epsilon + \max_{t,i} \|g_{t,i}\|_\infty^2]`: uniformly
    equivalent when per-sample gradients are bounded.

    Needs per-sample gradients: ``uses_per_sample_gradients = True``, and the owner passes
    ``update(state, grad, per_sample_grads=G)`` with ``G`` of shape ``(B, n)``
    (:func:`trlib.gauss_newton.per_sample_gradients`).

    >>> G = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])      # two samples
    >>> rule = EmpiricalFisher(eps=1e-8)
    >>> rule.update(rule.init(torch.zeros(2)), G.mean(0), per_sample_grads=G).tolist()
    [1.0, 2.0]

    References: Amari, *Natural gradient works efficiently in learning* (1998); Kunstner,
    Hennig & Balles, *Limitations of the empirical Fisher approximation* (NeurIPS 2019).
    """

    name = "fisher"
    uses_per_sample_gradients = True

    def __init__(self, beta: float = 0.95, eps: float = 1e-8):
        self.beta, self.eps = _check_beta(beta), _check_eps(eps)

    def init(self, like: Tensor) -> State:
        return {"fisher_avg": torch.zeros_like(like), "count": torch.zeros((), dtype=torch.float64)}

    def update(self, state: State, grad: Tensor, per_sample_grads: Optional[Tensor] = None) -> Tensor:
        if per_sample_grads is None:
            raise ValueError("Invalid per_sample_grads: the empirical Fisher ellipsoid needs the (B, n) per-sample "
                             "gradients; call update(state, grad, per_sample_grads=G) (see "
                             "trlib.gauss_newton.per_sample_gradients)")
        if per_sample_grads.ndim != 2 or per_sample_grads.shape[1] != grad.numel() or per_sample_grads.shape[0] == 0:
            raise ValueError(f"Invalid per_sample_grads: expected shape (B, {grad.numel()}), "
                             f"got {tuple(per_sample_grads.shape)}")
        fisher = per_sample_grads.pow(2).mean(0).to(grad.dtype)
        if not bool(torch.all(torch.isfinite(fisher))):
            raise ValueError("Invalid per_sample_grads: contain NaN or inf")
        state["fisher_avg"].mul_(self.beta).add_(fisher, alpha=1.0 - self.beta)
        state["count"] += 1
        return self.ellipsoid(state)

    def ellipsoid(self, state: State) -> Optional[Tensor]:
        f = _debiased(state, "fisher_avg", self.beta)
        return None if f is None else f.add_(self.eps)


class Safeguarded(Norm):
    r"""Any ellipsoid, kept uniformly equivalent (Definition 1) by clamping its entries.

    With ``mu``, entries are clamped to :math:`[\mu^{-2}, \mu^2]`, so that
    :math:`\mu^{-1}\|w\|_A \le \|w\|_2 \le \mu\|w\|_A` at every step: the equivalence
    constant (:func:`equivalence_constant`) never exceeds :math:`\mu`, whatever the inner
    norm does. Adagrad's ellipsoids, whose entries grow like :math:`\sqrt t`, become a
    uniformly equivalent family, and Theorem 1's rate applies with that :math:`\mu`.

    With ``max_condition`` :math:`\kappa`, entries are raised to at least
    :math:`\max_i a_i / \kappa` (a relative band): the condition number of :math:`A` stays
    below :math:`\kappa` but the scale floats. Scale alone is what the radius rule absorbs
    (:math:`\|s\|_{cA} \le \Delta` is :math:`\|s\|_A \le \Delta/\sqrt c`), so this keeps the
    region's *shape* bounded without fixing units. Both may be given (the relative band is
    applied first; the absolute clamp keeps the condition bound, being monotone and
    1-Lipschitz in log scale).

    Rules that need more than the gradient keep their contract (``uses_curvature``,
    ``uses_per_sample_gradients`` are forwarded), and the state is the inner norm's.

    >>> rule = Safeguarded(Adagrad(), mu=2.0)
    >>> state = rule.init(torch.zeros(3))
    >>> rule.update(state, torch.tensor([10.0, 1.0, 0.0])).tolist()
    [4.0, 1.0, 0.25]

    Reference: Kohler, Adolphs & Lucchi (the paper), Definition 1 and Theorem 1.
    """

    name = "safeguarded"

    def __init__(self, norm: Union[str, Norm], mu: Optional[float] = None, max_condition: Optional[float] = None):
        self.norm = get_norm(norm)
        if mu is None and max_condition is None:
            raise ValueError("Invalid safeguard: give mu (absolute band) and/or max_condition (relative band)")
        for label, value in (("mu", mu), ("max_condition", max_condition)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 1):
                raise ValueError(f"Invalid {label}: {value!r} (must be a finite float >= 1)")
        self.name = f"safeguarded_{self.norm.name}"  # a checkpoint names the inner norm too
        self.mu = None if mu is None else float(mu)
        self.max_condition = None if max_condition is None else float(max_condition)
        self.uses_curvature = getattr(self.norm, "uses_curvature", False)
        self.uses_per_sample_gradients = getattr(self.norm, "uses_per_sample_gradients", False)

    def init(self, like: Tensor) -> State:
        return self.norm.init(like)

    def update(self, state: State, grad: Tensor, **inputs) -> Optional[Tensor]:
        return self._clamp(self.norm.update(state, grad, **inputs))

    def ellipsoid(self, state: State) -> Optional[Tensor]:
        return self._clamp(self.norm.ellipsoid(state))

    def _clamp(self, a: Optional[Tensor]) -> Optional[Tensor]:
        if a is None:  # the sphere is inside every band
            return None
        if self.max_condition is not None:
            a = torch.maximum(a, a.max() / self.max_condition)
        if self.mu is not None:
            a = a.clamp(1.0 / self.mu**2, self.mu**2)
        return a


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


_NAMED = {"uniform": Uniform, "sphere": Uniform, "adagrad": Adagrad, "rms": RMS, "rmsprop": RMS, "adam": Adam,
          "hutchinson": Hutchinson, "fisher": EmpiricalFisher, "empirical_fisher": EmpiricalFisher}


def get_norm(norm: Union[str, Norm, Tensor, None], **kwargs) -> Norm:
    """A :class:`Norm` from a name (``"uniform"``, ``"adagrad"``, ``"rms"``, ``"adam"``,
    ``"hutchinson"``, ``"fisher"``),
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
        accepted = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in kwargs.items() if k in accepted and v is not None})
    raise ValueError(
        f"Invalid norm: {norm!r}; expected one of {sorted(set(_NAMED))}, a trlib.norms.Norm or a positive tensor"
    )


def volume_matched_radius(radius: float, ellipsoid: Optional[Tensor]) -> float:
    r"""The radius of the sphere whose volume equals that of the region :math:`\{s : \|s\|_A \le \Delta\}`.

    With :math:`A = \operatorname{diag}(a)` in :math:`d` dimensions, the region is the image of the
    ball of radius :math:`\Delta` under :math:`u \mapsto \operatorname{diag}(a)^{-1/2} u`, whose
    determinant is :math:`\prod_i a_i^{-1/2}`; equating volumes gives

    .. math:: \bar\Delta = \Delta \Big(\prod_{i=1}^d a_i\Big)^{-1/(2d)}
              = \Delta \exp\Big(-\frac{1}{2d}\sum_{i=1}^d \log a_i\Big),

    the geometric mean of the semi-axes :math:`\Delta/\sqrt{a_i}`. A Euclidean trust region
    started from :math:`\bar\Delta` differs from the ellipsoidal one in shape only, not in size
    (chapters 5 and 7 of the course compare them so). ``ellipsoid=None`` (the sphere) returns
    ``radius``. Computed in float64 from logarithms, so large :math:`d` neither overflows nor
    underflows.

    Raises:
        ValueError: ``radius`` is not finite and positive, or ``ellipsoid`` has an entry that is
            not finite and positive.

    >>> volume_matched_radius(1.0, torch.tensor([4.0, 1.0 / 4.0]))
    1.0
    >>> volume_matched_radius(0.5, torch.tensor([16.0, 16.0, 16.0]))
    0.125
    """
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"Invalid radius: {radius!r}; expected a finite positive number")
    if ellipsoid is None:
        return radius
    a = torch.as_tensor(ellipsoid).detach().reshape(-1).double()
    if a.numel() == 0 or not bool(torch.all(torch.isfinite(a) & (a > 0))):
        raise ValueError("Invalid ellipsoid: must have at least one entry, all finite and positive")
    return radius * math.exp(-0.5 * float(a.log().mean()))
