r"""``TrustRegion``: the stochastic ellipsoidal trust-region method (Algorithm 1) as a ``torch.optim.Optimizer``.

One call of :meth:`TrustRegion.step` is one iteration of Algorithm 1 on the closure's
mini-batch, in three phases:

1. **evaluate**: the loss and gradient :math:`g_t` (kept differentiable) and the curvature
   operator (:mod:`trlib.curvature`), all counted;
2. **region**: the ellipsoid :math:`A_t` from the norm (RMSProp's by default; :mod:`trlib.norms`),
   :math:`g_t := 0` if :math:`\|g_t\| \le` ``gtol`` (step 4: curvature alone moves), and the
   subproblem solver queried there (:mod:`trlib.subproblem`);
3. **iterate**: the step :math:`s_t`, the trial loss :math:`\mathcal L(w_t + s_t)` on the *same*
   mini-batch, the ratio :math:`\rho_t`, acceptance (or the weights restored bit for bit) and
   the new radius: :func:`trlib.region.iterate`, shared with :func:`trlib.minimize`.

Work per iteration: 1 gradient (a forward and a backward, with graph) + ``k`` Hessian-
vector products + 1 forward; ``opt.counts`` adds them up exactly (by wrapping the closure
and the operator). With ``step(closure, hessian_closure=..., hessian_fraction=f)`` the
products run on a sub-batch and weigh ``f`` each (sub-sampled Newton); with
``test_closure=...`` the ratio test runs on an independent batch.

In a torch training stack (the README's recipes): the trial evaluation replays the random
state of the closure's first call (dropout draws the same masks at :math:`w_t` and
:math:`w_t + s_t`) and leaves BatchNorm's running statistics alone; ``p.grad`` holds the
mini-batch gradient after the step; ``lr`` is a multiplier on the region (so learning-rate
schedulers work), per parameter group, with per-group ``weight_decay``; what cannot work
(``GradScaler``, a closure that calls ``backward``, half-precision weights or losses,
double backward through ``torch.compile``) is refused with a message saying what to do.

Example
-------
>>> import torch, trlib
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Linear(3, 1)
>>> x, y = torch.randn(64, 3), torch.randn(64, 1)
>>> opt = trlib.TrustRegion(model.parameters(), norm="rms")
>>> for _ in range(20):
...     loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
>>> opt.counts["gradient"], opt.counts["forward"]
(20, 20)
>>> model.weight.grad is not None  # the gradient of the returned loss, as after backward()
True
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from . import curvature, norms
from .curvature import FlatView, NonFiniteCurvatureError, Operator
from .cubic import CUBIC_METHODS, CubicSolver
from .region import RadiusRule, SigmaRule, iterate
from .subproblem import METHODS, Cauchy, get_solver

__all__ = ["TrustRegion", "ARC", "NonFiniteLossError", "NonFiniteCurvatureError", "DEFAULTS"]

#: Default shrink factor per norm (the authors' MLP settings). The paper's initial radii
#: (0.05 for the sphere, 1e-4 for RMSProp) only suit long runs of one problem's scale;
#: the default ``radius=None`` instead starts at the length of the first Cauchy step.
DEFAULTS: Dict[str, Dict[str, float]] = {
    "uniform": {"decrease": 1.5},
    "adagrad": {"decrease": 1.25},
    "rms": {"decrease": 1.75},
    "adam": {"decrease": 1.75},
}
_FALLBACK = {"decrease": 1.5}
_HVP_MODES = ("double_backward", "forward_over_reverse")
#: The options a parameter group may set for itself; every other one is optimizer-wide.
_PER_GROUP = {"lr": 1.0, "weight_decay": 0.0}


def _takes_no_arguments(fn) -> bool:
    try:
        inspect.signature(fn).bind()
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): let the call tell
        return True
    return True


class NonFiniteLossError(FloatingPointError, ValueError):
    """The closure returned NaN or inf at the current (accepted) parameters."""


def _check_options(h: dict, control: str, rule: Callable[[dict], object], methods) -> None:
    """Validate the hyperparameters of a param group (a clear ValueError naming the first bad one):
    the reach ``control`` (TrustRegion's radius, ARC's sigma), the five the update ``rule`` checks
    on construction, the method and the options both optimizers share."""
    value = h[control]
    if value is not None and (isinstance(value, bool) or not (
            isinstance(value, (int, float)) and math.isfinite(value) and value > 0)):
        raise ValueError(f"Invalid {control}: {value!r} (must be a positive finite number, or None for automatic)")
    rule(h)
    if control == "radius" and value is not None and value > h["max_radius"]:
        raise ValueError(f"Invalid radius: {value!r} exceeds max_radius={h['max_radius']!r}")
    if h["method"] not in methods:
        raise ValueError(f"Invalid method: {h['method']!r}; expected one of {methods}")
    if not (isinstance(h["krylov_tol"], (int, float)) and 0 < h["krylov_tol"] < 1):
        raise ValueError(f"Invalid krylov_tol: {h['krylov_tol']!r} (must lie in (0, 1))")
    for name in ("max_krylov", "check_every"):
        if not (isinstance(h[name], int) and h[name] >= 1):
            raise ValueError(f"Invalid {name}: {h[name]!r} (must be a positive int)")
    if not (isinstance(h["gtol"], (int, float)) and h["gtol"] >= 0):
        raise ValueError(f"Invalid gtol: {h['gtol']!r} (must be >= 0)")
    if h["hvp"] not in _HVP_MODES:
        raise ValueError(f"Invalid hvp: {h['hvp']!r}; expected one of {_HVP_MODES}")
    if not isinstance(h["seed"], int):
        raise ValueError(f"Invalid seed: {h['seed']!r} (must be an int)")
    for name in _PER_GROUP:
        value = h[name]
        if isinstance(value, Tensor) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


def _check_tensors(params, when: str = "") -> None:
    """Parameters one flat step can move: real float32/float64, materialised, one device and dtype."""
    for p in params:
        if p.is_complex() or p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid params: TrustRegion needs float32 or float64 parameters, got {p.dtype}{when} "
                             "(keep the weights in float32 and use torch.autocast in the closure for speed)")
    if any(p.is_meta for p in params):
        raise ValueError(f"Invalid params: a parameter is on the meta device{when}, so it has no values; "
                         "materialise the model first (model.to_empty(device=...), then initialise it; that makes "
                         "new parameters), then create TrustRegion from model.parameters()")
    if not when:  # at construction: the model may still move to one device before the first step
        return
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) > 1:
        kinds = sorted(f"{dtype} on {device}" for dtype, device in kinds)
        raise ValueError(f"Invalid params: the parameters mix {kinds}{when}; one step moves them as one vector, "
                         "so they must share one device and one dtype")


def _per_coordinate(values: List[float], sizes: List[int], like: Tensor) -> Union[float, Tensor]:
    """A group option as one number when every group with parameters agrees, else one entry per coordinate."""
    used = {float(v) for v, n in zip(values, sizes) if n}
    if len(used) <= 1:
        return used.pop() if used else 0.0
    return torch.cat([torch.full((n,), float(v), dtype=like.dtype, device=like.device) for v, n in zip(values, sizes)])


class _ReplayedRandomness:
    """The global CPU and CUDA generators: their states before and after the closure's first
    call; every later call of the same step starts from the first call's state (dropout draws
    the same masks) and ends as the first call did (the generators advance once per step, so a
    resumed run continues bit for bit). Other generators (``torch.Generator`` objects the
    closure owns) are the closure's business."""

    def __init__(self, params):
        cuda = {p.device for p in params if p.device.type == "cuda"}
        self.cuda = sorted(d.index if d.index is not None else torch.cuda.current_device() for d in cuda)

    def _get(self):
        return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in self.cuda]

    def _set(self, states) -> None:
        torch.set_rng_state(states[0])
        for i, s in zip(self.cuda, states[1]):
            torch.cuda.set_rng_state(s, i)

    def first(self, fn):
        self.before = self._get()
        out = fn()
        self.after = self._get()
        return out

    def again(self, fn):
        self._set(self.before)
        try:
            return fn()
        finally:
            self._set(self.after)


@contextlib.contextmanager
def _frozen_running_stats(module: Optional[nn.Module]):
    """BatchNorm layers that run in the block normalise with batch statistics, as at the first
    call, and leave their running statistics and ``num_batches_tracked`` alone: those of
    ``module``, or without it any that runs (found by a global forward pre-hook)."""
    if module is not None:
        with curvature.frozen_batchnorm_stats(module):
            yield
        return
    frozen = []

    def pre_hook(m, args):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            m.track_running_stats = False
            frozen.append(m)

    handle = nn.modules.module.register_module_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
        for m in frozen:
            m.track_running_stats = True


def _check_loss(loss, name: str, differentiable: bool = True) -> None:
    """What a closure returns: a scalar float32/float64 tensor (that depends on the parameters)."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"Invalid {name}: it must return the loss as a scalar tensor")
    if differentiable and not loss.requires_grad:
        raise ValueError(f"Invalid {name}: the loss does not depend on the parameters "
                         "(was it computed under torch.no_grad() or detached?)")
    if loss.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"Invalid {name}: the loss is {loss.dtype}; compute it in float32 (e.g. "
                         "loss_fn(logits.float(), y)): the ratio test compares losses that differ in digits a "
                         "half-precision number does not have (autocast the forward only)")


#: torch's own messages for contracts a closure can break, and what to do instead.
_EXPLAINED = (
    ("does not currently support double backward",
     "the model is compiled with torch.compile, whose autograd cannot differentiate twice: pass "
     "TrustRegion(..., module=model, hvp='forward_over_reverse'), which works with compiled models"),
    ("backward through the graph a second time",
     "the loss's graph was freed before TrustRegion could differentiate it (does the closure call "
     "backward()? It must only return the loss)"),
)


@contextlib.contextmanager
def _explained_errors():
    try:
        yield
    except RuntimeError as exc:
        for pattern, message in _EXPLAINED:
            if pattern in str(exc):
                raise ValueError(f"Invalid closure: {message}") from exc
        raise


class TrustRegion(torch.optim.Optimizer):
    r"""Stochastic trust-region Newton method with adaptive ellipsoidal norms.

    Args:
        params: the parameters, or parameter groups (dicts) that may set their own ``lr`` and
            ``weight_decay``; one step couples all groups (one model, one radius). Real float32
            or float64 tensors on one device, each given once. Parameters with
            ``requires_grad=False`` are left alone (do not switch it after the first step).
        norm: the region's shape: ``"uniform"`` (sphere), ``"adagrad"``, ``"rms"`` (the
            paper's), ``"adam"``, ``"hutchinson"`` (spends products), ``"fisher"`` (needs
            :meth:`step`'s ``per_sample_grads``), or a :class:`trlib.norms.Norm` (recorded by its ``name``).
        radius: initial radius :math:`\Delta_0`. Default (None): the length
            :math:`\|\tilde g\|^3 / \tilde g^\top \tilde H \tilde g` of the first Cauchy step
            in the region's norm (one extra Hessian-vector product, once), which scales with
            the problem as the steps do; the paper's values (0.05 sphere, 1e-4 RMSProp) are
            for long runs. Writing ``param_groups[0]["radius"]`` later sets the live radius.
        max_radius: cap on the radius (lowering it caps the live radius at the next step).
        eta1: accept the step when :math:`\rho \ge \eta_1`.
        eta2: grow the radius when :math:`\rho \ge \eta_2`.
        increase: growth factor (:math:`\gamma` of Algorithm 1).
        decrease: shrink factor after a rejection (default depends on the norm).
        method: subproblem solver, ``"cg"`` (Steihaug-Toint, default), ``"gltr"``,
            ``"cauchy"`` or ``"exact"`` (tiny models only).
        krylov_tol: relative residual at which the Krylov solver stops; the effective
            tolerance is :math:`\min(\text{krylov\_tol}, \sqrt{\|g\|})`.
        max_krylov: most Hessian-vector products per step.
        beta, eps: the norm's decay rate and floor (see :mod:`trlib.norms`); ``eps=None`` keeps
            the norm's own floor (1e-8 for the gradient-based ellipsoids, 1e-4 for Hutchinson's).
        gtol: gradients of norm at most ``gtol`` are set to zero (Algorithm 1, step 4).
        hvp: ``"double_backward"`` (works with any closure) or ``"forward_over_reverse"``
            (needs ``module``; no gradient graph is kept between products; the mode that
            works with ``torch.compile``).
        module: the ``nn.Module`` the parameters belong to, needed for forward-over-reverse
            products. (Not a hyperparameter: not in the state dict.)
        check_every: CG looks at its stopping test once every this many products (on a GPU
            each look is a host-device synchronisation).
        seed: seed of the generator for GLTR's random vectors (restarts, certificate).
        distributed: data-parallel mode over ``torch.distributed`` (NCCL on GPUs, gloo on
            CPUs): each process evaluates the closure on its shard of the batch, and the
            loss, the gradient, every Hessian-vector product and the trial loss are averaged
            with one all-reduce each, so every process computes the same step. The result
            equals a single process on the union of the shards (equal shard sizes).
        process_group: the group to reduce over (default: the world).
        lr: a multiplier on the region, per parameter group (default 1): the step satisfies
            :math:`\|D^{-1} s\|_{A} \le \Delta` with :math:`D` the groups' ``lr`` on their
            coordinates. With one value for all groups that is :math:`\|s\|_A \le
            \text{lr}\cdot\Delta`: the live radius and its cap scale with it, which is what a
            learning-rate scheduler (``StepLR``, ``ReduceLROnPlateau``, warm-up, cosine)
            schedules. ``lr=0`` freezes a group (a step with every ``lr`` at 0 moves nothing).
        weight_decay: per parameter group, the L2 term
            :math:`\tfrac{\lambda}{2}\|w_{\text{group}}\|^2` added to the objective the
            region models (its gradient, curvature, and the losses in :math:`\rho`); the
            returned loss and ``p.grad`` stay the closure's (torch's convention).

    Every hyperparameter above except ``module``, ``distributed`` and ``process_group``
    lives in ``defaults`` and in the param groups, so ``state_dict()`` records it and
    ``load_state_dict()`` checks it (a checkpoint of another norm is refused). Only ``lr``
    and ``weight_decay`` may differ between groups; the others are optimizer-wide, read from
    the first group. The optimizer's state (live radius, step count, counts, the norm's
    state, the generator) is kept under the first parameter, as L-BFGS does.

    Attributes: ``radius`` (for the next step), ``counts`` (``"gradient"``, ``"hvp"``,
    ``"forward"``: cumulative evaluations; ``"hvp"`` in units of full-batch products; a
    backprop is a gradient or a product), ``backprops``, ``last`` (the last step's radius,
    rho, acceptance, losses (of the objective, weight decay included), model decrease, ...),
    ``ellipsoid``.
    """

    # GradScaler calls step() of such an optimizer directly, so that step() can refuse it clearly.
    _step_supports_amp_scaling = True

    def __init__(self, params, *, norm="rms", radius: Optional[float] = None, max_radius: float = 10.0,
                 eta1: float = 0.01, eta2: float = 0.95, increase: float = 1.1, decrease: Optional[float] = None,
                 method: str = "cg", krylov_tol: float = 0.1, max_krylov: int = 50, beta: float = 0.8,
                 eps: Optional[float] = None, gtol: float = 0.0, hvp: str = "double_backward",
                 module: Optional[nn.Module] = None, check_every: int = 1, seed: int = 0,
                 distributed: bool = False, process_group=None, lr: float = 1.0, weight_decay: float = 0.0):
        self._setup(params, norm, module, distributed, process_group, dict(
            radius=None if radius is None else float(radius), max_radius=max_radius, eta1=eta1, eta2=eta2,
            increase=increase, decrease=decrease, method=method, krylov_tol=krylov_tol, max_krylov=max_krylov,
            beta=beta, eps=eps, gtol=gtol, hvp=hvp, check_every=check_every, seed=seed, lr=lr,
            weight_decay=weight_decay))

    #: The hyperparameter (and state entry) that sets the model's reach: the radius here, ARC's sigma.
    _control = "radius"
    _methods = METHODS

    def _setup(self, params, norm, module, distributed, process_group, options: dict) -> None:
        """The defaults (the norm's name and its beta and eps, the norm's default ``decrease``), checks
        and attributes every optimizer of this engine shares."""
        shape = norms.get_norm(norm, beta=options["beta"], eps=options["eps"])
        defaults = dict(norm=shape.name, **options)
        defaults.update(beta=getattr(shape, "beta", options["beta"]), eps=getattr(shape, "eps", options["eps"]))
        if defaults["decrease"] is None:
            defaults["decrease"] = DEFAULTS.get(shape.name, _FALLBACK)["decrease"]
        self._check_group(defaults)
        if defaults["hvp"] == "forward_over_reverse" and module is None:
            raise ValueError("Invalid module: hvp='forward_over_reverse' needs the nn.Module (module=model)")
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("Invalid distributed: torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first, e.g. under torchrun)")
        self.norm, self._named_norm = shape, isinstance(norm, str) or norm is None
        torch.optim.Optimizer.__init__(self, params, defaults)
        self.module = module
        self.distributed = bool(distributed)
        self.process_group = process_group

    def _check_group(self, h: dict) -> None:
        _check_options(h, self._control, self._rule, self._methods)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of parameters (e.g. layers unfrozen while fine-tuning); they train from the next step.

        The group may set its own ``lr`` and ``weight_decay``; any other option it names must equal
        the optimizer's (one trust region couples all groups). After the first step, the norm's
        state for the new coordinates starts as a fresh optimizer's would.
        """
        if isinstance(param_group, dict) and "params" in param_group and not isinstance(param_group["params"], set):
            given = param_group["params"]
            given = [given] if isinstance(given, Tensor) else list(given)
            if not given:
                raise ValueError("Invalid param group: it has no parameters")
            tensors = [p[1] if isinstance(p, tuple) else p for p in given]
            if len({id(p) for p in tensors}) != len(tensors):
                raise ValueError("Invalid params: a parameter appears more than once (its step would be applied twice)")
            _check_tensors([p for p in tensors if isinstance(p, Tensor)])
            param_group["params"] = given
            reference = self.param_groups[0] if self.param_groups else self.defaults
            for key, value in param_group.items():
                if key in self.defaults and key not in _PER_GROUP and value != reference[key]:
                    raise ValueError(f"Invalid param group: {key}={value!r} differs from the optimizer's "
                                     f"{key}={reference[key]!r}; only {sorted(_PER_GROUP)} may differ between groups "
                                     "(one trust region couples them)")
            for key in self.defaults:
                if key not in _PER_GROUP:
                    param_group.setdefault(key, reference[key])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            self._extend_state(group)
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ state
    def _params(self):
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _state(self, create: bool = False) -> dict:
        """The optimizer-wide state, kept under the first parameter ({} before the first step)."""
        anchor = self.param_groups[0]["params"][0]
        st = self.state[anchor] if create else self.state.get(anchor, {})
        if create and not st:
            params = self._params()
            if not params:
                raise ValueError("TrustRegion got no parameters that require grad")
            group = self.param_groups[0]
            like = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            c = self._control
            st.update({c: group[c], "initial_" + c: group[c]}, steps=0, size=like.numel(),
                      counts={"gradient": 0, "hvp": 0, "forward": 0}, last={}, norm_state=self.norm.init(like),
                      generator=torch.Generator().manual_seed(group["seed"]).get_state())
        return st

    def _extend_state(self, group: dict) -> None:
        """After the first step, a new group's coordinates join the norm's state (appended: they
        come last in the flat vector), initialised as a fresh state's."""
        if not self.param_groups or not self.param_groups[0]["params"] or not self._state():
            return
        st = self._state()
        new = sum(p.numel() for p in group["params"] if p.requires_grad)
        if not new:
            return
        old = st["size"]
        saved = st["norm_state"]
        device = next((v.device for v in saved.values() if v.numel() == old), self._params()[0].device)
        template = self.norm.init(torch.zeros(old + new, dtype=self._params()[0].dtype, device=device))
        grown = {}
        for key, fresh in template.items():
            if fresh.shape == saved[key].shape:  # an optimizer-wide entry (a count)
                grown[key] = saved[key]
            elif fresh.ndim == 1 and saved[key].shape == (old,):
                grown[key] = torch.cat([saved[key], fresh[old:].to(saved[key])])
            else:
                raise ValueError(f"Invalid param group: the {self.norm.name!r} norm's state entry {key!r} is not per "
                                 "coordinate, so new parameters cannot join after the first step; add the group "
                                 "before the first step or create a new TrustRegion")
        st.update(norm_state=grown, size=old + new)

    def _live(self) -> Optional[float]:
        """The radius (ARC: sigma) the next step will use (None before an automatic first one is set)."""
        group = self.param_groups[0]
        value = self._state().get(self._control, group[self._control])
        return value if value is None else self._bounded(value, group)

    @staticmethod
    def _bounded(radius: float, group: dict) -> float:
        return min(radius, group["max_radius"])

    @property
    def radius(self) -> Optional[float]:
        """The radius the next step will use (None before an automatic first radius is set)."""
        return self._live()

    @property
    def counts(self) -> Dict[str, float]:
        """Cumulative ``gradient``, ``hvp`` and ``forward`` (loss-only) evaluations."""
        return dict(self._state().get("counts", {"gradient": 0, "hvp": 0, "forward": 0}))

    @property
    def backprops(self) -> float:
        """Gradients plus Hessian-vector products, the paper's unit of work."""
        c = self.counts
        return c["gradient"] + c["hvp"]

    @property
    def last(self) -> dict:
        """The last step's ``radius``, ``rho``, ``accepted``, ``loss``, ``trial_loss``, ``model_decrease``,
        ``iterations``, ``on_boundary``, ``negative_curvature``, ``grad_norm``, ``hessian_fraction`` (1
        without a sub-batch) and ``status``; with a ``test_closure``, ``test_loss`` (the independent
        batch's loss at :math:`w_t`); when a sub-batch gave it, the gradient-noise estimate ``noise``,
        ``noise_var`` and ``grad_sq`` (see :meth:`step`)."""
        return dict(self._state().get("last", {}))

    @property
    def ellipsoid(self) -> Optional[Tensor]:
        """The ellipsoid of the last step (None for the sphere or before the first step)."""
        st = self._state()
        return self.norm.ellipsoid(st["norm_state"]) if st else None

    def load_state_dict(self, state_dict) -> None:
        """Load a checkpoint of this optimizer, after checking that it is one (a clear ValueError if not)."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("Invalid state_dict: expected the dict of TrustRegion.state_dict() "
                             "(keys 'state' and 'param_groups')")
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups) or not all(
                isinstance(g, dict) for g in groups):
            raise ValueError(f"Invalid state_dict: expected {len(self.param_groups)} param group(s) like this "
                             "optimizer's (a checkpoint of another model or optimizer?)")
        # checkpoints from before per-group options: their values were these defaults
        groups = [{**_PER_GROUP, **g} for g in groups]
        state_dict = {**state_dict, "param_groups": groups}
        for g in groups:
            missing = [k for k in self.defaults if k not in g]
            if missing:
                raise ValueError(f"Invalid state_dict: the param group lacks {missing} (not a TrustRegion checkpoint?)")
            if g["norm"] != self.norm.name:
                raise ValueError(f"Invalid state_dict: saved with norm {g['norm']!r}, but this optimizer's "
                                 f"norm is {self.norm.name!r}")
            self._check_group(g)
        if groups[0]["hvp"] == "forward_over_reverse" and self.module is None:
            raise ValueError("Invalid state_dict: hvp='forward_over_reverse' needs the nn.Module (module=model)")
        super().load_state_dict(state_dict)
        group = self.param_groups[0]
        if self._named_norm:  # the checkpoint's beta and eps now rule
            self.norm = norms.get_norm(group["norm"], beta=group["beta"], eps=group["eps"])
        st = self._state()
        if st:
            self._check_state(st)

    def _check_state(self, st: dict) -> None:
        c = self._control
        keys = {c, "initial_" + c, "steps", "size", "counts", "last", "norm_state", "generator"}
        if not keys <= set(st):
            raise ValueError(f"Invalid state_dict: the optimizer state lacks {sorted(keys - set(st))}")
        r = st[c]
        if r is not None and not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise ValueError(f"Invalid state_dict: {c} {r!r} (must be positive and finite)")
        if not isinstance(st["counts"], dict) or set(st["counts"]) != {"gradient", "hvp", "forward"}:
            raise ValueError(f"Invalid state_dict: counts {st['counts']!r}")
        size = sum(p.numel() for p in self._params())
        if st["size"] != size:
            raise ValueError(f"Invalid state_dict: saved for {st['size']} parameters, this optimizer has "
                             f"{size} (a checkpoint of another model?)")
        self._adopt_norm_state(st, check=True)
        st["generator"] = st["generator"].to("cpu", torch.uint8)

    def _adopt_norm_state(self, st: dict, check: bool = False) -> None:
        """Bring the norm's state to the parameters' device and dtype (torch's loading, or a model
        moved after the first step, may have left it elsewhere), checking it fits the norm."""
        like = self._params()[0]
        template = self.norm.init(torch.zeros(st["size"], dtype=like.dtype, device=like.device))
        saved = st["norm_state"]
        if not isinstance(saved, dict) or set(saved) != set(template) or any(
                not isinstance(saved[k], Tensor) or saved[k].shape != v.shape for k, v in template.items()):
            raise ValueError(f"Invalid state_dict: the norm state does not fit this {self.norm.name!r} norm on "
                             f"{st['size']} parameters (a checkpoint of another model?)")
        if check and not all(bool(torch.all(torch.isfinite(v))) for v in saved.values()):
            raise ValueError("Invalid state_dict: the norm state contains NaN or inf")
        st["norm_state"] = {k: saved[k].to(dtype=v.dtype, device=v.device) for k, v in template.items()}

    def _mean(self, tensor: Tensor) -> Tensor:
        """The average over processes (identity when not distributed): one all-reduce."""
        if not self.distributed:
            return tensor
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, group=self.process_group)
        return tensor.div_(torch.distributed.get_world_size(self.process_group))

    # ------------------------------------------------------------------ the three phases
    def _evaluate(self, closure, group, params, counts, steps, replay, hessian_closure, fraction,
                  curvature_fn=None):
        """Loss, gradient (averaged over processes), the counted curvature operator (of the
        ``hessian_closure``'s batch when there is one, or ``curvature_fn``'s, each product weighing
        ``fraction``) and that batch's gradient (None without one, or when the products need no
        gradient graph)."""
        double_backward = group["hvp"] == "double_backward" and curvature_fn is None
        backward_called = []
        hooks = [p.register_post_accumulate_grad_hook(lambda _: backward_called.append(True)) for p in params]
        try:
            with torch.enable_grad():
                loss = replay.first(closure)
        finally:
            for h in hooks:
                h.remove()
        if backward_called:
            raise ValueError("Invalid closure: it called backward() (LBFGS-style, or Lightning's automatic "
                             "optimisation); TrustRegion differentiates the loss itself, twice: the closure must only "
                             "compute and return the loss (with Lightning, use manual optimisation)")
        _check_loss(loss, "closure")
        loss_value = float(self._mean(loss.detach()))
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"the loss is {loss_value} at the current parameters (step {steps}); the weights were not "
                "changed. Check the mini-batch and the model's outputs for NaN/inf (a warm-up phase with too large "
                "a learning rate is a common cause).")
        with torch.enable_grad():
            grad_graph = curvature.flat_grad(loss, params, create_graph=double_backward and hessian_closure is None)
        counts["gradient"] += 1
        grad = self._mean(grad_graph.detach())
        # a finite sum implies finite entries; only a non-finite one (NaN/inf, or an overflow) pays for the entrywise test
        if not math.isfinite(float(grad.sum())) and not bool(torch.isfinite(grad).all()):
            raise NonFiniteLossError(f"the gradient contains NaN/inf at the current parameters (step {steps})")
        curvature_closure, sub_grad = closure, None
        if hessian_closure is not None:
            curvature_closure = hessian_closure
            if double_backward:  # the sub-batch's own gradient pass, with its graph, weighs its fraction
                with torch.enable_grad(), _frozen_running_stats(self.module):
                    sub_loss = replay.again(hessian_closure)
                    _check_loss(sub_loss, "hessian_closure")
                    grad_graph = curvature.flat_grad(sub_loss, params, create_graph=True)
                counts["gradient"] += fraction
                sub_grad = self._mean(grad_graph.detach())
        if curvature_fn is not None:  # the caller's curvature (GGN, ...): its setup is a forward pass on its batch
            with torch.enable_grad(), _frozen_running_stats(self.module):
                op = replay.again(curvature_fn)
            counts["forward"] += fraction
            if not (callable(op) or isinstance(op, Tensor)):
                raise ValueError(f"Invalid curvature: it must return an operator v -> G v (a callable, a "
                                 f"trlib.curvature.Operator or a square tensor), got {type(op).__name__}")
            op = curvature.as_operator(op, grad)
        elif double_backward:
            op = curvature.hvp_double_backward(grad_graph, params)
        else:
            raw = curvature.hvp_forward_over_reverse(curvature.functional_loss(curvature_closure, self.module, params),
                                                     params)

            def frozen(v):  # each product re-runs the closure: the first call's batch statistics and randomness
                with _frozen_running_stats(self.module):
                    return replay.again(lambda: raw(v))

            op = curvature.Operator(frozen, raw.size, dtype=raw.dtype, device=raw.device)
        if self.distributed:
            local = op
            op = curvature.Operator(lambda v: self._mean(local(v)), op.size, dtype=op.dtype, device=op.device)
        return loss, loss_value, grad, curvature.as_operator(op, grad).counted(counts, "hvp", fraction), sub_grad

    def _update_norm(self, norm_state, grad, op, per_sample):
        """The norm's update with what it needs: the gradient, and the products or per-sample gradients."""
        if getattr(self.norm, "uses_curvature", False):
            return self.norm.update(norm_state, grad, hvp=op)
        if getattr(self.norm, "uses_per_sample_gradients", False):
            return self.norm.update(norm_state, grad, per_sample_grads=per_sample)
        return self.norm.update(norm_state, grad)

    def _region(self, group, st, grad, op, active, lr, per_sample=None):
        """The ellipsoid (on a copy of the norm's state), the model's gradient and operator on the
        coordinates that move (``active``; None: all), scaled by ``lr``, and the radius; the state
        itself changes only once the step is done."""
        norm_state = {k: v.clone() for k, v in st["norm_state"].items()}
        ellipsoid = self._update_norm(norm_state, grad, op, per_sample)
        if active is not None:  # frozen groups (lr = 0): the model lives on the other coordinates
            full, size = op, op.size

            def restricted(v):
                return full(v.new_zeros(size).index_copy_(0, active, v)).index_select(0, active)

            grad, lr = grad.index_select(0, active), lr.index_select(0, active)
            ellipsoid = None if ellipsoid is None else ellipsoid.index_select(0, active)
            op = curvature.Operator(restricted, active.numel(), dtype=op.dtype, device=op.device, checked=False)
        if not (isinstance(lr, float) and lr == 1.0):  # ||D^-1 s||_A <= radius: the ellipsoid A / lr^2
            ellipsoid = (torch.ones_like(grad) if ellipsoid is None else ellipsoid) / (lr * lr)
        grad_norm = float(torch.linalg.vector_norm(grad))
        model_grad = torch.zeros_like(grad) if grad_norm <= group["gtol"] else grad
        radius, cauchy = self._reach(group, st, model_grad, op, ellipsoid)
        return norm_state, ellipsoid, model_grad, op, radius, cauchy, grad_norm

    def _reach(self, group, st, model_grad, op, ellipsoid):
        """The radius (ARC: sigma) of this step, and the Cauchy solver when the automatic first one
        queried it; writing the group's value sets the live one."""
        c, cauchy = self._control, None
        value = group[c] if group[c] != st["initial_" + c] else st[c]
        if value is None:
            # The Cauchy step's length in the region's variables u = A^{1/2} s: invariant to rescaling
            # the loss for the sphere, and scaling like ||s||_A for adaptive norms.
            cauchy = Cauchy().query(model_grad, op, ellipsoid)
            length = cauchy.gnorm**3 / cauchy.curvature if cauchy.curvature > 0 else cauchy.gnorm
            value = self._first(cauchy.gnorm, max(length, 1e-12)) if cauchy.gnorm > 0 else 1.0
        return float(self._bounded(value, group)), cauchy

    @staticmethod
    def _first(gnorm: float, length: float) -> float:
        """The automatic first radius: the Cauchy step's length."""
        return length

    def _solver(self, group, rtol, generator, cauchy, grad, op, ellipsoid):
        """The subproblem solver, queried at this point."""
        return cauchy if cauchy is not None and group["method"] == "cauchy" else get_solver(
            group["method"], rtol=rtol, max_iter=group["max_krylov"] if group["method"] != "exact" else None,
            check_every=group["check_every"], generator=generator).query(grad, op, ellipsoid)

    def _rule(self, group):
        return RadiusRule(group["eta1"], group["eta2"], group["increase"], group["decrease"], group["max_radius"])

    def _forward(self, fn, replay, name: str) -> float:
        """A closure's loss at the current point: forward only, from the first call's randomness,
        BatchNorm's running statistics left alone, averaged over processes."""
        with torch.no_grad(), _frozen_running_stats(self.module):
            value = replay.again(fn)
        _check_loss(value, name, differentiable=False)
        return float(self._mean(value.detach()))

    @staticmethod
    def _noise(sub_grad, grad, model_grad, ellipsoid, active, fraction) -> Dict[str, float]:
        """The gradient-noise estimate of ``step``'s docstring, from the sub-batch gradient (none without one)."""
        if sub_grad is None or not fraction < 1:
            return {}
        diff = sub_grad - grad
        if active is not None:
            diff = diff.index_select(0, active)
        def dual(v):  # ||v||^2 in the metric A^{-1}, the gradient's
            return torch.dot(v, v) if ellipsoid is None else torch.dot(v / ellipsoid, v)

        noise_sum, grad_sq = torch.stack([dual(diff), dual(model_grad)]).tolist()  # one read
        noise_var = noise_sum / (1.0 / fraction - 1.0)
        return dict(noise=noise_var / grad_sq if grad_sq > 0 else math.inf, noise_var=noise_var, grad_sq=grad_sq)

    def _refuse_grad_scaler(self) -> None:
        if "found_inf" in self.__dict__ or "grad_scale" in self.__dict__:
            self.__dict__.pop("found_inf", None)
            self.__dict__.pop("grad_scale", None)
            raise ValueError("TrustRegion does not work with torch.amp.GradScaler: loss scaling protects float16 "
                             "gradients of a backward() you call, but TrustRegion differentiates a float32 loss "
                             "itself. Call opt.step(closure) directly, with torch.autocast around the model's "
                             "forward inside the closure and the loss computed in float32")

    def step(self, closure: Optional[Callable[[], Tensor]] = None, *,  # type: ignore[override]
             hessian_closure: Optional[Callable[[], Tensor]] = None, hessian_fraction: Optional[float] = None,
             test_closure: Optional[Callable[[], Tensor]] = None, curvature: Optional[Callable[[], object]] = None,
             per_sample_grads: Optional[Callable[[], Tensor]] = None) -> Tensor:
        r"""One iteration of Algorithm 1 on the closure's mini-batch.

        Args:
            closure: required. A function of no arguments that computes the loss on the
                current mini-batch and returns it as a scalar float32 or float64 tensor that
                depends on the parameters. It must **not** call ``backward()`` (nor need
                ``zero_grad()``): the optimizer differentiates the loss itself, keeping the
                graph for Hessian-vector products. It is called once with gradients enabled
                at :math:`w_t`, then once under ``torch.no_grad()`` at the trial point
                :math:`w_t + s_t` (and, with ``hvp="forward_over_reverse"``, once per
                product through ``torch.func``). Every call must evaluate the *same*
                mini-batch: build the closure from a batch fetched outside it. Later calls
                start from the global CPU and CUDA random state of the first call, so
                dropout and other random layers draw the same masks, and leave it as the
                first call did (the random stream advances once per step, as with one
                ``backward``); BatchNorm layers in train mode use batch statistics at every
                call and update their running statistics once per step. Code with other
                side effects (counters, logging) runs once per call.
            hessian_closure: the loss on a *sub-sample* :math:`S` of the closure's batch
                :math:`B` (same contract as ``closure``): the model's curvature, every
                Hessian-vector product, comes from it, while the gradient and the ratio test stay
                on :math:`B`. A step then costs :math:`1 + f + f k` backprops instead of
                :math:`1 + k` (``k`` products, :math:`f = |S|/|B|`). Sub-sampled Newton theory
                bounds the price: with per-sample Hessians bounded by :math:`K` in norm, a
                uniformly drawn :math:`S` of size of order :math:`K^2 \epsilon^{-2}
                \log(d/\delta)` gives :math:`\|H_S - H\| \le \epsilon` with probability
                :math:`1 - \delta` (matrix Bernstein), which is what the trust-region and cubic
                analyses need of the model's Hessian (Assumption 1's :math:`\delta_H`; Roosta-
                Khorasani & Mahoney 2019, *Math. Program.* 174; Xu, Roosta-Khorasani & Mahoney 2020,
                *Math. Program.* 184; Kohler & Lucchi 2017, ICML), while the gradient needs the
                larger batch (:math:`\delta_g` scales with :math:`\epsilon_g`, not
                :math:`\sqrt{\epsilon_H}`). Called once with gradients enabled (double
                backward) or once per product (forward-over-reverse), from the closure's random
                state, leaving BatchNorm's running statistics alone.
            hessian_fraction: required with ``hessian_closure``: :math:`f = |S|/|B|`, the size of
                its batch relative to the closure's, stated by the caller (never inferred from the
                losses). Each product and the sub-batch's gradient pass add :math:`f` to
                ``counts``, which stay in units of passes over the closure's batch. When
                :math:`f < 1` and :math:`S` is a random part of :math:`B`, the step also
                estimates the gradient noise for free: :math:`\mathbb E\|g_S - g_B\|^2 =
                (1/f - 1)\,\mathbb E\|g_B - \nabla\mathcal L\|^2`, in the region's metric
                :math:`A^{-1}` (``last["noise_var"]``; ``last["grad_sq"]`` is
                :math:`\|g_B\|^2_{A^{-1}}`, ``last["noise"]`` their ratio, the norm test of
                Byrd, Chin, Nocedal & Wu 2012: near 1 the batch gradient is mostly noise).
                One sample of each: average them over steps before use. Not estimated with
                ``hvp="forward_over_reverse"`` (no sub-batch gradient is formed).
            test_closure: the loss on an *independent* batch :math:`B'` (no gradient needed). The
                ratio test then measures the decrease there, :math:`\rho = (\mathcal L_{B'}(w_t) -
                \mathcal L_{B'}(w_t + s_t)) / (m_t(0) - m_t(s_t))` (two forward passes, counted in
                ``counts["forward"]``), which is not biased upwards by fitting the step to
                :math:`B`'s noise (the function estimates of stochastic trust regions:
                Blanchet, Cartis, Menickelly & Scheinberg 2019). Expect
                :math:`\rho \approx 1 - \text{noise}` for short steps: near a point where the
                gradient is mostly noise the radius shrinks, so it needs batches large enough
                for the noise (benchmarks/STOCHASTIC_TR.md measures when it pays).
            curvature: a function of no arguments returning an operator :math:`v \mapsto G v` (a
                callable, a :class:`trlib.curvature.Operator` or a square tensor) used in the model
                in place of the closure's Hessian, e.g. the generalised Gauss-Newton matrix
                ``lambda: trlib.gauss_newton.ggn_operator(model, x, y, "cross_entropy")`` of the
                batch (or of a sub-batch, with ``hessian_fraction`` its relative size). Called once,
                from the closure's random state with BatchNorm's running statistics frozen; its setup
                counts as one forward pass and each product as one ``"hvp"``, both weighing
                ``hessian_fraction`` (default 1). The gradient then needs no graph for second
                derivatives. Not with ``hessian_closure``. A positive semidefinite :math:`G` (GGN,
                Fisher) never shows negative curvature: the step is then a damped Gauss-Newton step.
            per_sample_grads: a function of no arguments returning the ``(B, n)`` per-sample
                gradients of the closure's batch (:func:`trlib.gauss_newton.per_sample_gradients`;
                ``n`` the parameters that require grad, in order): required by, and only by, norms
                that use them (``norm="fisher"``). Counted as one gradient (a vectorised backward
                over the batch). Not in data-parallel mode.

        Returns:
            The closure's loss at :math:`w_t`, before the step (detached; in data-parallel
            mode, this process's; ``last["loss"]`` holds the average, weight decay included).
            Each parameter's ``.grad`` then holds the gradient of that loss at :math:`w_t`
            (overwritten, not accumulated; averaged over processes in data-parallel mode):
            what ``clip_grad_norm_`` and gradient logging read. The next step does not use it.

        Raises:
            NonFiniteLossError: the loss or gradient is NaN/inf at the current point; the
                weights and the optimizer's state are left as they were (the work spent is
                counted).
            NonFiniteCurvatureError: a Hessian-vector product is NaN/inf; the weights and
                the optimizer's state are left as they were (the work spent is counted).
            ValueError: a closure that breaks the contract (none, ``backward()`` inside, a
                detached or half-precision loss); a ``hessian_closure`` without its
                ``hessian_fraction``; both ``hessian_closure`` and ``curvature``; a per-sample norm
                without ``per_sample_grads``, or these without such a norm; parameters one step cannot move (meta device, mixed devices
                or dtypes, ``requires_grad`` changed); a call through ``GradScaler``.
        """
        self._refuse_grad_scaler()
        if closure is None or not callable(closure):
            raise ValueError("TrustRegion.step needs a closure that returns the mini-batch loss (no backward inside)")
        for name, extra in (("hessian_closure", hessian_closure), ("test_closure", test_closure),
                            ("curvature", curvature), ("per_sample_grads", per_sample_grads)):
            if extra is not None and not callable(extra):
                raise ValueError(f"Invalid {name}: expected a function of no arguments, got {type(extra).__name__}")
        if curvature is not None and not _takes_no_arguments(curvature):
            raise ValueError("Invalid curvature: expected a function of no arguments that returns the operator "
                             "(e.g. lambda: trlib.gauss_newton.ggn_operator(model, x, y)), not the operator itself "
                             "(it is built once per step, at the current weights)")
        if curvature is not None and hessian_closure is not None:
            raise ValueError("Invalid curvature: give either a hessian_closure (the Hessian of a sub-batch's loss) or a "
                             "curvature operator, not both")
        wants_samples = getattr(self.norm, "uses_per_sample_gradients", False)
        if wants_samples != (per_sample_grads is not None):
            raise ValueError(f"Invalid per_sample_grads: the {self.norm.name!r} norm needs per-sample gradients: pass "
                             "step(closure, per_sample_grads=lambda: trlib.gauss_newton.per_sample_gradients(model, x, "
                             "y))" if wants_samples else f"Invalid per_sample_grads: the {self.norm.name!r} norm does "
                             "not use them")
        if per_sample_grads is not None and self.distributed:
            raise ValueError("Invalid per_sample_grads: not supported in data-parallel mode")
        fraction: Union[int, float] = 1  # an int without a sub-batch: whole-batch counts stay ints
        if hessian_closure is not None or (curvature is not None and hessian_fraction is not None):
            if hessian_fraction is None:
                raise ValueError("Invalid hessian_fraction: a hessian_closure needs hessian_fraction = the size of its "
                                 "batch / the size of the closure's (it weighs each product in counts)")
            if isinstance(hessian_fraction, bool) or not (isinstance(hessian_fraction, (int, float))
                                                          and math.isfinite(hessian_fraction) and hessian_fraction > 0):
                raise ValueError(f"Invalid hessian_fraction: {hessian_fraction!r} (must be a positive finite number)")
            fraction = float(hessian_fraction)
        elif hessian_fraction is not None:
            raise ValueError("Invalid hessian_fraction: it describes a hessian_closure, and none was given")
        group = self.param_groups[0]
        by_group = [[p for p in g["params"] if p.requires_grad] for g in self.param_groups]
        params = [p for ps in by_group for p in ps]
        _check_tensors(params, " at this step")
        st = self._state(create=True)
        size = sum(p.numel() for p in params)
        if size != st["size"]:
            raise ValueError(f"Invalid params: the parameters that require grad changed since the first step "
                             f"({st['size']} coordinates then, {size} now); a changed set of parameters needs a new "
                             "TrustRegion (or add_param_group for new ones)")
        like = params[0]
        if any(v.is_floating_point() and v.numel() == size and (v.device != like.device or v.dtype != like.dtype)
               for v in st["norm_state"].values()):  # the model moved since the first step
            self._adopt_norm_state(st)
        counts = st["counts"]
        sizes = [sum(p.numel() for p in ps) for ps in by_group]
        lr = _per_coordinate([g["lr"] for g in self.param_groups], sizes, like)
        decay = _per_coordinate([g["weight_decay"] for g in self.param_groups], sizes, like)
        view = FlatView(params)
        replay = _ReplayedRandomness(params)

        def penalty() -> float:  # sum over groups of weight_decay / 2 ||w||^2
            if isinstance(decay, float) and decay == 0.0:
                return 0.0
            w = view.get()
            return 0.5 * float(torch.dot(decay * w, w))

        with _explained_errors():
            loss, loss_value, grad, op, sub_grad = self._evaluate(closure, group, params, counts, st["steps"], replay,
                                                                  hessian_closure, fraction, curvature)
            per_sample = None
            if per_sample_grads is not None:
                with torch.enable_grad(), _frozen_running_stats(self.module):
                    per_sample = replay.again(per_sample_grads)
                counts["gradient"] += 1
                if not isinstance(per_sample, Tensor) or per_sample.shape[1:] != (size,):
                    raise ValueError(f"Invalid per_sample_grads: expected a (B, {size}) tensor, got "
                                     f"{getattr(per_sample, 'shape', type(per_sample).__name__)}")
            with torch.no_grad():  # p.grad: the gradient of the loss step() returns
                for p, g in zip(params, view.split(grad)):
                    if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype:
                        p.grad = g.clone()
                    else:
                        p.grad.copy_(g)
            noisy = grad  # the batch gradient before weight decay (g_S - g_B does not see it)
            if not (isinstance(decay, float) and decay == 0.0):
                loss_value += penalty()
                grad = grad + decay * view.get()
                plain = op
                op = Operator(lambda v: plain(v) + decay * v, op.size, dtype=op.dtype, device=op.device,
                                        checked=False)
            movable = [ps for ps, g in zip(by_group, self.param_groups) if g["lr"] > 0]
            if not any(movable):  # every lr is 0: nothing moves, the norm still sees the gradient
                norm_state = {k: v.clone() for k, v in st["norm_state"].items()}
                self._update_norm(norm_state, grad, op, per_sample)
                st.update(steps=st["steps"] + 1, norm_state=norm_state, last={self._control: st[self._control]} | dict(
                    rho=math.nan, accepted=False, loss=loss_value, trial_loss=math.nan,
                    model_decrease=0.0, iterations=0, on_boundary=False, negative_curvature=False,
                    grad_norm=float(torch.linalg.vector_norm(grad)), hessian_fraction=fraction, status="lr is 0"))
                return loss.detach()
            active = None  # the coordinates that move, when some groups are frozen (lr = 0)
            if any(n and g["lr"] == 0 for n, g in zip(sizes, self.param_groups)):
                starts = [sum(sizes[:i]) for i in range(len(sizes))]
                active = torch.cat([torch.arange(a, a + n, device=like.device)
                                    for a, n, g in zip(starts, sizes, self.param_groups) if n and g["lr"] > 0])
            norm_state, ellipsoid, model_grad, model_op, radius, cauchy, grad_norm = self._region(
                group, st, grad, op, active, lr, per_sample)
            noise = self._noise(sub_grad, noisy, model_grad, ellipsoid, active, fraction)
            reference = loss_value
            if test_closure is not None:  # the ratio test's loss at w_t, on the independent batch
                reference = self._forward(test_closure, replay, "test_closure") + penalty()
                counts["forward"] += 1
            generator = torch.Generator()
            generator.set_state(st["generator"])
            rtol = min(group["krylov_tol"], math.sqrt(grad_norm)) if grad_norm > 0 else group["krylov_tol"]
            solver = self._solver(group, rtol, generator, cauchy, model_grad, model_op, ellipsoid)

            moving_params = [p for ps in movable for p in ps]
            moving_view = FlatView(moving_params)
            backup = getattr(self, "_backup", None)
            if backup is None or [b.shape for b in backup] != [p.shape for p in moving_params] or any(
                    b.device != p.device or b.dtype != p.dtype for b, p in zip(backup, moving_params)):
                self._backup = [torch.empty_like(p) for p in moving_params]
            moved = []

            def trial(step):
                with torch.no_grad():
                    torch._foreach_copy_(self._backup, [p.detach() for p in moving_params])
                moving_view.add_(step)
                moved.append(True)
                value = self._forward(closure, replay, "closure") if test_closure is None else self._forward(
                    test_closure, replay, "test_closure")
                counts["forward"] += 1
                return value + penalty()

            def undo():  # bit for bit (w + s - s need not equal w)
                with torch.no_grad():
                    torch._foreach_copy_(moving_params, self._backup)
                moved.clear()

            rule = self._rule(group)
            try:
                t = iterate(solver.solve, trial, undo, reference, radius, rule, ellipsoid=ellipsoid, rtol=rtol,
                            eps=torch.finfo(loss.dtype).eps)
            except BaseException:
                if moved:
                    undo()
                raise
        result = t.result
        c = self._control
        st.update({c: t.radius, "initial_" + c: group[c]}, steps=st["steps"] + 1, norm_state=norm_state,
                  generator=generator.get_state(),
                  last={c: radius} | dict(rho=t.rho, accepted=t.accepted, loss=loss_value,
                            trial_loss=t.trial_loss, model_decrease=t.model_decrease,
                            iterations=result.iterations, on_boundary=result.on_boundary,
                            negative_curvature=result.negative_curvature, grad_norm=grad_norm,
                            hessian_fraction=fraction, status=result.status, **noise))
        if test_closure is not None:
            st["last"]["test_loss"] = reference
        return loss.detach()


class ARC(TrustRegion):
    r"""Adaptive cubic regularisation (ARC) with adaptive ellipsoidal norms, as a ``torch.optim.Optimizer``.

    Where :class:`TrustRegion` minimises the quadratic model inside :math:`\|s\|_A \le \Delta`,
    ARC minimises the regularised model

    .. math:: m_t(s) = \mathcal L(w_t) + g_t^\top s + \tfrac12 s^\top H_t s + \tfrac{\sigma_t}{3}\|s\|_{A_t}^3

    (:mod:`trlib.cubic`, solved by Lanczos, :class:`trlib.cubic.CubicSolver`) in the same
    adaptive norm :math:`A_t` (the paper's footnote 5), tries :math:`w_t + s_t` on the same
    mini-batch, accepts when :math:`\rho_t \ge \eta_1` and updates :math:`\sigma` by
    :class:`trlib.region.SigmaRule`: divided by ``increase`` after a very successful step
    (:math:`\rho_t \ge \eta_2`, floored at ``min_sigma``), multiplied by ``decrease`` after a
    rejection (Cartis, Gould & Toint 2011, Algorithm 2.1; the stochastic analysis with
    sub-sampled Hessians is Kohler & Lucchi 2017). Everything else is :class:`TrustRegion`'s,
    shared rather than copied: the closure contract and :meth:`TrustRegion.step`'s options
    (``hessian_closure`` for sub-sampled curvature, ``test_closure``), the counted curvature,
    the norms, the iteration (:func:`trlib.region.iterate`), ``counts``/``backprops``/``last``
    (with ``"sigma"`` in place of ``"radius"``), ``state_dict`` round trips, parameter groups,
    data-parallel mode and the NaN guards. A rejected step costs no new product unless the
    larger :math:`\sigma` needs a longer Krylov basis.

    Args:
        params: and ``norm``, ``beta``, ``eps``, ``gtol``, ``hvp``, ``module``, ``seed``,
            ``distributed``, ``process_group``, ``lr``, ``weight_decay``: as for
            :class:`TrustRegion` (``lr`` scales the norm: :math:`\|D^{-1}s\|_A` in the cubic term).
        sigma: initial weight :math:`\sigma_0`. Default (None): :math:`\|\tilde g\|/\ell^2`
            with :math:`\ell` the length of the first Cauchy step in the region's norm (one
            product, once): the weight whose cubic term alone would stop a step along
            :math:`-\tilde g` at :math:`\ell`, the counterpart of TrustRegion's automatic radius.
        min_sigma: floor of :math:`\sigma` (what ``max_radius`` is to the radius).
        eta1, eta2: acceptance and very-successful thresholds.
        increase: :math:`\sigma` is divided by it after a very successful step.
        decrease: :math:`\sigma` is multiplied by it after a rejection (default by norm, as
            TrustRegion's shrink factor).
        method: ``"lanczos"`` (default) or ``"exact"`` (dense; tiny models only).
        krylov_tol, max_krylov: Lanczos stops when the model's gradient is below
            :math:`\min(\text{krylov\_tol}, \sqrt{\|g\|})\|\tilde g\|` (Cartis, Gould &
            Toint's TC.g rule: the accuracy TrustRegion asks of its steps; their TC.s rule's
            extra factor :math:`\min(1, \|u\|)`, which :func:`trlib.minimize` keeps, made
            the short steps of training cost ~26 products each), or after ``max_krylov`` products.

    Its attributes are ``sigma`` (for the next step), ``counts``, ``backprops``, ``last`` and
    ``ellipsoid``; ``radius`` is None (ARC has none).

    Example: ARC fits a least-squares model to the optimum.

    >>> import torch, trlib
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> opt = trlib.ARC(model.parameters(), norm="rms")
    >>> losses = [float(opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))) for _ in range(20)]
    >>> X = torch.cat([x, torch.ones(64, 1)], 1)   # the least-squares optimum, for comparison
    >>> best = float(torch.nn.functional.mse_loss(X @ torch.linalg.lstsq(X, y).solution, y))
    >>> round(losses[-1], 4) == round(best, 4), opt.counts["gradient"], opt.sigma > 0
    (True, 20, True)
    """

    _control = "sigma"
    _methods = CUBIC_METHODS

    def __init__(self, params, *, norm="rms", sigma: Optional[float] = None, min_sigma: float = 1e-8,
                 eta1: float = 0.01, eta2: float = 0.95, increase: float = 1.1, decrease: Optional[float] = None,
                 method: str = "lanczos", krylov_tol: float = 0.1, max_krylov: int = 50, beta: float = 0.8,
                 eps: Optional[float] = None, gtol: float = 0.0, hvp: str = "double_backward",
                 module: Optional[nn.Module] = None, seed: int = 0, distributed: bool = False, process_group=None,
                 lr: float = 1.0, weight_decay: float = 0.0):
        self._setup(params, norm, module, distributed, process_group, dict(
            sigma=sigma, min_sigma=min_sigma, eta1=eta1, eta2=eta2, increase=increase, decrease=decrease,
            method=method, krylov_tol=krylov_tol, max_krylov=max_krylov, beta=beta, eps=eps, gtol=gtol, hvp=hvp,
            check_every=1, seed=seed, lr=lr, weight_decay=weight_decay))

    @property
    def sigma(self) -> Optional[float]:
        """The weight :math:`\\sigma` the next step will use (None before an automatic first one is set)."""
        return self._live()

    @property
    def radius(self) -> None:
        """None: ARC has no radius (its reach is set by :attr:`sigma`)."""
        return None

    @staticmethod
    def _bounded(sigma: float, group: dict) -> float:
        return max(sigma, group["min_sigma"])

    @staticmethod
    def _first(gnorm: float, length: float) -> float:
        """The automatic first weight: the one whose cubic term alone would stop a step along
        :math:`-\\tilde g` at the Cauchy step's length."""
        return gnorm / length**2

    def _solver(self, group, rtol, generator, cauchy, grad, op, ellipsoid):
        return CubicSolver(group["method"], rtol=rtol, generator=generator, rule="tc.g",
                           max_iter=group["max_krylov"] if group["method"] != "exact" else None
                           ).query(grad, op, ellipsoid)

    def _rule(self, group):
        return SigmaRule(group["eta1"], group["eta2"], group["increase"], group["decrease"], group["min_sigma"])
