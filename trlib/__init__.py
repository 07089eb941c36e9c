"""trlib: stochastic second-order trust-region methods with adaptive (ellipsoidal) norms.

The library mirrors the course's thesis: an optimizer is a *region* (sphere or
ellipsoid, :mod:`trlib.norms`) times a *model* (the quadratic Taylor model, solved by
:mod:`trlib.subproblem`) times a *rule* for the radius (:mod:`trlib.region`).
"""

__version__ = "0.1.0"

from . import _startup

_startup.quiet_interrupts()  # under `python -m trlib.experiments`: a Ctrl-C while torch loads ends in one line

from . import analysis, cubic, curvature, gauss_newton, lanczos, norms, region, subproblem
from .curvature import FlatView, NonFiniteCurvatureError, Operator, dense_hessian, flat_grad, frozen_batchnorm_stats
from .lanczos import smallest_eigenpair
from .minimize import MinimizeResult, minimize
from .norms import ellipsoid_norm, equivalence_constant, get_norm
from .optim import ARC, NonFiniteLossError, TrustRegion
from .region import RadiusRule, SigmaRule
from .subproblem import SubproblemResult, eigenpoint, model_value, solve_subproblem

__all__ = ["TrustRegion", "ARC", "minimize", "MinimizeResult", "NonFiniteLossError", "NonFiniteCurvatureError",
           "solve_subproblem", "SubproblemResult", "model_value", "eigenpoint", "RadiusRule", "SigmaRule", "Operator",
           "FlatView", "flat_grad", "dense_hessian", "frozen_batchnorm_stats", "smallest_eigenpair", "ellipsoid_norm",
           "equivalence_constant", "get_norm", "analysis", "cubic", "curvature", "gauss_newton", "lanczos", "norms",
           "region", "subproblem"]
