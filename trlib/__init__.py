"""trlib: stochastic second-order trust-region methods with adaptive (ellipsoidal) norms.

The library mirrors the course's thesis: an optimizer is a *region* (sphere or
ellipsoid, :mod:`trlib.norms`) times a *model* (the quadratic Taylor model, solved by
:mod:`trlib.subproblem`) times a *rule* for the radius (:mod:`trlib.region`).
"""

__version__ = "0.1.0"
