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

Both return an :class:`Operator`: the one object the solvers, the norms and the counters
see (products, batched products, the dense matrix, scaling by an ellipsoid, counting).

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
    "Operator",
    "NonFiniteCurvatureError",
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


#: What the products accept where any callable ``v -> H v`` on flat tensors will do.
MatVec = Callable[[Tensor], Tensor]


class NonFiniteCurvatureError(FloatingPointError, ValueError):
    """A Hessian-vector product returned NaN or inf: the curvature is undefined at this point."""

    def __init__(self, message: str = "a Hessian-vector product returned NaN or inf: the curvature is not "
                                      "defined at this point (e.g. |w|^1.5 at w = 0)"):
        super().__init__(message)


class Operator:
    r"""A symmetric linear operator :math:`v \mapsto H v` on flat tensors of one size, dtype and device.

    ``op(v)`` (or ``op.mv(v)``) is one product; ``op.batched(V)`` applies it to the rows of
    ``V`` (vectorised when the source allows, else row by row); ``op.dense()`` is the matrix
    (free for an operator made :meth:`from_matrix`, ``size`` products otherwise);
    ``op.scaled(d)`` is :math:`DHD` with :math:`D = \operatorname{diag}(d)` (an ellipsoid's
    change of variables); ``op.counted(counts)`` adds ``weight`` to ``counts[key]`` per product.

    The shape of every product is checked (a product of the wrong shape is a ``ValueError``);
    its finiteness is left to the solvers, which look at it where they synchronise anyway.

    >>> op = Operator.from_matrix(torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
    >>> counts = {"hvp": 0}
    >>> op.scaled(torch.tensor([1.0, 2.0])).counted(counts)(torch.ones(2)).tolist(), counts
    ([2.0, -4.0], {'hvp': 1})
    """

    def __init__(self, matvec: MatVec, size: int, *, dtype, device,
                 batched: Optional[Callable[[Tensor], Tensor]] = None, matrix: Optional[Tensor] = None,
                 checked: bool = True):
        self.size, self.dtype, self.device = int(size), dtype, torch.device(device)
        self.matrix = matrix
        self._matvec, self._batched, self._checked = matvec, batched, checked

    @classmethod
    def from_matrix(cls, matrix: Tensor) -> "Operator":
        if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Invalid hvp: a dense Hessian must be a square matrix, got {getattr(matrix, 'shape', matrix)!r}")
        return cls(lambda v: matrix @ v, matrix.shape[0], dtype=matrix.dtype, device=matrix.device,
                   batched=lambda vs: vs @ matrix.T, matrix=matrix)

    def mv(self, v: Tensor) -> Tensor:
        hv = self._matvec(v)
        if self._checked and (not isinstance(hv, Tensor) or hv.shape != v.shape):
            raise ValueError(f"Invalid hvp: returned {getattr(hv, 'shape', type(hv).__name__)} "
                             f"for a vector of shape {tuple(v.shape)}")
        return hv

    __call__ = mv

    def batched(self, vs: Tensor) -> Tensor:
        """The products with the rows of ``vs`` (a ``m x size`` tensor), as rows."""
        if self._batched is None:
            return torch.stack([self.mv(v) for v in vs])
        return self._batched(vs)

    def dense(self, chunk: int = 64) -> Tensor:
        """The ``size x size`` matrix (symmetrised when it is built from products)."""
        if self.matrix is not None:
            return self.matrix
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        rows = torch.cat([self.batched(eye[i:i + chunk]) for i in range(0, self.size, chunk)])
        return 0.5 * (rows + rows.T)

    def scaled(self, d: Tensor) -> "Operator":
        """:math:`v \\mapsto d \\odot H (d \\odot v)`."""
        return Operator(lambda v: d * self.mv(d * v), self.size, dtype=self.dtype, device=self.device,
                        batched=lambda vs: d * self.batched(d * vs), checked=False,
                        matrix=None if self.matrix is None else d[:, None] * self.matrix * d[None, :])

    def counted(self, counts: Dict[str, float], key: str = "hvp", weight: float = 1) -> "Operator":
        """The same operator, adding ``weight`` to ``counts[key]`` per product (a sub-sampled
        product may weigh its fraction of the batch)."""
        def mv(v):
            counts[key] += weight
            return self.mv(v)

        def batched(vs):
            counts[key] += weight * vs.shape[0]
            return self.batched(vs)

        return Operator(mv, self.size, dtype=self.dtype, device=self.device, batched=batched, matrix=self.matrix,
                        checked=False)



def as_operator(hvp, like: Tensor) -> Operator:
    """An :class:`Operator` from an operator, a dense square tensor or a callable ``v -> H v``."""
    if isinstance(hvp, Operator):
        op = hvp
    elif isinstance(hvp, Tensor):
        op = Operator.from_matrix(hvp)
    elif callable(hvp):
        op = Operator(hvp, like.numel(), dtype=like.dtype, device=like.device, batched=getattr(hvp, "batched", None))
    else:
        raise ValueError("Invalid hvp: expected a callable v -> H v, a square tensor or a trlib.curvature.Operator")
    if op.size != like.numel():
        raise ValueError(f"Invalid hvp: an operator of size {op.size} for a gradient of size {like.numel()}")
    return op


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
    (``retain_graph``) until the operator is dropped. A gradient without a graph (a linear
    loss) gives the zero operator.
    """
    view = FlatView(params)
    like = flat_gradient

    def hvp(v: Tensor) -> Tensor:
        if not flat_gradient.requires_grad:
            return torch.zeros_like(v)
        hv = torch.autograd.grad(flat_gradient, view.params, grad_outputs=v, retain_graph=True, allow_unused=True)
        return view.flatten(hv).detach()

    def batched(vs: Tensor) -> Tensor:
        # rows of vs at once (autograd vmaps the backward): for dense Hessians of small nets
        if not flat_gradient.requires_grad:
            return torch.zeros_like(vs)
        hv = torch.autograd.grad(flat_gradient, view.params, grad_outputs=vs, retain_graph=True,
                                 allow_unused=True, is_grads_batched=True)
        return torch.cat([torch.zeros(vs.shape[0], p.numel(), dtype=vs.dtype, device=vs.device) if h is None
                          else h.reshape(vs.shape[0], -1) for h, p in zip(hv, view.params)], dim=1).detach()

    return Operator(hvp, like.numel(), dtype=like.dtype, device=like.device, batched=batched)


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
    """``v -> H v`` as ``jvp(grad(f))`` at ``params`` (each product re-runs forward and backward).

    Some losses have no forward-mode rule for their backward (``huber_loss``,
    ``soft_margin_loss``) or a broken one (mean-reduced ``mse_loss``: "ZeroTensors are
    immutable"). For those the products switch, on the first failure, to reverse-over-reverse
    through ``torch.func.vjp`` of the gradient: the same product (the Hessian is symmetric) and
    the same memory profile, at one more backward pass. A loss that neither mode can
    differentiate twice ends in a ``ValueError`` that quotes torch's message.
    """
    view = FlatView(params)
    primals = tuple(p.detach() for p in params)
    grad_f = torch.func.grad(f)
    mode = ["jvp"]

    def product(tangents):
        if mode[0] == "jvp":
            try:
                return torch.func.jvp(grad_f, (primals,), (tangents,))[1]
            except (NotImplementedError, RuntimeError) as exc:
                if "forward AD" not in str(exc) and "ZeroTensor" not in str(exc):
                    raise
                mode[0] = "vjp"
        try:
            return torch.func.vjp(grad_f, primals)[1](tangents)[0]
        except (NotImplementedError, RuntimeError) as exc:
            raise ValueError(f"Invalid loss: the closure's loss cannot be differentiated twice ({exc})") from exc

    def hvp(v: Tensor) -> Tensor:
        return view.flatten(product(tuple(view.split(v))))

    return Operator(hvp, view.numel, dtype=primals[0].dtype, device=primals[0].device)


def hvp_linearized(f: Callable, params: Sequence[Tensor]) -> Operator:
    """``v -> H v`` from ``torch.func.linearize(grad(f))``: the linearisation is traced once,
    then each product replays only the tangent computation (pays off over many products)."""
    view = FlatView(params)
    primals = tuple(p.detach() for p in params)
    _, jvp_fn = torch.func.linearize(lambda *ps: torch.func.grad(f)(ps), *primals)
    return Operator(lambda v: view.flatten(jvp_fn(*view.split(v))), view.numel, dtype=primals[0].dtype,
                    device=primals[0].device)


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


def dense_hessian(hvp, n: int, *, dtype=None, device=None, chunk: int = 64) -> Tensor:
    """The full ``n x n`` Hessian from ``n`` Hessian-vector products (symmetrised).

    For analysis of small networks only (chapter 2's diagonal mass): cost ``n`` backprops,
    taken ``chunk`` at a time when the operator offers batched products (the operators of
    this module do; a vmapped backward is several times faster than a loop).
    """
    if not isinstance(hvp, Operator):
        hvp = Operator(hvp, n, dtype=dtype or torch.get_default_dtype(), device=device or "cpu",
                       batched=getattr(hvp, "batched", None))
    return hvp.dense(chunk)


def function_hvp(fun: Callable[[Tensor], Tensor], x: Tensor):
    """For a function of one flat tensor: ``(value, gradient, operator)`` at ``x`` by double backward.

    >>> value, grad, hvp = function_hvp(lambda x: (x ** 3).sum(), torch.tensor([1.0, 2.0]))
    >>> grad.tolist(), hvp(torch.ones(2)).tolist()
    ([3.0, 12.0], [6.0, 12.0])
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = fun(x)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError("Invalid fun: must return a scalar tensor")
        grad = flat_grad(value, [x], create_graph=True)
    return value.detach().reshape(()), grad.detach(), hvp_double_backward(grad, [x])
