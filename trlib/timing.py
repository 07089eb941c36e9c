r"""Timing that can be trusted on a busy CPU and on a GPU, and the time of one trust-region step.

One iteration of the stochastic trust region (Algorithm 1 of Kohler, Adolphs & Lucchi) runs a
gradient whose graph is kept, :math:`k` Hessian-vector products and one forward pass at the
trial point, plus the solver's own arithmetic. Its time is

.. math:: t_{\text{step}} = (1 + o)\,\bigl(t_g + k\, t_h + t_f\bigr),

where :math:`o` is the *overhead* of everything that is not an autodiff pass (CG's vector
updates, the norm, copies, host-device synchronisation). :func:`profile_tr_step` measures
:math:`t_g, t_h, t_f`, whole steps, :math:`k` and :math:`o` in one run;
:func:`epoch_time_ratio` turns step times into the ratio of epoch times.

Three rules make the numbers comparable. A CUDA device runs kernels asynchronously, so it is
synchronised before and after every timed call (:func:`synchronize`). The first calls pay for
allocation and autotuning, so ``warmup`` rounds are not timed, and the median of ``repeats``
rounds is reported. Quantities that will be divided by each other are timed *round-robin*
(:func:`time_interleaved`): every round times each of them once, so on a shared machine all
of them see the same load and their ratio is fair, even when the absolute times are not.

The benchmark scripts (``benchmarks/``) and the course's chapter 7 both use this module.

Example:
    >>> import torch
    >>> t = time_interleaved({"small": lambda: torch.ones(10).sum(),
    ...                       "large": lambda: torch.ones(10_000).sum()}, repeats=3)
    >>> sorted(t), sorted(t["small"])
    (['large', 'small'], ['max', 'median', 'min', 'times'])
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from . import curvature
from .optim import TrustRegion

__all__ = ["synchronize", "time_median", "time_interleaved", "StepProfile", "profile_tr_step", "epoch_time_ratio",
           "PROFILE_SETTINGS", "PASSES"]

#: The TrustRegion settings of :func:`profile_tr_step`: a radius that does not bind and a
#: tolerance CG cannot meet, so each step spends (up to) ``max_krylov`` products.
PROFILE_SETTINGS = dict(norm="rms", radius=1.0, max_radius=1e6, krylov_tol=1e-9, max_krylov=10)

#: The quantities :func:`profile_tr_step` times, besides the caller's ``extra`` ones.
PASSES = ("gradient", "gradient with graph", "HVP, double backward", "HVP, forward-over-reverse",
          "forward (no grad)")


def synchronize(device: Union[str, torch.device, None] = None) -> None:
    """Wait until a CUDA ``device`` has finished its queued work (nothing to wait for elsewhere)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], Any]], device: Union[str, torch.device, None] = None, *,
                     repeats: int = 5, warmup: int = 1,
                     clock: Callable[[], float] = time.perf_counter) -> Dict[str, Dict[str, Any]]:
    r"""Seconds of each function of ``fns``, timed round-robin.

    After ``warmup`` untimed rounds, each of ``repeats`` rounds calls every function once, in
    the order of ``fns``, with ``device`` synchronised before and after each call. For every
    name the result holds ``median``, ``min``, ``max`` and the per-round ``times``: the times
    of one round were taken under the same machine load, so per-round ratios
    :math:`t_a^{(r)} / t_b^{(r)}` and ratios of medians compare like with like.

    ``clock`` is the time source (seconds); tests pass a fake one.

    >>> calls = []
    >>> t = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
    ...                      repeats=2, warmup=1)
    >>> "".join(calls), len(t["a"]["times"])
    ('ababab', 2)
    """
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not fns:
        raise ValueError("nothing to time: fns is empty")
    for name, fn in fns.items():
        if not callable(fn):
            raise ValueError(f"fns[{name!r}] is not callable: {fn!r}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = clock()
            fn()
            synchronize(device)
            times[name].append(clock() - start)
    return {name: {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "times": ts}
            for name, ts in times.items()}


def time_median(fn: Callable[[], Any], device: Union[str, torch.device, None] = None, *, repeats: int = 5,
                warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> Dict[str, Any]:
    """Median (and ``min``, ``max``, per-call ``times``) of ``repeats`` timed calls of ``fn``
    after ``warmup`` untimed ones, ``device`` synchronised around each call.

    >>> t = time_median(lambda: sum(range(1000)), repeats=3)
    >>> t["min"] <= t["median"] <= t["max"]
    True
    """
    return time_interleaved({"fn": fn}, device, repeats=repeats, warmup=warmup, clock=clock)["fn"]


@dataclass
class StepProfile:
    r"""What :func:`profile_tr_step` measured.

    ``times``: per quantity (:data:`PASSES`, ``"TR step"`` and the caller's extras) the
    ``median``, ``min``, ``max`` and per-round ``times``, in seconds;
    ``products``: the Hessian-vector products of each timed TR step;
    ``overhead``: the median over rounds of :math:`t_{\text{step}} / (t_g + k\, t_h + t_f) - 1`,
    every term from the same round (:math:`t_g` with graph for double backward, without for
    forward-over-reverse, which needs no graph);
    ``hvp``: the product mode of the TR steps.
    """

    times: Dict[str, Dict[str, Any]]
    products: List[float]
    overhead: float
    hvp: str

    def median(self, name: str) -> float:
        """Median seconds of ``name``."""
        return self.times[name]["median"]

    def ratio(self, name: str, to: str = "gradient") -> float:
        """Median time of ``name`` over that of ``to`` (a gradient by default)."""
        return self.median(name) / self.median(to)

    @property
    def products_per_step(self) -> float:
        """Mean Hessian-vector products per timed TR step (the :math:`k` of every ratio)."""
        return statistics.fmean(self.products)


def profile_tr_step(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], *, hvp: str = "double_backward",
                    repeats: int = 5, warmup: int = 1, extra: Optional[Mapping[str, Callable[[], Any]]] = None,
                    **settings: Any) -> StepProfile:
    r"""Time the autodiff passes of a trust-region step and whole :class:`trlib.TrustRegion` steps.

    ``loss(module)`` is the mini-batch loss of a module (the batch is fixed inside it). Timed
    round-robin (:func:`time_interleaved`) on ``model``'s device: a gradient, a gradient with
    graph, a product by double backward and by forward-over-reverse, a forward pass without
    graph, ``TrustRegion.step`` on a copy of ``model`` (so ``model`` itself is left as it was,
    BatchNorm statistics included), and the caller's ``extra`` functions (e.g. a first-order
    optimizer's step, for :func:`epoch_time_ratio`). The steps use :data:`PROFILE_SETTINGS`
    (each step spends up to ``max_krylov`` products) updated by ``settings``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> x, y = torch.randn(32, 5), torch.randn(32, 1)
    >>> p = profile_tr_step(net, lambda m: ((m(x) - y) ** 2).mean(), repeats=2, max_krylov=3)
    >>> p.products_per_step <= 3, p.ratio("gradient") == 1.0
    (True, True)
    """
    if hvp not in ("double_backward", "forward_over_reverse"):
        raise ValueError(f"hvp must be 'double_backward' or 'forward_over_reverse', got {hvp!r}")
    extra = dict(extra or {})
    clash = set(extra) & set(PASSES + ("TR step",))
    if clash:
        raise ValueError(f"extra uses the names of timed passes: {sorted(clash)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require gradients")
    device = params[0].device
    closure = lambda: loss(model)  # noqa: E731
    stepper = copy.deepcopy(model)
    optimizer = TrustRegion(stepper.parameters(), module=stepper, hvp=hvp, **{**PROFILE_SETTINGS, **settings})
    products: List[float] = []

    def tr_step():
        before = optimizer.counts["hvp"]
        optimizer.step(lambda: loss(stepper))
        products.append(optimizer.counts["hvp"] - before)

    with curvature.frozen_batchnorm_stats(model):  # the passes must not move model's statistics
        g = curvature.flat_grad(closure(), params, create_graph=True)
        double_backward = curvature.hvp_double_backward(g, params)
        forward_over_reverse = curvature.hvp_forward_over_reverse(
            curvature.functional_loss(closure, model, params), params)
        v = torch.randn(g.shape, generator=torch.Generator().manual_seed(0), dtype=g.dtype).to(device)

        def forward():
            with torch.no_grad():
                closure()

        fns = {"gradient": lambda: torch.autograd.grad(closure(), params),
               "gradient with graph": lambda: curvature.flat_grad(closure(), params, create_graph=True),
               "HVP, double backward": lambda: double_backward(v),
               "HVP, forward-over-reverse": lambda: forward_over_reverse(v),
               "forward (no grad)": forward, "TR step": tr_step, **extra}
        times = time_interleaved(fns, device, repeats=repeats, warmup=warmup)
    products = products[-repeats:]  # the timed rounds
    base = times["gradient with graph" if hvp == "double_backward" else "gradient"]["times"]
    product = times["HVP, double backward" if hvp == "double_backward" else "HVP, forward-over-reverse"]["times"]
    overheads = [step / (b + k * h + f) - 1 for step, b, k, h, f in zip(
        times["TR step"]["times"], base, products, product, times["forward (no grad)"]["times"])]
    return StepProfile(times=times, products=products, overhead=statistics.median(overheads), hvp=hvp)


def epoch_time_ratio(step_seconds: float, batch: int, other_step_seconds: float, other_batch: int) -> float:
    r"""How many times longer an epoch of one method takes than an epoch of another.

    An epoch of :math:`N` samples takes :math:`N/B` steps of batch :math:`B`, so

    .. math:: \frac{T}{T'} = \frac{(N/B)\, t}{(N/B')\, t'} = \frac{B'}{B}\cdot\frac{t}{t'}.

    For a trust region :math:`t = (1 + o)(t_g + k t_h + t_f)` (:func:`profile_tr_step`): the
    ratio grows linearly in the number :math:`k` of products per step, so quote :math:`k` with it.

    >>> round(epoch_time_ratio(0.264, 512, 0.0082, 128), 2)  # TR at 4 products per step vs Adam
    8.05
    """
    values = dict(step_seconds=step_seconds, batch=batch, other_step_seconds=other_step_seconds,
                  other_batch=other_batch)
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    return (other_batch / batch) * (step_seconds / other_step_seconds)
