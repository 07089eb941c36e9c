r"""``TrustRegion``: the stochastic ellipsoidal trust-region method (Algorithm 1) as a ``torch.optim.Optimizer``.

One call of :meth:`TrustRegion.step` is one iteration of Algorithm 1 on the closure's
mini-batch:

1. loss and gradient :math:`g_t` (kept differentiable for Hessian-vector products);
2. the ellipsoid :math:`A_t` from the norm (RMSProp's by default; :mod:`trlib.norms`);
3. if :math:`\|g_t\| \le` ``gtol``, :math:`g_t := 0` (step 4: curvature alone moves);
4. an approximate solution :math:`s_t` of the subproblem (Eq. 7, :mod:`trlib.subproblem`);
5. the trial loss :math:`\mathcal L(w_t + s_t)` on the *same* mini-batch, the ratio
   :math:`\rho_t`, acceptance and the new radius (:mod:`trlib.region`).

Work per iteration: 1 gradient (a forward and a backward, with graph) + ``k`` Hessian-
vector products + 1 forward; ``opt.counts`` adds them up exactly.

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
from .region import RadiusRule, reduction_ratio
from .subproblem import METHODS, solve_subproblem

__all__ = ["TrustRegion", "NonFiniteLossError", "DEFAULTS"]

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
_KEY = "trust_region"  # the optimizer-wide entry of self.state (round-trips through state_dict)


class NonFiniteLossError(FloatingPointError, ValueError):
    """The closure returned NaN or inf at the current (accepted) parameters."""


class TrustRegion(torch.optim.Optimizer):
    r"""Stochastic trust-region Newton method with adaptive ellipsoidal norms.

    Args:
        params: the parameters (a single group; like L-BFGS, one step couples them all).
        norm: the region's shape: ``"uniform"`` (sphere), ``"adagrad"``, ``"rms"`` (the
            paper's), ``"adam"``, or a :class:`trlib.norms.Norm`.
        radius: initial radius :math:`\Delta_0`. Default (None): the length
            :math:`\|\tilde g\|^3 / \tilde g^\top \tilde H \tilde g` of the first Cauchy step
            in the region's norm (one extra Hessian-vector product, once), which scales with
            the problem as the steps do; the paper's values (0.05 sphere, 1e-4 RMSProp) are
            for long runs.
        max_radius: cap on the radius.
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
            (needs ``module``).
        module: the ``nn.Module`` the parameters belong to. Optional for double backward;
            when given, BatchNorm running statistics are frozen during trial evaluations,
            so they move once per step.
        check_every: CG looks at its stopping test once every this many products (on a GPU
            each look is a host-device synchronisation).
        seed: seed of the generator for GLTR's random restarts.
        distributed: data-parallel mode over ``torch.distributed`` (NCCL on GPUs, gloo on
            CPUs): each process evaluates the closure on its shard of the batch, and the
            loss, the gradient, every Hessian-vector product and the trial loss are averaged
            with one all-reduce each, so every process computes the same step. The result
            equals a single process on the union of the shards (equal shard sizes).
        process_group: the group to reduce over (default: the world).

    ``step(closure)``: ``closure()`` evaluates the mini-batch loss *without* calling
    ``backward`` (the optimizer differentiates it, and calls it again at the trial point
    under ``torch.no_grad()``). Returns the loss at the current point.

    Attributes: ``radius`` (for the next step), ``counts`` (``"gradient"``, ``"hvp"``,
    ``"forward"``: cumulative evaluations; a backprop is a gradient or a product),
    ``last`` (the last step's radius, rho, acceptance, losses, model decrease, ...).
    """

    def __init__(self, params, *, norm="rms", radius: Optional[float] = None, max_radius: float = 10.0,
                 eta1: float = 0.01, eta2: float = 0.95, increase: float = 1.1, decrease: Optional[float] = None,
                 method: str = "cg", krylov_tol: float = 0.1, max_krylov: int = 50, beta: float = 0.8,
                 eps: float = 1e-8, gtol: float = 0.0, hvp: str = "double_backward",
                 module: Optional[nn.Module] = None, check_every: int = 1, seed: int = 0,
                 distributed: bool = False, process_group=None):
        rule_norm = norms.get_norm(norm, beta=beta, eps=eps)
        name = rule_norm.name if rule_norm.name in DEFAULTS else None
        if decrease is None:
            decrease = DEFAULTS.get(name, _FALLBACK)["decrease"]
        if radius is not None and not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
            raise ValueError(f"Invalid radius: {radius!r} (must be a positive finite number, or None for automatic)")
        RadiusRule(eta1, eta2, increase, decrease, max_radius)  # validates
        if radius is not None and radius > max_radius:
            raise ValueError(f"Invalid radius: {radius!r} exceeds max_radius={max_radius!r}")
        if method not in METHODS:
            raise ValueError(f"Invalid method: {method!r}; expected one of {METHODS}")
        if not (isinstance(krylov_tol, (int, float)) and 0 < krylov_tol < 1):
            raise ValueError(f"Invalid krylov_tol: {krylov_tol!r} (must lie in (0, 1))")
        if not (isinstance(max_krylov, int) and max_krylov >= 1):
            raise ValueError(f"Invalid max_krylov: {max_krylov!r} (must be a positive int)")
        if not (isinstance(gtol, (int, float)) and gtol >= 0):
            raise ValueError(f"Invalid gtol: {gtol!r} (must be >= 0)")
        if hvp not in _HVP_MODES:
            raise ValueError(f"Invalid hvp: {hvp!r}; expected one of {_HVP_MODES}")
        if hvp == "forward_over_reverse" and module is None:
            raise ValueError("Invalid module: hvp='forward_over_reverse' needs the nn.Module (module=model)")
        if not (isinstance(check_every, int) and check_every >= 1):
            raise ValueError(f"Invalid check_every: {check_every!r} (must be a positive int)")
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("Invalid distributed: torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first, e.g. under torchrun)")
        defaults = dict(radius=None if radius is None else float(radius), max_radius=max_radius, eta1=eta1, eta2=eta2, increase=increase,
                        decrease=decrease, method=method, krylov_tol=krylov_tol, max_krylov=max_krylov,
                        gtol=gtol, hvp=hvp, check_every=check_every)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("TrustRegion doesn't support per-parameter options (parameter groups)")
        self.norm = rule_norm
        self.module = module
        self._seed = int(seed)
        self._backup = None
        self.distributed = bool(distributed)
        self.process_group = process_group

    def _mean(self, tensor: Tensor) -> Tensor:
        """The average over processes (identity when not distributed): one all-reduce."""
        if not self.distributed:
            return tensor
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, group=self.process_group)
        return tensor.div_(torch.distributed.get_world_size(self.process_group))

    # ------------------------------------------------------------------ state
    def _params(self):
        return [p for p in self.param_groups[0]["params"] if p.requires_grad]

    def _global(self) -> dict:
        st = self.state[_KEY]
        if not st:
            params = self._params()
            if not params:
                raise ValueError("TrustRegion got no parameters that require grad")
            like = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            st.update(radius=self.param_groups[0]["radius"], steps=0,
                      counts={"gradient": 0, "hvp": 0, "forward": 0}, last={},
                      norm_state=self.norm.init(like),
                      generator=torch.Generator().manual_seed(self._seed).get_state())
        return st

    @property
    def radius(self) -> Optional[float]:
        """The radius the next step will use (None before an automatic first radius is set)."""
        return self._global()["radius"]

    @property
    def counts(self) -> Dict[str, int]:
        """Cumulative ``gradient``, ``hvp`` and ``forward`` (loss-only) evaluations."""
        return dict(self._global()["counts"])

    @property
    def backprops(self) -> int:
        """Gradients plus Hessian-vector products: the paper's unit of work."""
        c = self._global()["counts"]
        return c["gradient"] + c["hvp"]

    @property
    def last(self) -> dict:
        """The last step: ``radius``, ``rho``, ``accepted``, ``loss``, ``trial_loss``,
        ``model_decrease``, ``iterations``, ``on_boundary``, ``negative_curvature``, ``grad_norm``, ``status``."""
        return dict(self._global()["last"])

    @property
    def ellipsoid(self) -> Optional[Tensor]:
        """The ellipsoid of the last step (None for the sphere or before the first step)."""
        return self.norm.ellipsoid(self._global()["norm_state"])

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        st = self.state.get(_KEY)
        params = self._params()
        if st and params:  # the optimizer-wide entry is not moved by torch: follow the parameters
            st["norm_state"] = {k: v.to(params[0].device) if v.is_floating_point() and v.ndim else v
                                for k, v in st["norm_state"].items()}

    @staticmethod
    def _first_radius(grad: Tensor, hvp, ellipsoid: Optional[Tensor], max_radius: float) -> float:
        # The Cauchy step's length in the region's variables u = A^{1/2} s: invariant to
        # rescaling the loss for the sphere, and scaling like ||s||_A for adaptive norms.
        scale = None if ellipsoid is None else ellipsoid.rsqrt()
        g = grad if scale is None else grad * scale
        gnorm = float(torch.linalg.vector_norm(g))
        if gnorm == 0.0:
            return min(1.0, max_radius)
        hg = hvp(g if scale is None else g * scale)
        curvature = float(torch.dot(g, hg if scale is None else hg * scale))
        radius = gnorm**3 / curvature if curvature > 0 and math.isfinite(curvature) else gnorm
        return float(min(max(radius, 1e-12), max_radius))

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        if closure is None or not callable(closure):
            raise ValueError("TrustRegion.step needs a closure that returns the mini-batch loss (no backward inside)")
        group = self.param_groups[0]
        params = self._params()
        st = self._global()
        counts = st["counts"]
        view = curvature.FlatView(params)
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
                f"the loss is {loss_value} at the current parameters (step {st['steps']}); the weights were not "
                "changed. Check the mini-batch and the model's outputs for NaN/inf (a warm-up phase with too large "
                "a learning rate is a common cause).")
        with torch.enable_grad():
            grad_graph = curvature.flat_grad(loss, params, create_graph=double_backward)
        counts["gradient"] += 1
        grad = self._mean(grad_graph.detach())
        if not bool(torch.all(torch.isfinite(grad))):
            raise NonFiniteLossError(f"the gradient contains NaN/inf at the current parameters (step {st['steps']})")

        if double_backward:
            hvp = curvature.hvp_double_backward(grad_graph, params)
        else:
            f = curvature.functional_loss(closure, self.module, params)
            raw = curvature.hvp_forward_over_reverse(f, params)

            def hvp(v, raw=raw):
                with curvature.frozen_batchnorm_stats(self.module):
                    return raw(v)

        if self.distributed:
            local_hvp = hvp

            def hvp(v, local_hvp=local_hvp):
                return self._mean(local_hvp(v))

        ellipsoid = self.norm.update(st["norm_state"], grad)
        grad_norm = float(torch.linalg.vector_norm(grad))
        model_grad = torch.zeros_like(grad) if grad_norm <= group["gtol"] else grad
        if st["radius"] is None:
            st["radius"] = self._first_radius(model_grad, hvp, ellipsoid, group["max_radius"])
            counts["hvp"] += 1
        radius = st["radius"]
        generator = torch.Generator()
        generator.set_state(st["generator"])
        result = solve_subproblem(model_grad, hvp, radius, ellipsoid=ellipsoid, method=group["method"],
                                  rtol=min(group["krylov_tol"], math.sqrt(grad_norm)) if grad_norm > 0 else group["krylov_tol"],
                                  max_iter=group["max_krylov"] if group["method"] != "exact" else None,
                                  check_every=group["check_every"], generator=generator)
        st["generator"] = generator.get_state()
        counts["hvp"] += result.iterations
        del hvp, grad_graph  # frees the gradient's graph before the trial forward

        step = result.step
        model_decrease = float(result.model_decrease)
        trial_value = math.nan
        stepped = bool(torch.all(torch.isfinite(step))) and math.isfinite(model_decrease)
        if stepped:  # a non-finite step never touches the weights: it is a rejection
            if self._backup is None or len(self._backup) != len(params):
                self._backup = [torch.empty_like(p) for p in params]
            with torch.no_grad():
                torch._foreach_copy_(self._backup, [p.detach() for p in params])
                view.add_(step)
                with curvature.frozen_batchnorm_stats(self.module):
                    trial = closure()
            counts["forward"] += 1
            trial_value = float(self._mean(trial.detach()))
        rho = reduction_ratio(loss_value, trial_value, model_decrease, eps=torch.finfo(loss.dtype).eps)
        rule = RadiusRule(group["eta1"], group["eta2"], group["increase"], group["decrease"], group["max_radius"])
        step_norm = float(norms.ellipsoid_norm(step, ellipsoid)) if stepped else math.inf
        new_radius, accepted = rule.update(radius, rho, result.on_boundary, step_norm)
        if stepped and not accepted:  # restore bit for bit (w + s - s need not equal w)
            with torch.no_grad():
                torch._foreach_copy_(params, self._backup)
        st["radius"] = new_radius
        st["steps"] += 1
        st["last"] = dict(radius=radius, rho=rho, accepted=accepted, loss=loss_value, trial_loss=trial_value,
                          model_decrease=model_decrease, iterations=result.iterations,
                          on_boundary=result.on_boundary, negative_curvature=result.negative_curvature,
                          grad_norm=grad_norm, status=result.status)
        return loss.detach()
