r"""The Lanczos process on a symmetric operator, and extreme eigenvalues from it.

Given a symmetric operator :math:`H` (a callable ``v -> H v`` on flat tensors) and a
start vector :math:`q_1`, Lanczos builds an orthonormal basis :math:`Q_k` of the
Krylov space :math:`\mathcal K_k(H, q_1)` and a tridiagonal :math:`T_k = Q_k^\top H Q_k`
with the three-term relation

.. math:: H Q_k = Q_k T_k + \beta_{k+1} q_{k+1} e_k^\top .

Two choices make it dependable for trust regions (Gould, Lucidi, Roma & Toint 1999;
Golub & Van Loan, §10.1):

* *full reorthogonalisation* (twice, "twice is enough"): the basis stays orthonormal to
  working precision, so :math:`T_k` really is :math:`Q_k^\top H Q_k`;
* *restart on breakdown*: when :math:`\beta_{k+1} \approx 0` the Krylov space is
  invariant. Instead of stopping, a new block starts from a random vector orthogonal to
  :math:`Q_k`; :math:`T` becomes block tridiagonal. This is what lets GLTR find
  directions the gradient cannot see (the hard case, a zero gradient at a saddle) once
  the gradient's Krylov space is exhausted. Before that, nothing in the Krylov space
  reveals them: with an early-stopping tolerance a Krylov solver can stop first (see
  :func:`trlib.solve_subproblem`).

Example: the smallest eigenvalue of a diagonal matrix.

>>> import torch
>>> d = torch.arange(1.0, 101.0, dtype=torch.float64) - 3.5
>>> value, vector, its = smallest_eigenpair(lambda v: d * v, torch.ones(100, dtype=torch.float64))
>>> round(value, 6)
-2.5
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

__all__ = ["Lanczos", "smallest_eigenpair"]

Operator = Callable[[Tensor], Tensor]


class Lanczos:
    """An incremental Lanczos process with full reorthogonalisation and restarts.

    Call :meth:`step` once per operator application. ``start`` may be zero (or None), in
    which case the first block starts from a random vector drawn with ``generator``.
    """

    def __init__(self, matvec: Operator, start: Tensor, *, generator: Optional[torch.Generator] = None):
        if start.ndim != 1:
            raise ValueError("Invalid start vector: must be a 1-D tensor")
        self.matvec = matvec
        self.n = start.numel()
        self.dtype, self.device = start.dtype, start.device
        self.generator = generator
        self.alphas: List[float] = []
        self.betas: List[float] = []  # betas[i] couples basis vectors i and i+1 (0 between blocks)
        self.block_starts: List[int] = [0]
        self.last_beta = 0.0  # the coupling to the next basis vector: the Lanczos residual
        self.scale = 0.0  # a running estimate of ||H|| for relative tolerances
        self.exhausted = False  # the basis spans the whole space
        self.k = 0
        self._basis = torch.empty((min(16, self.n + 1), self.n), dtype=self.dtype, device=self.device)
        self.start_norm = float(torch.linalg.vector_norm(start))
        if self.start_norm > 0 and math.isfinite(self.start_norm):
            self._basis[0] = start / self.start_norm
        else:
            self.start_norm = 0.0
            self._basis[0] = self._random_orthogonal()

    @property
    def basis(self) -> Tensor:
        """The orthonormal Lanczos vectors, one per row (``k x n``)."""
        return self._basis[: self.k]

    def _random_orthogonal(self) -> Tensor:
        v = torch.randn(self.n, generator=self.generator, dtype=self.dtype,
                        device=self.generator.device if self.generator is not None else "cpu")
        v = v.to(self.device)
        for _ in range(2):
            if self.k > 0:
                q = self._basis[: self.k]
                v = v - q.T @ (q @ v)
        return v / torch.linalg.vector_norm(v)

    def _grow(self):
        if self.k + 1 >= self._basis.shape[0]:
            bigger = torch.empty((min(2 * self._basis.shape[0], self.n + 1), self.n), dtype=self.dtype, device=self.device)
            bigger[: self.k + 1] = self._basis[: self.k + 1]
            self._basis = bigger

    def step(self) -> None:
        """One operator application: extends the basis by one vector (or ends a block)."""
        if self.exhausted:
            raise RuntimeError("Lanczos basis already spans the whole space")
        k = self.k
        q = self._basis[k]
        w = self.matvec(q)
        alpha = torch.dot(q, w)
        w = w - alpha * q
        # Full reorthogonalisation against every previous vector, twice.
        basis = self._basis[: k + 1]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        beta = torch.linalg.vector_norm(w)
        alpha_f, beta_f = (float(x) for x in torch.stack([alpha, beta]).cpu())  # the one sync per step
        if not (math.isfinite(alpha_f) and math.isfinite(beta_f)):
            raise FloatingPointError("Hessian-vector product returned a non-finite value")
        self.alphas.append(alpha_f)
        self.scale = max(self.scale, abs(alpha_f), beta_f)
        self.k = k + 1
        if self.k >= self.n:
            self.exhausted = True
            self.last_beta = 0.0
            self.betas.append(0.0)
            return
        self._grow()
        eps = torch.finfo(self.dtype).eps
        if beta_f <= math.sqrt(eps) * max(self.scale, 1e-30):
            # Invariant subspace: start a new block orthogonal to everything so far.
            self.last_beta = beta_f
            self.betas.append(0.0)
            self.block_starts.append(self.k)
            self._basis[self.k] = self._random_orthogonal()
        else:
            self.last_beta = beta_f
            self.betas.append(beta_f)
            self._basis[self.k] = w / beta

    @property
    def broke_down(self) -> bool:
        """True when the last step ended a block (the Krylov space became invariant)."""
        return len(self.block_starts) > 1 and self.block_starts[-1] == self.k

    def eigh(self, first: int = 0):
        """Eigenvalues (ascending) and eigenvectors of ``T[first:, first:]``.

        A tridiagonal solver (LAPACK's MRRR through SciPy): ``O(k^2)`` and single-threaded,
        where a dense ``eigh`` on a busy multi-core CPU costs milliseconds per call.
        """
        diagonal = np.asarray(self.alphas[first:self.k], dtype=np.float64)
        off = np.asarray(self.betas[first:self.k - 1], dtype=np.float64)
        if diagonal.size == 1:
            return diagonal.copy(), np.ones((1, 1))
        return eigh_tridiagonal(diagonal, off)

    def combine(self, coefficients: np.ndarray) -> Tensor:
        """:math:`Q_k^\\top c`: a vector of the Krylov space from its coordinates."""
        c = torch.as_tensor(coefficients, dtype=self.dtype).to(self.device)
        return self.basis.T @ c


def smallest_eigenpair(matvec: Operator, start: Tensor, *, max_iter: Optional[int] = None, rtol: float = 1e-6,
                       generator: Optional[torch.Generator] = None):
    r"""The leftmost eigenpair :math:`(\lambda_{\min}, v)` of a symmetric operator, by Lanczos.

    Stops when the Ritz residual :math:`\|H v - \theta v\| = \beta_{k+1}|y_k|` falls below
    ``rtol`` times the spectral scale seen so far, or after ``max_iter`` products
    (default: the dimension). Returns ``(value, vector, products)``; ``vector`` has unit
    Euclidean norm. A zero ``start`` begins from a random vector.
    """
    n = start.numel()
    max_iter = n if max_iter is None else int(max_iter)
    if max_iter < 1:
        raise ValueError(f"Invalid max_iter: {max_iter!r} (must be >= 1)")
    lz = Lanczos(matvec, start, generator=generator)
    while True:
        lz.step()
        if lz.broke_down:
            # The block just closed is invariant (exact), but the new one has not been
            # explored: the leftmost eigenvalue may live in the complement.
            done = lz.exhausted or lz.k >= max_iter
        else:
            # Earlier blocks are invariant; convergence is decided by the last one.
            _, y_last = lz.eigh(lz.block_starts[-1])
            residual = lz.last_beta * abs(y_last[-1, 0])
            done = lz.exhausted or lz.k >= max_iter or residual <= rtol * max(lz.scale, 1e-30)
        if done:
            theta, y = lz.eigh()
            return float(theta[0]), lz.combine(y[:, 0]), lz.k
