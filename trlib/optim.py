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
and the operator).

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
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from . import curvature, norms
from .curvature import NonFiniteCurvatureError
from .region import RadiusRule, iterate
from .subproblem import METHODS, Cauchy, get_solver

__all__ = ["TrustRegion", "NonFiniteLossError", "NonFiniteCurvatureError", "DEFAULTS"]

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


class NonFiniteLossError(FloatingPointError, ValueError):
    """The closure returned NaN or inf at the current (accepted) parameters."""


def _check(h: dict) -> None:
    """Validate the hyperparameters of a param group (a clear ValueError naming the first bad one)."""
    if h["radius"] is not None and not (isinstance(h["radius"], (int, float)) and math.isfinite(h["radius"])
                                        and h["radius"] > 0):
        raise ValueError(f"Invalid radius: {h['radius']!r} (must be a positive finite number, or None for automatic)")
    RadiusRule(h["eta1"], h["eta2"], h["increase"], h["decrease"], h["max_radius"])  # validates those five
    if h["radius"] is not None and h["radius"] > h["max_radius"]:
        raise ValueError(f"Invalid radius: {h['radius']!r} exceeds max_radius={h['max_radius']!r}")
    if h["method"] not in METHODS:
        raise ValueError(f"Invalid method: {h['method']!r}; expected one of {METHODS}")
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


class TrustRegion(torch.optim.Optimizer):
    r"""Stochastic trust-region Newton method with adaptive ellipsoidal norms.

    Args:
        params: the parameters (a single group; like L-BFGS, one step couples them all).
            Real float32 or float64 tensors, each given once.
        norm: the region's shape: ``"uniform"`` (sphere), ``"adagrad"``, ``"rms"`` (the
            paper's), ``"adam"``, or a :class:`trlib.norms.Norm` (recorded by its ``name``).
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
        beta, eps: the norm's decay rate and floor (see :mod:`trlib.norms`).
        gtol: gradients of norm at most ``gtol`` are set to zero (Algorithm 1, step 4).
        hvp: ``"double_backward"`` (works with any closure) or ``"forward_over_reverse"``
            (needs ``module``; no gradient graph is kept between products).
        module: the ``nn.Module`` the parameters belong to. Optional for double backward;
            when given, BatchNorm running statistics are frozen during trial evaluations,
            so they move once per step. (Not a hyperparameter: not in the state dict.)
        check_every: CG looks at its stopping test once every this many products (on a GPU
            each look is a host-device synchronisation).
        seed: seed of the generator for GLTR's random vectors (restarts, certificate).
        distributed: data-parallel mode over ``torch.distributed`` (NCCL on GPUs, gloo on
            CPUs): each process evaluates the closure on its shard of the batch, and the
            loss, the gradient, every Hessian-vector product and the trial loss are averaged
            with one all-reduce each, so every process computes the same step. The result
            equals a single process on the union of the shards (equal shard sizes).
        process_group: the group to reduce over (default: the world).

    Every hyperparameter above except ``module``, ``distributed`` and ``process_group``
    lives in ``defaults`` and in the param group, so ``state_dict()`` records it and
    ``load_state_dict()`` checks it (a checkpoint of another norm is refused). The
    optimizer's state (live radius, step count, counts, the norm's state, the generator) is
    kept under the first parameter, as L-BFGS does.

    Attributes: ``radius`` (for the next step), ``counts`` (``"gradient"``, ``"hvp"``,
    ``"forward"``: cumulative evaluations; ``"hvp"`` in units of full-batch products; a
    backprop is a gradient or a product), ``backprops``, ``last`` (the last step's radius,
    rho, acceptance, losses, model decrease, ...), ``ellipsoid``.
    """

    def __init__(self, params, *, norm="rms", radius: Optional[float] = None, max_radius: float = 10.0,
                 eta1: float = 0.01, eta2: float = 0.95, increase: float = 1.1, decrease: Optional[float] = None,
                 method: str = "cg", krylov_tol: float = 0.1, max_krylov: int = 50, beta: float = 0.8,
                 eps: float = 1e-8, gtol: float = 0.0, hvp: str = "double_backward",
                 module: Optional[nn.Module] = None, check_every: int = 1, seed: int = 0,
                 distributed: bool = False, process_group=None):
        shape = norms.get_norm(norm, beta=beta, eps=eps)
        if getattr(shape, "uses_per_sample_gradients", False):
            raise ValueError(f"Invalid norm: {shape.name!r} needs per-sample gradients, which a closure that returns "
                             "the batch's loss does not give; TrustRegion supports norms of the gradient (and of "
                             "Hessian-vector products)")
        if decrease is None:
            decrease = DEFAULTS.get(shape.name, _FALLBACK)["decrease"]
        defaults = dict(norm=shape.name, radius=None if radius is None else float(radius), max_radius=max_radius,
                        eta1=eta1, eta2=eta2, increase=increase, decrease=decrease, method=method,
                        krylov_tol=krylov_tol, max_krylov=max_krylov, beta=getattr(shape, "beta", beta),
                        eps=getattr(shape, "eps", eps), gtol=gtol, hvp=hvp, check_every=check_every, seed=seed)
        _check(defaults)
        if hvp == "forward_over_reverse" and module is None:
            raise ValueError("Invalid module: hvp='forward_over_reverse' needs the nn.Module (module=model)")
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("Invalid distributed: torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first, e.g. under torchrun)")
        params = list(params)
        tensors = [p for p in params if isinstance(p, Tensor)]
        if len({id(p) for p in tensors}) != len(tensors):
            raise ValueError("Invalid params: a parameter appears more than once (its step would be applied twice)")
        for p in tensors:
            if p.is_complex() or p.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"Invalid params: TrustRegion needs float32 or float64 parameters, got {p.dtype} "
                                 "(keep the weights in float32 and use torch.autocast for speed)")
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("TrustRegion doesn't support per-parameter options (parameter groups)")
        self.norm, self._named_norm = shape, isinstance(norm, str) or norm is None
        self.module = module
        self.distributed = bool(distributed)
        self.process_group = process_group

    # ------------------------------------------------------------------ state
    def _params(self):
        return [p for p in self.param_groups[0]["params"] if p.requires_grad]

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
            st.update(radius=group["radius"], initial_radius=group["radius"], steps=0, size=like.numel(),
                      counts={"gradient": 0, "hvp": 0, "forward": 0}, last={}, norm_state=self.norm.init(like),
                      generator=torch.Generator().manual_seed(group["seed"]).get_state())
        return st

    @property
    def radius(self) -> Optional[float]:
        """The radius the next step will use (None before an automatic first radius is set)."""
        return self._state().get("radius", self.param_groups[0]["radius"])

    @property
    def counts(self) -> Dict[str, float]:
        """Cumulative ``gradient``, ``hvp`` and ``forward`` (loss-only) evaluations."""
        return dict(self._state().get("counts", {"gradient": 0, "hvp": 0, "forward": 0}))

    @property
    def backprops(self) -> float:
        """Gradients plus Hessian-vector products: the paper's unit of work."""
        c = self.counts
        return c["gradient"] + c["hvp"]

    @property
    def last(self) -> dict:
        """The last step: ``radius``, ``rho``, ``accepted``, ``loss``, ``trial_loss``,
        ``model_decrease``, ``iterations``, ``on_boundary``, ``negative_curvature``, ``grad_norm``, ``status``."""
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
        if not isinstance(groups, list) or len(groups) != 1:
            raise ValueError("Invalid state_dict: a TrustRegion checkpoint has exactly one param group")
        missing = [k for k in self.defaults if k not in groups[0]]
        if missing:
            raise ValueError(f"Invalid state_dict: the param group lacks {missing} (not a TrustRegion checkpoint?)")
        if groups[0]["norm"] != self.norm.name:
            raise ValueError(f"Invalid state_dict: saved with norm {groups[0]['norm']!r}, but this optimizer's "
                             f"norm is {self.norm.name!r}")
        _check(groups[0])
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
        keys = {"radius", "initial_radius", "steps", "size", "counts", "last", "norm_state", "generator"}
        if not keys <= set(st):
            raise ValueError(f"Invalid state_dict: the optimizer state lacks {sorted(keys - set(st))}")
        r = st["radius"]
        if r is not None and not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise ValueError(f"Invalid state_dict: radius {r!r} (must be positive and finite)")
        if set(st["counts"]) != {"gradient", "hvp", "forward"}:
            raise ValueError(f"Invalid state_dict: counts {st['counts']!r}")
        params = self._params()
        like = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        template = self.norm.init(like)
        saved = st["norm_state"]
        if st["size"] != like.numel():
            raise ValueError(f"Invalid state_dict: saved for {st['size']} parameters, this optimizer has "
                             f"{like.numel()} (a checkpoint of another model?)")
        if set(saved) != set(template) or any(saved[k].shape != v.shape for k, v in template.items()):
            raise ValueError(f"Invalid state_dict: the norm state does not fit this {self.norm.name!r} norm on "
                             f"{like.numel()} parameters (a checkpoint of another model?)")
        if not all(bool(torch.all(torch.isfinite(v))) for v in saved.values()):
            raise ValueError("Invalid state_dict: the norm state contains NaN or inf")
        # torch moved every tensor to the first parameter's device and dtype: restore the templates'
        st["norm_state"] = {k: saved[k].to(dtype=v.dtype) for k, v in template.items()}
        st["generator"] = st["generator"].to("cpu", torch.uint8)

    def _mean(self, tensor: Tensor) -> Tensor:
        """The average over processes (identity when not distributed): one all-reduce."""
        if not self.distributed:
            return tensor
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, group=self.process_group)
        return tensor.div_(torch.distributed.get_world_size(self.process_group))

    # ------------------------------------------------------------------ the three phases
    def _evaluate(self, closure, group, params, counts, steps):
        """Loss, gradient (averaged over processes) and the counted curvature operator."""
        double_backward = group["hvp"] == "double_backward"
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("Invalid closure: it must return the loss as a scalar tensor")
        if not loss.requires_grad:
            raise ValueError("Invalid closure: the loss does not depend on the parameters "
                             "(was it computed under torch.no_grad() or detached?)")
        loss_value = float(self._mean(loss.detach()))
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"the loss is {loss_value} at the current parameters (step {steps}); the weights were not "
                "changed. Check the mini-batch and the model's outputs for NaN/inf (a warm-up phase with too large "
                "a learning rate is a common cause).")
        with torch.enable_grad():
            grad_graph = curvature.flat_grad(loss, params, create_graph=double_backward)
        counts["gradient"] += 1
        grad = self._mean(grad_graph.detach())
        if not bool(torch.all(torch.isfinite(grad))):
            raise NonFiniteLossError(f"the gradient contains NaN/inf at the current parameters (step {steps})")
        if double_backward:
            op = curvature.hvp_double_backward(grad_graph, params)
        else:
            raw = curvature.hvp_forward_over_reverse(curvature.functional_loss(closure, self.module, params), params)

            def frozen(v):
                with curvature.frozen_batchnorm_stats(self.module):
                    return raw(v)

            op = curvature.Operator(frozen, raw.size, dtype=raw.dtype, device=raw.device)
        if self.distributed:
            local = op
            op = curvature.Operator(lambda v: self._mean(local(v)), op.size, dtype=op.dtype, device=op.device)
        return loss, loss_value, grad, curvature.as_operator(op, grad).counted(counts, "hvp")

    def _region(self, group, st, grad, op):
        """The ellipsoid (on a copy of the norm's state), the model gradient and the radius; the
        state itself changes only once the step is done."""
        norm_state = {k: v.clone() for k, v in st["norm_state"].items()}
        if getattr(self.norm, "uses_curvature", False):
            ellipsoid = self.norm.update(norm_state, grad, hvp=op)
        else:
            ellipsoid = self.norm.update(norm_state, grad)
        model_grad = torch.zeros_like(grad) if float(torch.linalg.vector_norm(grad)) <= group["gtol"] else grad
        # writing the group's radius sets the live radius
        radius = group["radius"] if group["radius"] != st["initial_radius"] else st["radius"]
        cauchy = None
        if radius is None:
            # The Cauchy step's length in the region's variables u = A^{1/2} s: invariant to rescaling
            # the loss for the sphere, and scaling like ||s||_A for adaptive norms.
            cauchy = Cauchy().query(model_grad, op, ellipsoid)
            length = cauchy.gnorm**3 / cauchy.curvature if cauchy.curvature > 0 else cauchy.gnorm
            radius = float(min(max(length, 1e-12), group["max_radius"])) if cauchy.gnorm > 0 else 1.0
        return norm_state, ellipsoid, model_grad, min(radius, group["max_radius"]), cauchy

    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One iteration of Algorithm 1 on the closure's mini-batch.

        Args:
            closure: a function of no arguments that computes the loss on the current
                mini-batch and returns it as a scalar tensor, **without** calling
                ``backward()`` and without ``zero_grad()``: the optimizer differentiates the
                loss itself (keeping the graph for Hessian-vector products) and calls the
                closure a second time, under ``torch.no_grad()``, at the trial point
                :math:`w + s`. Both calls must evaluate the same mini-batch. Required.

        Returns:
            The loss at the current point, before the step (detached; in data-parallel mode,
            this process's; ``last["loss"]`` holds the average).

        Raises:
            NonFiniteLossError: the loss or gradient is NaN/inf at the current point; the
                weights and the optimizer's state are left as they were (the work spent is
                counted).
            NonFiniteCurvatureError: a Hessian-vector product is NaN/inf; the weights and
                the optimizer's state are left as they were (the work spent is counted).
            ValueError: a closure that breaks the contract.
        """
        if closure is None or not callable(closure):
            raise ValueError("TrustRegion.step needs a closure that returns the mini-batch loss (no backward inside)")
        group = self.param_groups[0]
        params = self._params()
        st = self._state(create=True)
        if sum(p.numel() for p in params) != st["size"]:
            raise ValueError(f"Invalid params: the parameters that require grad changed since the first step "
                             f"({st['size']} then, {sum(p.numel() for p in params)} now)")
        counts = st["counts"]
        loss, loss_value, grad, op = self._evaluate(closure, group, params, counts, st["steps"])
        norm_state, ellipsoid, model_grad, radius, cauchy = self._region(group, st, grad, op)
        generator = torch.Generator()
        generator.set_state(st["generator"])
        grad_norm = float(torch.linalg.vector_norm(grad))
        rtol = min(group["krylov_tol"], math.sqrt(grad_norm)) if grad_norm > 0 else group["krylov_tol"]
        solver = cauchy if cauchy is not None and group["method"] == "cauchy" else get_solver(
            group["method"], rtol=rtol, max_iter=group["max_krylov"] if group["method"] != "exact" else None,
            check_every=group["check_every"], generator=generator).query(model_grad, op, ellipsoid)

        view = curvature.FlatView(params)
        if getattr(self, "_backup", None) is None or [b.shape for b in self._backup] != [p.shape for p in params]:
            self._backup = [torch.empty_like(p) for p in params]
        moved = []

        def trial(step):
            with torch.no_grad():
                torch._foreach_copy_(self._backup, [p.detach() for p in params])
            view.add_(step)
            moved.append(True)
            with torch.no_grad(), curvature.frozen_batchnorm_stats(self.module):
                value = closure()
            counts["forward"] += 1
            return float(self._mean(value.detach()))

        def undo():  # bit for bit (w + s - s need not equal w)
            with torch.no_grad():
                torch._foreach_copy_(params, self._backup)
            moved.clear()

        rule = RadiusRule(group["eta1"], group["eta2"], group["increase"], group["decrease"], group["max_radius"])
        try:
            t = iterate(solver.solve, trial, undo, loss_value, radius, rule, ellipsoid=ellipsoid, rtol=rtol,
                        eps=torch.finfo(loss.dtype).eps)
        except BaseException:
            if moved:
                undo()
            raise
        result = t.result
        st.update(radius=t.radius, initial_radius=group["radius"], steps=st["steps"] + 1, norm_state=norm_state,
                  generator=generator.get_state(),
                  last=dict(radius=radius, rho=t.rho, accepted=t.accepted, loss=loss_value,
                            trial_loss=t.trial_loss, model_decrease=float(result.model_decrease),
                            iterations=result.iterations, on_boundary=result.on_boundary,
                            negative_curvature=result.negative_curvature, grad_norm=grad_norm, status=result.status))
        return loss.detach()
