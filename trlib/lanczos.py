r"""The Lanczos process on a symmetric operator, and extreme eigenvalues from it.

Given a symmetric operator :math:`H` (a callable ``v -> H v`` on flat tensors) and a
start vector :math:`q_1`, Lanczos builds an orthonormal basis :math:`Q_k` of the
Krylov space :math:`\mathcal K_k(H, q_1)` and a tridiagonal :math:`T_k = Q_k^\top H Q_k`
with the three-term relation

.. math:: H Q_k = Q_k T_k + \beta_{k+1} q_{k+1} e_k^\top .

Three choices make it dependable for trust regions (Gould, Lucidi, Roma & Toint 1999;
Golub & Van Loan, §10.1):

* *full reorthogonalisation* (twice, "twice is enough"): the basis stays orthonormal to
  working precision, so :math:`T_k` really is :math:`Q_k^\top H Q_k`;
* *breakdown measured locally*: :math:`\beta_{k+1} \approx 0` (an invariant Krylov space)
  is judged against the rounding of the product it came from, :math:`\|H q_k\|`, not
  against :math:`\|H\|`: with a badly scaled ellipsoid the small eigenvalues are real
  and resolvable in float32 long after :math:`\sqrt{\epsilon}\,\|H\|` would call them noise;
* *new blocks on demand*: after a breakdown the next :meth:`Lanczos.step` starts a new
  block from a random vector orthogonal to :math:`Q_k` (:math:`T` becomes block
  tridiagonal). This is how directions the start vector cannot see (the hard case, a zero
  gradient at a saddle) are found; a caller that needs no more stops calling
  :meth:`Lanczos.step`.

Example: the smallest eigenvalue of a diagonal matrix.

>>> import torch
>>> d = torch.arange(1.0, 101.0, dtype=torch.float64) - 3.5
>>> value, vector, its = smallest_eigenpair(lambda v: d * v, torch.ones(100, dtype=torch.float64))
>>> round(value, 6)
-2.5
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from .curvature import MatVec, NonFiniteCurvatureError

__all__ = ["Lanczos", "smallest_eigenpair"]



class Lanczos:
    """An incremental Lanczos process with full reorthogonalisation and restarts.

    Call :meth:`step` once per operator application. ``start`` (1-D) may be zero, in
    which case the first block starts from a random vector drawn with ``generator``.
    ``alphas``/``betas`` hold :math:`T` (``betas[i]`` couples basis vectors ``i`` and
    ``i + 1``; between blocks 0, then the coupling of the new block's first vector to the
    residual judged negligible), ``block_starts`` the first index of every block, ``last_beta``
    the coupling to the next vector (the Lanczos residual; 0 after a breakdown, when
    ``residual_beta`` keeps the norm of the residual judged negligible), ``scale`` a running
    estimate of :math:`\\|H\\|`, ``k`` the number of products.
    """

    def __init__(self, matvec: MatVec, start: Optional[Tensor], *, generator: Optional[torch.Generator] = None):
        if start is None or start.ndim != 1:
            raise ValueError("Invalid start vector: must be a 1-D tensor")
        self.matvec = matvec
        self.n = start.numel()
        self.dtype, self.device = start.dtype, start.device
        self.generator = generator
        self.alphas: List[float] = []
        self.betas: List[float] = []
        self.block_starts: List[int] = [0]
        self.last_beta = self.residual_beta = 0.0
        self._residual: Optional[Tensor] = None
        self.scale = 0.0
        self.k = 0
        self._basis = torch.empty((min(16, self.n + 1), self.n), dtype=self.dtype, device=self.device)
        self.start_norm = float(torch.linalg.vector_norm(start))
        self._pending = not (self.start_norm > 0 and math.isfinite(self.start_norm))  # next vector: random
        if self._pending:
            self.start_norm = 0.0
        else:
            self._basis[0] = start / self.start_norm

    @property
    def basis(self) -> Tensor:
        """The orthonormal Lanczos vectors, one per row (``k x n``)."""
        return self._basis[: self.k]

    @property
    def exhausted(self) -> bool:
        """The basis spans the whole space."""
        return self.k >= self.n

    @property
    def broke_down(self) -> bool:
        """True when the last step ended a block (the Krylov space became invariant)."""
        return self._pending and self.k > 0

    def _orthogonalise(self, w: Tensor, upto: int) -> Tensor:
        q = self._basis[:upto]
        for _ in range(2):  # "twice is enough"
            w = w - q.T @ (q @ w)
        return w

    def _random_orthogonal(self) -> Tensor:
        v = torch.randn(self.n, generator=self.generator, dtype=self.dtype,
                        device=self.generator.device if self.generator is not None else "cpu").to(self.device)
        v = self._orthogonalise(v, self.k)
        return v / torch.linalg.vector_norm(v)

    def step(self) -> None:
        """One operator application: extends the basis by one vector (or ends a block)."""
        if self.exhausted:
            raise RuntimeError("Lanczos basis already spans the whole space")
        k = self.k
        if self._pending:  # a new block
            self._basis[k] = self._random_orthogonal()
            self._pending = False
            if k:
                self.block_starts.append(k)
                # q_k^T H q_{k-1} is q_k^T of the residual judged negligible: kept, so that T stays
                # Q^T H Q when that residual was a real (tiny) coupling rather than rounding
                self.betas[k - 1] = float(torch.dot(self._basis[k], self._residual))
                self._residual = None
        q = self._basis[k]
        w = self.matvec(q)
        size = torch.linalg.vector_norm(w)
        alpha = torch.dot(q, w)
        w = self._orthogonalise(w - alpha * q, k + 1)
        beta = torch.linalg.vector_norm(w)
        alpha_f, beta_f, size_f = (float(x) for x in torch.stack([alpha, beta, size]).cpu())  # the one sync
        if not (math.isfinite(alpha_f) and math.isfinite(beta_f) and math.isfinite(size_f)):
            raise NonFiniteCurvatureError()
        self.alphas.append(alpha_f)
        self.scale = max(self.scale, abs(alpha_f), beta_f)
        self.k = k + 1
        self.last_beta = self.residual_beta = beta_f
        if self.k + 1 > self._basis.shape[0] and not self.exhausted:
            bigger = torch.empty((min(2 * self._basis.shape[0], self.n + 1), self.n), dtype=self.dtype,
                                 device=self.device)
            bigger[: self.k] = self._basis[: self.k]
            self._basis = bigger
        if self.exhausted or beta_f <= 100 * torch.finfo(self.dtype).eps * size_f:
            self.betas.append(0.0)  # invariant: what is left of w is rounding of the product
            self.last_beta = 0.0
            self._pending, self._residual = True, w
        else:
            self.betas.append(beta_f)
            self._basis[self.k] = w / beta

    def eigh(self, first: int = 0, last: Optional[int] = None):
        """Eigenvalues (ascending) and eigenvectors of ``T[first:last, first:last]``.

        A tridiagonal solver (LAPACK's MRRR through SciPy, float64 whatever the operator's
        dtype): ``O(k^2)`` and single-threaded.
        """
        last = self.k if last is None else last
        diagonal = np.asarray(self.alphas[first:last], dtype=np.float64)
        off = np.asarray(self.betas[first:last - 1], dtype=np.float64)
        if diagonal.size == 1:
            return diagonal.copy(), np.ones((1, 1))
        return eigh_tridiagonal(diagonal, off)

    def combine(self, coefficients: np.ndarray) -> Tensor:
        """:math:`Q_k^\\top c`: a vector of the Krylov space from its coordinates."""
        c = torch.as_tensor(np.asarray(coefficients), dtype=self.dtype).to(self.device)
        return self.basis.T @ c

    def leftmost_residual(self) -> float:
        """:math:`\\beta_{k+1} |y_k|` of the leftmost Ritz pair of the last block (0 after a breakdown)."""
        if self._pending:
            return 0.0
        _, y = self.eigh(self.block_starts[-1])
        return self.last_beta * abs(float(y[-1, 0]))


def smallest_eigenpair(matvec: MatVec, start: Tensor, *, max_iter: Optional[int] = None, rtol: float = 1e-6,
                       generator: Optional[torch.Generator] = None):
    r"""The leftmost eigenpair :math:`(\lambda_{\min}, v)` of a symmetric operator, by Lanczos.

    Stops when the Ritz residual :math:`\|H v - \theta v\| = \beta_{k+1}|y_k|` falls below
    ``rtol`` times the spectral scale seen so far, or after ``max_iter`` products
    (default: the dimension). Returns ``(value, vector, products)``; ``vector`` has unit
    Euclidean norm. A zero ``start`` begins from a random vector; a good guess of the
    eigenvector (a Ritz vector of a nearby operator) costs only the products that bring its
    residual below the tolerance.
    """
    n = start.numel()
    max_iter = n if max_iter is None else int(max_iter)
    if max_iter < 1:
        raise ValueError(f"Invalid max_iter: {max_iter!r} (must be >= 1)")
    lz = Lanczos(matvec, start, generator=generator)
    while True:
        lz.step()
        # A block that became invariant is exact. Grown from a random vector it holds the leftmost
        # eigenvalue of the unexplored rest (with probability 1); grown from `start`, maybe not.
        if lz.broke_down:
            converged = lz.start_norm == 0 or len(lz.block_starts) > 1
        else:
            converged = lz.leftmost_residual() <= rtol * max(lz.scale, 1e-30)
        if lz.exhausted or lz.k >= max_iter or converged:
            theta, y = lz.eigh()
            return float(theta[0]), lz.combine(y[:, 0]), lz.k
