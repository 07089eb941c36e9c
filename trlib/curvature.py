r"""Curvature as a linear operator: Hessian-vector products on a flat view of the parameters.

A second-order method never forms :math:`\nabla^2 \mathcal L(w)` (that would be
:math:`d^2` numbers); it only needs products :math:`v \mapsto \nabla^2 \mathcal L(w)\, v`,
which cost about one extra backpropagation each (Pearlmutter 1994). Two ways:

* **double backward** (reverse-over-reverse): keep the graph of the gradient
  :math:`g(w)` and differentiate :math:`g(w)^\top v` once more,
  :math:`H v = \nabla_w (g(w)^\top v)`. Works with any closure; the forward pass runs once
  per step, not per product.
* **forward-over-reverse** (``torch.func.jvp`` of ``torch.func.grad``): push a tangent
  :math:`v` forward through the gradient computation,
  :math:`H v = \frac{d}{d\epsilon} g(w + \epsilon v)|_{\epsilon=0}`. Needs the loss as a
  function of the parameters; stores no gradient graph between products.

BatchNorm in train mode: both must see the *same* function as the gradient (batch
statistics), and neither may update the running statistics once per product;
:func:`frozen_batchnorm_stats` guarantees both (and lets ``torch.func`` trace at all).

Example: the Hessian of :math:`\frac12 x^\top A x` is :math:`A`.

>>> import torch
>>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
>>> x = torch.tensor([1.0, -1.0], requires_grad=True)
>>> g = flat_grad(0.5 * x @ A @ x, [x], create_graph=True)
>>> hvp = hvp_double_backward(g, [x])
>>> hvp(torch.tensor([1.0, 0.0])).tolist()
[2.0, 1.0]
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "FlatView",
    "flat_grad",
    "hvp_double_backward",
    "functional_loss",
    "hvp_forward_over_reverse",
    "hvp_linearized",
    "frozen_batchnorm_stats",
    "dense_hessian",
    "function_hvp",
]

Operator = Callable[[Tensor], Tensor]


class FlatView:
    """One flat view of a list of parameters: their sizes, and moves between shapes.

    >>> a, b = torch.zeros(2, 3), torch.zeros(4)
    >>> view = FlatView([a, b])
    >>> view.numel
    10
    >>> [t.shape for t in view.split(torch.arange(10.0))]
    [torch.Size([2, 3]), torch.Size([4])]
    """

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)

    def flatten(self, tensors: Iterable[Optional[Tensor]]) -> Tensor:
        """Concatenate per-parameter tensors (``None`` reads as zeros) into one vector."""
        parts = [torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1) for t, p in zip(tensors, self.params)]
        return torch.cat(parts)

    def split(self, flat: Tensor) -> List[Tensor]:
        """Views of ``flat`` shaped like the parameters (no copies)."""
        return [t.view(s) for t, s in zip(flat.split(self.numels), self.shapes)]

    def get(self) -> Tensor:
        """The current parameter values as one (new) vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def add_(self, flat: Tensor, alpha: float = 1.0) -> None:
        """``params += alpha * flat`` in place."""
        torch._foreach_add_(self.params, self.split(flat), alpha=alpha)


def flat_grad(loss: Tensor, params: Sequence[Tensor], *, create_graph: bool = False) -> Tensor:
    """The gradient of a scalar ``loss`` as one vector; unused parameters get zeros."""
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return FlatView(params).flatten(grads)


def hvp_double_backward(flat_gradient: Tensor, params: Sequence[Tensor]) -> Operator:
    """``v -> H v`` by differentiating ``flat_gradient . v`` (the gradient must carry its graph).

    Each product is one backward pass through the gradient's graph; the graph is kept
    (``retain_graph``) until the operator is dropped.
    """
    view = FlatView(params)
    if not flat_gradient.requires_grad:
        # The gradient does not depend on the parameters (a linear loss, or create_graph
        # was forgotten): callers that mean the former get the zero operator.
        return lambda v: torch.zeros_like(v)

    def hvp(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(flat_gradient, view.params, grad_outputs=v, retain_graph=True, allow_unused=True)
        return view.flatten(hv).detach()

    def batched(vs: Tensor) -> Tensor:
        # rows of vs at once (autograd vmaps the backward): for dense Hessians of small nets
        hv = torch.autograd.grad(flat_gradient, view.params, grad_outputs=vs, retain_graph=True,
                                 allow_unused=True, is_grads_batched=True)
        return torch.cat([torch.zeros(vs.shape[0], p.numel(), dtype=vs.dtype, device=vs.device) if h is None
                          else h.reshape(vs.shape[0], -1) for h, p in zip(hv, view.params)], dim=1).detach()

    hvp.batched = batched
    return hvp


class _ClosureModule(nn.Module):
    # Lets torch.func.functional_call substitute parameters inside an arbitrary closure.
    def __init__(self, module: nn.Module, closure: Callable[[], Tensor]):
        super().__init__()
        self.module = module
        self.closure = closure

    def forward(self):
        return self.closure()


def functional_loss(closure: Callable[[], Tensor], module: nn.Module, params: Sequence[Tensor]):
    """The closure as a pure function of the given parameters: ``f(tuple_of_tensors) -> loss``.

    ``params`` must be parameters of ``module``; the closure may call the module as usual.
    """
    names = {id(p): n for n, p in module.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError("Invalid params: forward-over-reverse products need parameters that belong to `module`")
    keys = ["module." + names[id(p)] for p in params]
    wrapper = _ClosureModule(module, closure)

    def f(values: Sequence[Tensor]) -> Tensor:
        return torch.func.functional_call(wrapper, dict(zip(keys, values)), (), strict=False)

    return f


def hvp_forward_over_reverse(f: Callable, params: Sequence[Tensor]) -> Operator:
    """``v -> H v`` as ``jvp(grad(f))`` at ``params`` (each product re-runs forward and backward)."""
    view = FlatView(params)
    primals = tuple(p.detach() for p in params)
    grad_f = torch.func.grad(f)

    def hvp(v: Tensor) -> Tensor:
        _, tangent_out = torch.func.jvp(grad_f, (primals,), (tuple(view.split(v)),))
        return view.flatten(tangent_out)

    hvp.batched = torch.func.vmap(hvp)
    return hvp


def hvp_linearized(f: Callable, params: Sequence[Tensor]) -> Operator:
    """``v -> H v`` from ``torch.func.linearize(grad(f))``: the linearisation is traced once,
    then each product replays only the tangent computation (pays off over many products)."""
    view = FlatView(params)
    primals = tuple(p.detach() for p in params)
    _, jvp_fn = torch.func.linearize(lambda *ps: torch.func.grad(f)(ps), *primals)

    def hvp(v: Tensor) -> Tensor:
        return view.flatten(jvp_fn(*view.split(v)))

    return hvp


@contextlib.contextmanager
def frozen_batchnorm_stats(module: Optional[nn.Module]):
    """Within the block, BatchNorm layers in train mode use batch statistics but do not
    update their running statistics (nor ``num_batches_tracked``).

    Needed for Hessian-vector products and trial evaluations: one optimiser step should
    move the running averages once, and ``torch.func`` cannot trace in-place buffer updates.
    """
    layers = [] if module is None else [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    saved = [m.track_running_stats for m in layers]
    try:
        for m in layers:
            if m.training:
                m.track_running_stats = False
        yield
    finally:
        for m, s in zip(layers, saved):
            m.track_running_stats = s


def dense_hessian(hvp: Operator, n: int, *, dtype=None, device=None, chunk: int = 64) -> Tensor:
    """The full ``n x n`` Hessian from ``n`` Hessian-vector products (symmetrised).

    For analysis of small networks only (chapter 2's diagonal mass): cost ``n`` backprops,
    taken ``chunk`` at a time when the operator offers ``hvp.batched`` (the operators of
    this module do; a vmapped backward is several times faster than a loop).
    """
    eye = torch.eye(n, dtype=dtype, device=device)
    batched = getattr(hvp, "batched", None)
    if batched is not None:
        rows = torch.cat([batched(eye[i:i + chunk]) for i in range(0, n, chunk)], dim=0)
    else:
        rows = torch.stack([hvp(eye[i]) for i in range(n)], dim=0)
    return 0.5 * (rows + rows.T)


def function_hvp(fun: Callable[[Tensor], Tensor], x: Tensor):
    """For a function of one flat tensor: ``(value, gradient, hvp)`` at ``x`` by double backward.

    >>> value, grad, hvp = function_hvp(lambda x: (x ** 3).sum(), torch.tensor([1.0, 2.0]))
    >>> grad.tolist(), hvp(torch.ones(2)).tolist()
    ([3.0, 12.0], [6.0, 12.0])
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = fun(x)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError("Invalid fun: must return a scalar tensor")
        (grad,) = torch.autograd.grad(value, x, create_graph=True, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    if not grad.requires_grad:  # linear function: the Hessian is zero
        return value.detach().reshape(()), grad.detach(), lambda v: torch.zeros_like(v)

    def hvp(v: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad(grad, x, grad_outputs=v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.detach()

    return value.detach().reshape(()), grad.detach(), hvp
