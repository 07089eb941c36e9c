"""Independent references for the tests: NumPy/SciPy only, nothing from trlib.

``tr_reference`` solves the ellipsoidal trust-region subproblem from a dense
eigendecomposition and SciPy's ``brentq`` on the secular equation; ``kkt_gap`` measures
how far a candidate is from the Moré-Sorensen certificate of global optimality.
"""

import numpy as np
from scipy.optimize import brentq


def model(H, g, s):
    return float(g @ s + 0.5 * s @ H @ s)


def tr_reference(H, g, radius, ellipsoid=None):
    """Global minimiser of g.s + s.H.s/2 s.t. sqrt(sum(a s^2)) <= radius (float64)."""
    H = np.asarray(H, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    d = np.ones_like(g) if ellipsoid is None else 1.0 / np.sqrt(np.asarray(ellipsoid, dtype=np.float64))
    Ht = d[:, None] * H * d[None, :]
    gt = d * g
    w, V = np.linalg.eigh(0.5 * (Ht + Ht.T))
    c = V.T @ gt
    scale = max(np.abs(w).max(), 1e-300)

    def u_of(lam, drop=None):
        denom = w + lam
        x = np.zeros_like(c)
        mask = np.ones_like(c, dtype=bool) if drop is None else ~drop
        mask &= c != 0
        x[mask] = -c[mask] / denom[mask]
        return x

    if w[0] > 0:
        x = u_of(0.0)
        if np.linalg.norm(x) <= radius:
            return d * (V @ x), 0.0
    lam_low = max(0.0, -w[0])
    group = w <= w[0] + 1e-9 * scale
    if np.linalg.norm(c[group]) <= 1e-12 * max(np.linalg.norm(c), 1e-300):
        x = u_of(lam_low, drop=group)
        if np.linalg.norm(x) <= radius:
            tail = np.sqrt(max(radius**2 - x @ x, 0.0))
            z = np.zeros_like(c)
            z[np.flatnonzero(group)[0]] = 1.0
            return d * (V @ (x + tail * z)), lam_low
    f = lambda lam: np.linalg.norm(u_of(lam)) - radius  # noqa: E731
    hi = lam_low + np.linalg.norm(c) / radius + 1.0
    while f(hi) > 0:
        hi *= 2
    lo = lam_low
    # brentq needs a sign change: move lo right until f(lo) > 0 is representable
    step = max(abs(lam_low), 1.0) * 1e-15
    lo_eval = lo + step
    while f(lo_eval) <= 0 and lo_eval < hi:
        step *= 0.5
        lo_eval = lo + step
        if step < 1e-300:
            break
    if f(lo_eval) <= 0:  # root closer to lam_low than float64 resolves
        x = u_of(lo_eval)
        return d * (V @ x) * radius / max(np.linalg.norm(x), 1e-300), lam_low
    lam = brentq(f, lo_eval, hi, xtol=1e-15, rtol=1e-15, maxiter=500)
    return d * (V @ u_of(lam)), lam


def kkt_gap(H, g, radius, ellipsoid, s, lam):
    """(stationarity residual, most negative eigenvalue of H + lam A, complementarity, infeasibility)."""
    a = np.ones_like(g) if ellipsoid is None else np.asarray(ellipsoid, dtype=np.float64)
    A = np.diag(a)
    norm = np.sqrt(np.sum(a * s * s))
    resid = np.linalg.norm((H + lam * A) @ s + g)
    mineig = np.linalg.eigvalsh(0.5 * (H + H.T) + lam * A)[0]
    return resid, min(mineig, 0.0), abs(lam * (radius - norm)), max(norm - radius, 0.0)
