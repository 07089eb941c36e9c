r"""Curvature analysis of a symmetric operator: extreme eigenpairs, traces, diagonals, densities.

Everything here needs only products :math:`v \mapsto Hv` (a callable on flat tensors, such as
the Hessian-vector products of :mod:`trlib.curvature`), never the matrix:

* :func:`eigenpairs`: the :math:`k` largest (or smallest) eigenpairs by Lanczos with full
  reorthogonalisation, stopped on a stated residual tolerance;
* :func:`hutchinson_trace`, :func:`hutchinson_diagonal`: unbiased estimates of
  :math:`\operatorname{tr} H` and :math:`\operatorname{diag} H` from Rademacher probes, with
  their standard errors;
* :func:`spectral_density`: the eigenvalue distribution by stochastic Lanczos quadrature;
* :func:`diagonal_mass`: the paper's :math:`\delta_A` of a dense matrix.

Vectors stay on the operator's device and in its dtype. The Lanczos routines synchronise
once per product (:class:`trlib.lanczos.Lanczos`); the Hutchinson estimators never do.
Results computed from the small tridiagonal matrices (eigenvalues, quadrature nodes) are
float64 tensors on the CPU.

Example: a diagonal operator, whose spectrum we know.

>>> import torch
>>> d = torch.linspace(-1.0, 4.0, 200, dtype=torch.float64)
>>> top = eigenpairs(lambda v: d * v, d, k=2)
>>> [round(x, 6) for x in top.values.tolist()]
[4.0, 3.974874]
>>> round(float(hutchinson_trace(lambda v: d * v, d).value), 6)   # exact: a diagonal H has no variance
300.0
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .curvature import MatVec
from .lanczos import Lanczos

__all__ = ["Eigenpairs", "eigenpairs", "Estimate", "hutchinson_trace", "hutchinson_diagonal",
           "SpectralDensity", "spectral_density", "diagonal_mass"]

Probes = Union[int, Tensor]


def _check(matvec, like: Tensor) -> None:
    if not isinstance(like, Tensor) or like.ndim != 1 or not like.is_floating_point() or like.numel() == 0:
        raise ValueError("Invalid like: expected a non-empty 1-D floating-point tensor with the operator's size, "
                         "dtype and device (the flat gradient, say)")
    if not callable(matvec):
        raise ValueError("Invalid matvec: expected a callable v -> H v on flat tensors")


def _default_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    # a fixed seed by default: the same call gives the same numbers
    return torch.Generator(device="cpu").manual_seed(0) if generator is None else generator


def _probe_matrix(probes: Probes, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Rows of Rademacher signs (drawn with ``generator``), or the user's probes checked."""
    n = like.numel()
    if isinstance(probes, Tensor):
        if probes.ndim != 2 or probes.shape[1] != n or probes.shape[0] == 0:
            raise ValueError(f"Invalid probes: a tensor of probes must have shape (m, {n}) with m >= 1")
        if not bool(torch.all(torch.isfinite(probes))):
            raise ValueError("Invalid probes: contain NaN or inf")
        return probes.to(device=like.device, dtype=like.dtype)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"Invalid probes: {probes!r} (expected a positive int or an (m, n) tensor)")
    generator = _default_generator(generator)
    signs = torch.randint(0, 2, (probes, n), generator=generator, device=generator.device)
    return (2 * signs - 1).to(device=like.device, dtype=like.dtype)


# ----------------------------------------------------------------------------- eigenpairs
@dataclass
class Eigenpairs:
    """Extreme eigenpairs of a symmetric operator.

    ``values``: the Ritz values, float64 on the CPU, in the order asked for (largest first
    for ``"largest"`` and ``"magnitude"``, smallest first for ``"smallest"``);
    ``vectors``: one unit eigenvector per row (operator's dtype and device);
    ``residuals``: :math:`\\|Hv_i - \\theta_i v_i\\|` as Lanczos measures it;
    ``products``: operator applications used; ``converged``: every residual met the tolerance.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    products: int
    converged: bool


_WHICH = ("largest", "smallest", "magnitude")


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "largest":
        return np.argsort(-theta, kind="stable")[:k]
    if which == "smallest":
        return np.argsort(theta, kind="stable")[:k]
    return np.argsort(-np.abs(theta), kind="stable")[:k]


def eigenpairs(matvec: MatVec, like: Tensor, k: int = 1, *, which: str = "largest", tol: float = 1e-6,
               max_iter: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Eigenpairs:
    r"""The ``k`` extreme eigenpairs of a symmetric operator, by Lanczos with full reorthogonalisation.

    Lanczos from a random start builds :math:`T_m = Q_m^\top H Q_m`; its eigenpairs
    :math:`(\theta_i, y_i)` give Ritz pairs :math:`(\theta_i, Q_m y_i)` whose residual is
    known without another product,

    .. math:: \|H Q_m y_i - \theta_i Q_m y_i\| = \beta_{m+1} |e_m^\top y_i| =: r_i .

    The iteration stops once the ``k`` selected pairs all have :math:`r_i \le \mathrm{tol}
    \cdot \max_j |\theta_j|`. Each returned value then lies within :math:`r_i` of an
    eigenvalue of :math:`H` (Kahan's residual bound for symmetric matrices), and a vector's
    angle to its eigenspace is at most :math:`r_i / \mathrm{gap}_i`.

    Like ARPACK (``scipy.sparse.linalg.eigsh``), one Krylov space holds one vector of each
    eigenspace: an eigenvalue of multiplicity :math:`p` is returned once unless the space
    becomes invariant, where :class:`~trlib.lanczos.Lanczos` restarts in its complement and
    finds the other copies. To keep the extreme values from being missed, at least
    :math:`\min(n, \max(2k+1, 20))` products are taken in each Lanczos block.

    Args:
        matvec: ``v -> H v`` on 1-D tensors (symmetric :math:`H`).
        like: a 1-D tensor with the operator's size, dtype and device.
        k: how many pairs (at most the dimension).
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or ``"magnitude"``.
        tol: relative residual tolerance.
        max_iter: most products (default: the dimension); a :class:`RuntimeWarning` says so
            when it stops the iteration before convergence.
        generator: random numbers for the start (and for restarts); default: seed 0.

    Returns:
        :class:`Eigenpairs`. Memory: the Lanczos basis, ``products x n`` entries.

    >>> H = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    >>> low = eigenpairs(lambda v: H @ v, torch.zeros(3, dtype=torch.float64), k=2, which="smallest")
    >>> [round(x, 8) for x in low.values.tolist()], low.converged
    ([-1.0, 1.0], True)

    References: Golub & Van Loan, *Matrix Computations* (2013), §10.1-10.3; Parlett, *The
    Symmetric Eigenvalue Problem* (1998), Theorem 4.5.1 (Kahan); Yao, Gholami, Keutzer &
    Mahoney, *PyHessian* (2020).
    """
    _check(matvec, like)
    n = like.numel()
    if which not in _WHICH:
        raise ValueError(f"Invalid which: {which!r}; expected one of {_WHICH}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"Invalid k: {k!r} (must be an int in [1, {n}])")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"Invalid tol: {tol!r} (must be a finite float >= 0)")
    max_iter = n if max_iter is None else max_iter
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k:
        raise ValueError(f"Invalid max_iter: {max_iter!r} (must be an int >= k)")
    max_iter = min(max_iter, n)
    per_block = max(2 * k + 1, 20)

    lz = Lanczos(matvec, torch.zeros_like(like), generator=_default_generator(generator))
    while True:
        lz.step()
        theta, y = lz.eigh()
        chosen = _select(theta, k, which)
        residuals = lz.last_beta * np.abs(y[-1, chosen])
        converged = lz.exhausted or (lz.k >= k and bool(np.all(residuals <= tol * max(np.abs(theta).max(), 1e-300))))
        # a fresh block (after a breakdown) must look around before its Ritz values are trusted
        explored = lz.k - lz.block_starts[-1] >= min(n - lz.block_starts[-1], per_block) and not lz.broke_down
        if (converged and (explored or lz.exhausted)) or lz.k >= max_iter:
            break
    if lz.exhausted:
        residuals = np.zeros(len(chosen))  # the basis spans the space: T is H in another basis
    if not converged:
        warnings.warn(f"eigenpairs: max_iter={max_iter} products reached before the residuals met tol={tol} "
                      f"(largest residual {residuals.max():.3g})", RuntimeWarning, stacklevel=2)
    vectors = lz.combine(y[:, chosen]).T.contiguous()
    return Eigenpairs(torch.from_numpy(theta[chosen].copy()), vectors, torch.from_numpy(residuals),
                      lz.k, bool(converged))


# ----------------------------------------------------------------------------- Hutchinson
@dataclass
class Estimate:
    """A Monte Carlo estimate: ``value``, its ``stderr`` (the standard error of the mean over
    the probes, same shape; NaN with a single probe) and the ``products`` it cost. Both
    tensors are on the operator's device."""

    value: Tensor
    stderr: Tensor
    products: int


def _probe_products(matvec: MatVec, probes: Tensor, chunk: int) -> Iterator[Tuple[Tensor, Tensor]]:
    # (Z, HZ) a chunk of rows at a time: one vmapped call when the operator offers `.batched`
    batched = getattr(matvec, "batched", None)
    for i in range(0, probes.shape[0], chunk):
        z = probes[i:i + chunk]
        hz = batched(z) if batched is not None else torch.stack([matvec(row) for row in z])
        yield z, hz


def _mean_and_stderr(samples: Iterator[Tensor], count: int, dtype) -> Tuple[Tensor, Tensor]:
    # float64 sums: the variance is a difference of two large sums
    total = total_sq = None
    for s in samples:
        s = s.to(torch.float64)
        part, part_sq = s.sum(0), (s * s).sum(0)
        total = part if total is None else total + part
        total_sq = part_sq if total_sq is None else total_sq + part_sq
    mean = total / count
    var = (total_sq - count * mean * mean).clamp_min(0) / (count - 1) if count > 1 else torch.full_like(mean, math.nan)
    return mean.to(dtype), (var / count).sqrt().to(dtype)


def _hutchinson(matvec, like, probes, chunk, generator, reduce):
    _check(matvec, like)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"Invalid chunk: {chunk!r} (must be a positive int)")
    z = _probe_matrix(probes, like, generator)
    value, stderr = _mean_and_stderr((reduce(zc, hz) for zc, hz in _probe_products(matvec, z, chunk)),
                                     z.shape[0], like.dtype)
    return Estimate(value, stderr, z.shape[0])


def hutchinson_trace(matvec: MatVec, like: Tensor, probes: Probes = 100, *, chunk: int = 16,
                     generator: Optional[torch.Generator] = None) -> Estimate:
    r"""Hutchinson's estimate of :math:`\operatorname{tr} H` from Rademacher probes.

    With :math:`z` of independent random signs, :math:`\mathbb E[z z^\top] = I`, so

    .. math:: \operatorname{tr} H = \mathbb E[z^\top H z] \approx \frac1m \sum_{j=1}^m z_j^\top H z_j,
              \qquad \operatorname{Var}[z^\top H z] = 2 \sum_{i \ne j} H_{ij}^2 ,

    the smallest variance among probe distributions with that mean (Hutchinson 1990). A
    diagonal :math:`H` is estimated exactly.

    Args:
        matvec: ``v -> H v``; when it has ``matvec.batched`` (rows at once, like the
            operators of :mod:`trlib.curvature`), ``chunk`` probes go through one call.
        like: a 1-D tensor with the operator's size, dtype and device.
        probes: how many random probes (``m``), or an ``(m, n)`` tensor of probe vectors.
        chunk: probes per batched call (memory: ``chunk x n``).
        generator: random numbers for the probes; default: seed 0.

    Returns:
        :class:`Estimate` with a 0-d ``value``; no host synchronisation.

    >>> H = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
    >>> signs = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)   # both sign patterns
    >>> float(hutchinson_trace(lambda v: H @ v, signs[0], probes=signs).value)
    -1.0

    References: Hutchinson, *Commun. Stat. Simul. Comput.* 19 (1990); Avron & Toledo,
    *J. ACM* 58 (2011).
    """
    return _hutchinson(matvec, like, probes, chunk, generator, lambda z, hz: (z * hz).sum(1))


def hutchinson_diagonal(matvec: MatVec, like: Tensor, probes: Probes = 100, *, chunk: int = 16,
                        generator: Optional[torch.Generator] = None) -> Estimate:
    r"""The estimate of :math:`\operatorname{diag} H` of Bekas, Kokiopoulou & Saad (2007).

    .. math:: \operatorname{diag} H = \mathbb E[z \odot Hz] \approx \frac1m \sum_{j=1}^m z_j \odot H z_j,
              \qquad \operatorname{Var}[(z \odot Hz)_i] = \sum_{j \ne i} H_{ij}^2

    for Rademacher :math:`z` (the off-diagonal entries of row :math:`i` are the noise, so a
    diagonally dominant :math:`H` is estimated well). Arguments as :func:`hutchinson_trace`.

    >>> H = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
    >>> signs = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    >>> hutchinson_diagonal(lambda v: H @ v, signs[0], probes=signs).value.tolist()
    [2.0, -3.0]

    Reference: Bekas, Kokiopoulou & Saad, *Applied Numerical Mathematics* 57 (2007).
    """
    return _hutchinson(matvec, like, probes, chunk, generator, lambda z, hz: z * hz)


# ----------------------------------------------------------------------------- spectral density
@dataclass
class SpectralDensity:
    r"""A spectral density :math:`\phi(t) = \frac1n \sum_i \delta(t - \lambda_i)` estimated by
    Gauss quadrature: ``nodes[j]`` and ``weights[j]`` (float64, CPU, one row per probe; rows
    shorter than ``steps`` after a Lanczos breakdown are padded with zero weights). Each row's
    weights sum to one.
    """

    nodes: Tensor
    weights: Tensor
    products: int

    def moment(self, power: int) -> float:
        r""":math:`\frac1n \operatorname{tr} H^p \approx \frac1m \sum_j \sum_l \tau_{jl} \theta_{jl}^p`."""
        return float((self.weights * self.nodes**power).sum(1).mean())

    def cdf(self, t) -> Tensor:
        """The estimated fraction of eigenvalues :math:`\\le t` (``t`` a number or a 1-D tensor)."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1)
        return ((self.nodes <= t) * self.weights).sum(2).mean(1)

    def density(self, grid, sigma: Optional[float] = None) -> Tensor:
        r"""The quadrature broadened by Gaussians of width ``sigma`` on ``grid`` (integrates to one):
        :math:`\hat\phi(t) = \frac1m \sum_{j,l} \tau_{jl}\, \mathcal N(t; \theta_{jl}, \sigma^2)`.
        Default ``sigma``: 1% of the range of the nodes."""
        grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1, 1, 1)
        if sigma is None:
            used = self.nodes[self.weights > 0]
            sigma = 0.01 * float(used.max() - used.min()) if used.numel() > 1 else 1.0
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"Invalid sigma: {sigma!r} (must be positive)")
        bumps = torch.exp(-0.5 * ((grid - self.nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (bumps * self.weights).sum(2).mean(1)


def spectral_density(matvec: MatVec, like: Tensor, probes: Probes = 10, steps: int = 30, *,
                     generator: Optional[torch.Generator] = None) -> SpectralDensity:
    r"""The eigenvalue distribution of a symmetric operator by stochastic Lanczos quadrature.

    For a unit probe :math:`v` and :math:`H = \sum_i \lambda_i u_i u_i^\top`,
    :math:`v^\top f(H) v = \sum_i (u_i^\top v)^2 f(\lambda_i)` is an integral against a
    measure whose expectation over Rademacher probes :math:`v = z/\sqrt n` is the spectral
    density :math:`\phi`. ``steps`` Lanczos steps from :math:`v` give its Gauss quadrature:
    with :math:`T = Y \Theta Y^\top`,

    .. math:: v^\top f(H) v \approx \sum_{l=1}^{s} \tau_l f(\theta_l), \qquad \tau_l = (e_1^\top y_l)^2,

    exact for polynomials of degree up to :math:`2s - 1`. Averaging over probes gives the
    density estimate (:class:`SpectralDensity`).

    Args:
        matvec: ``v -> H v`` (symmetric).
        like: a 1-D tensor with the operator's size, dtype and device.
        probes: how many Rademacher probes, or an ``(m, n)`` tensor of start vectors
            (normalised here).
        steps: Lanczos steps per probe (a probe stops early if its Krylov space is invariant).
        generator: random numbers for the probes; default: seed 0.

    Returns:
        :class:`SpectralDensity`; ``products`` is the total over the probes.

    >>> d = torch.arange(1.0, 11.0, dtype=torch.float64)
    >>> sld = spectral_density(lambda v: d * v, d, probes=4, steps=10)
    >>> round(sld.moment(1), 10), round(sld.moment(2), 10)   # tr(H)/n and tr(H^2)/n
    (5.5, 38.5)

    References: Golub & Meurant, *Matrices, Moments and Quadrature* (2010); Lin, Saad & Yang,
    *SIAM Review* 58 (2016); Ubaru, Chen & Saad, *SIMAX* 38 (2017); Ghorbani, Krishnan & Xiao,
    *ICML* (2019).
    """
    _check(matvec, like)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r} (must be a positive int)")
    z = _probe_matrix(probes, like, generator)
    if bool(torch.any(torch.linalg.vector_norm(z, dim=1) == 0)):
        raise ValueError("Invalid probes: a probe vector is zero")
    steps = min(steps, like.numel())
    nodes = torch.zeros(z.shape[0], steps, dtype=torch.float64)
    weights = torch.zeros_like(nodes)
    products = 0
    for j, probe in enumerate(z):
        lz = Lanczos(matvec, probe)
        while lz.k < steps:
            lz.step()
            if lz.broke_down or lz.exhausted:
                break  # invariant Krylov space: the quadrature is exact for this probe
        theta, y = lz.eigh()  # the first block only: a restart's vector is not stepped yet
        nodes[j, :len(theta)] = torch.from_numpy(theta)
        weights[j, :len(theta)] = torch.from_numpy(y[0] ** 2)
        products += lz.k
    return SpectralDensity(nodes, weights, products)


# ----------------------------------------------------------------------------- diagonal mass
def diagonal_mass(matrix) -> float:
    r"""The share of a square matrix's absolute mass on its diagonal (Becker & Le Cun 1988),

    .. math:: \delta_A = \frac{\sum_i |A_{ii}|}{\sum_{i,j} |A_{ij}|} \in [0, 1].

    :math:`\delta_A = 1` for a diagonal matrix; the paper compares a network's Hessian with
    Wigner and least-squares matrices of the same size (Propositions 1-2, Figure 2).

    >>> round(diagonal_mass(torch.tensor([[2.0, -1.0], [-1.0, 2.0]])), 6)
    0.666667

    Reference: Kohler, Adolphs & Lucchi (the paper), §3.
    """
    a = torch.as_tensor(matrix)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.numel() == 0:
        raise ValueError(f"Invalid matrix: expected a non-empty square matrix, got shape {tuple(a.shape)}")
    a = a.abs().to(torch.float64)
    total = a.sum()
    if not (bool(torch.isfinite(total)) and float(total) > 0):
        raise ValueError("Invalid matrix: its absolute sum must be positive and finite")
    return float(torch.diagonal(a).sum() / total)
