r"""Curvature through the network's outputs: generalised Gauss-Newton products and per-sample gradients.

Write the loss on a batch as :math:`\mathcal L(w) = L(f(w))`, with :math:`f(w)` all the
network's outputs on the batch and :math:`L` the loss as a function of them. With
:math:`J = \partial f / \partial w`,

.. math:: \nabla^2 \mathcal L = J^\top \nabla^2 L\, J + \sum_k \frac{\partial L}{\partial f_k} \nabla^2 f_k ,

and the *generalised Gauss-Newton* matrix keeps the first term, :math:`G = J^\top H_L J`
(Schraudolph 2002). When :math:`L` is convex in the outputs (cross-entropy on logits, squared
error), :math:`H_L \succeq 0`, so :math:`G \succeq 0` everywhere: a curvature without
negative directions, equal to the Hessian when the network is linear in :math:`w` and close to
it when the residual term is small. A product costs one forward-mode pass (:math:`Jv`), a
closed-form :math:`H_L` and one backward pass (:math:`J^\top u`).

The *empirical Fisher* :math:`\frac1B \sum_i \nabla\ell_i \nabla\ell_i^\top` has the same
shape with the outer product of the loss gradients in place of :math:`H_L`; its diagonal (the
:class:`trlib.norms.EmpiricalFisher` ellipsoid) needs the per-sample gradients
(:func:`per_sample_gradients`).

Example: for a linear model the Gauss-Newton matrix *is* the Hessian.

>>> import torch, trlib
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> net = nn.Linear(3, 2).double()
>>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
>>> G = ggn_operator(net, x, y, "cross_entropy")
>>> params = list(net.parameters())
>>> g = trlib.flat_grad(nn.functional.cross_entropy(net(x), y), params, create_graph=True)
>>> v = torch.randn(8, dtype=torch.float64)
>>> torch.allclose(G(v), trlib.curvature.hvp_double_backward(g, params)(v))
True
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .curvature import FlatView, Operator, frozen_batchnorm_stats

__all__ = ["ggn_operator", "per_sample_gradients", "GGN_LOSSES"]

#: loss name -> (its torch.nn.functional form, its module)
_LOSSES = {"cross_entropy": (F.cross_entropy, nn.CrossEntropyLoss), "mse": (F.mse_loss, nn.MSELoss)}
GGN_LOSSES = tuple(_LOSSES)


def _loss_name_and_reduction(loss, reduction: Optional[str]):
    """('cross_entropy' | 'mse', 'mean' | 'sum') from a name, a torch.nn.functional loss or a loss module."""
    name = next((n for n, (function, module) in _LOSSES.items()
                 if loss is function or isinstance(loss, module) or (isinstance(loss, str) and loss == n)), None)
    if name is None:
        raise ValueError(f"Invalid loss: {loss!r}; GGN products need a loss convex in the network's outputs with a "
                         f"known output-space Hessian: one of {GGN_LOSSES} (or F.cross_entropy, F.mse_loss, "
                         f"nn.CrossEntropyLoss, nn.MSELoss)")
    if getattr(loss, "weight", None) is not None:
        raise ValueError("Invalid loss: class weights in CrossEntropyLoss are not supported by GGN products")
    reduction = reduction or getattr(loss, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Invalid reduction: {reduction!r} (expected 'mean' or 'sum')")
    return name, reduction


def _parameters(module: nn.Module, params: Optional[Sequence[Tensor]]):
    names = {id(p): n for n, p in module.named_parameters()}
    params = [p for p in module.parameters() if p.requires_grad] if params is None else list(params)
    if not params or any(id(p) not in names for p in params):
        raise ValueError("Invalid params: must be a non-empty list of parameters of `module`")
    return params, [names[id(p)] for p in params]


def _output_hessian(name: str, reduction: str, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
    """``u -> H_L u`` in output space, closed form, for the batch's ``outputs``."""
    if name == "cross_entropy":
        if outputs.ndim != 2:
            raise ValueError(f"Invalid outputs: cross-entropy GGN products need (batch, classes) logits, "
                             f"got shape {tuple(outputs.shape)}")
        if targets.shape[0] != outputs.shape[0]:
            raise ValueError(f"Invalid targets: {targets.shape[0]} targets for {outputs.shape[0]} outputs")
        if not targets.is_floating_point() and bool(torch.any(targets < 0)):
            raise ValueError("Invalid targets: negative class indices (ignore_index) are not supported")
        p = torch.softmax(outputs.detach(), dim=1)
        scale = 1.0 / outputs.shape[0] if reduction == "mean" else 1.0
        # per sample: (diag(p) - p p^T) u, whatever the labels (soft or hard)
        return lambda u: scale * (p * u - p * (p * u).sum(1, keepdim=True))
    if outputs.shape != targets.shape:
        raise ValueError(f"Invalid targets: shape {tuple(targets.shape)} for outputs of shape {tuple(outputs.shape)}")
    factor = 2.0 / outputs.numel() if reduction == "mean" else 2.0
    return lambda u: factor * u


def ggn_operator(module: nn.Module, inputs: Tensor, targets: Tensor, loss: Union[str, Callable] = "cross_entropy", *,
                 params: Optional[Sequence[Tensor]] = None, reduction: Optional[str] = None) -> Operator:
    r"""``v -> G v`` with :math:`G = J^\top H_L J`, the generalised Gauss-Newton matrix of a batch.

    For the outputs :math:`f = f(w; x)` of ``module`` on ``inputs`` and the loss
    :math:`L(f, y)`:

    * cross-entropy on logits, per sample :math:`H_L = \operatorname{diag}(p) - p p^\top`
      with :math:`p = \operatorname{softmax}(f)` (divided by :math:`B` for ``"mean"``);
    * squared error, :math:`H_L = 2I` (divided by the number of output entries for ``"mean"``,
      as ``F.mse_loss`` does).

    Each product is :math:`J^\top (H_L (J v))`: a ``torch.func.jvp`` of the outputs, the
    closed form, and a ``torch.func.vjp`` whose graph is recorded once, here. BatchNorm layers
    in train mode use the batch's statistics and their running statistics are left alone
    (:func:`trlib.curvature.frozen_batchnorm_stats`). Any other loss raises ``ValueError``:
    without convexity in the outputs :math:`G` would not be positive semidefinite.

    Args:
        module: the network; its parameters (or ``params``) are the variables.
        inputs, targets: the batch (``targets`` as the loss takes them: class indices or
            probabilities for cross-entropy, a tensor shaped like the outputs for MSE).
        loss: ``"cross_entropy"``, ``"mse"``, ``F.cross_entropy``, ``F.mse_loss``, or an
            ``nn.CrossEntropyLoss`` / ``nn.MSELoss`` (whose reduction is used).
        params: a subset of the module's parameters (default: those requiring grad), in the
            order of the flat vectors.
        reduction: ``"mean"`` (default) or ``"sum"``, as in the loss.

    Returns:
        A :class:`trlib.curvature.Operator`, usable wherever a Hessian-vector product is
        (``.batched`` applies it to rows at once, vectorised).

    References: Schraudolph, *Neural Computation* 14 (2002); Martens, *New insights and
    perspectives on the natural gradient method*, JMLR 21 (2020).
    """
    name, reduction = _loss_name_and_reduction(loss, reduction)
    params, names = _parameters(module, params)
    view = FlatView(params)
    primals = tuple(p.detach() for p in params)

    def outputs_of(values):
        return torch.func.functional_call(module, dict(zip(names, values)), (inputs,), strict=False)

    with frozen_batchnorm_stats(module):
        outputs, pullback = torch.func.vjp(outputs_of, primals)
    output_hessian = _output_hessian(name, reduction, outputs, targets)

    def ggn(v: Tensor) -> Tensor:
        with frozen_batchnorm_stats(module):
            _, jv = torch.func.jvp(outputs_of, (primals,), (tuple(view.split(v)),))
        return view.flatten(pullback(output_hessian(jv))[0])

    return Operator(ggn, view.numel, dtype=primals[0].dtype, device=primals[0].device, batched=torch.func.vmap(ggn))


def per_sample_gradients(module: nn.Module, inputs: Tensor, targets: Tensor, loss: Union[str, Callable] = "cross_entropy",
                         *, params: Optional[Sequence[Tensor]] = None, chunk: Optional[int] = None) -> Tensor:
    r"""The gradients :math:`\nabla \ell_i(w)` of every sample's loss, as rows of a ``(B, n)`` tensor.

    :math:`\ell_i` is ``loss`` on sample :math:`i` alone, so the batch loss with
    ``reduction="mean"`` is :math:`\frac1B\sum_i \ell_i` and the rows average to its gradient.
    Computed by ``torch.func.vmap(torch.func.grad(...))`` over the samples (``chunk`` at a time,
    default all), which costs about one batched backward pass, not :math:`B`.

    BatchNorm in train mode mixes the samples of a batch, so a per-sample gradient is not
    defined there: that raises ``ValueError`` (use eval mode, or GroupNorm/LayerNorm).
    Stochastic layers (dropout) draw independent randomness per sample.

    Args:
        module, inputs, targets: the network and the batch (first dimension: samples).
        loss: ``"cross_entropy"``, ``"mse"`` or any ``loss(outputs, targets)`` callable
            returning the mean loss of its batch.
        params: a subset of the module's parameters (default: those requiring grad).
        chunk: samples per vectorised call (memory: ``chunk`` copies of the activations).

    >>> import trlib
    >>> net = nn.Linear(2, 1).double()
    >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
    >>> G = per_sample_gradients(net, x, y, "mse")
    >>> torch.allclose(G.mean(0), trlib.flat_grad(F.mse_loss(net(x), y), list(net.parameters())))
    True

    Reference: Goodfellow, *Efficient per-example gradient computations* (2015).
    """
    if any(isinstance(m, nn.modules.batchnorm._NormBase) and m.training for m in module.modules()):
        raise ValueError("Invalid module: BatchNorm in train mode mixes the samples of a batch, so per-sample "
                         "gradients are undefined; use module.eval() or a per-sample normalisation")
    loss_fn = _LOSSES[loss][0] if isinstance(loss, str) and loss in _LOSSES else loss
    if not callable(loss_fn):
        raise ValueError(f"Invalid loss: {loss!r} (expected 'cross_entropy', 'mse' or a callable)")
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ValueError(f"Invalid batch: {inputs.shape[0]} inputs and {targets.shape[0]} targets")
    params, names = _parameters(module, params)
    primals = tuple(p.detach() for p in params)
    chunk = inputs.shape[0] if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"Invalid chunk: {chunk!r} (must be a positive int)")

    def sample_loss(values, x, y):
        out = torch.func.functional_call(module, dict(zip(names, values)), (x.unsqueeze(0),), strict=False)
        return loss_fn(out, y.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    rows: List[Tensor] = []
    for i in range(0, inputs.shape[0], chunk):
        grads = per_sample(primals, inputs[i:i + chunk], targets[i:i + chunk])
        rows.append(torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1))
    return torch.cat(rows).detach()
