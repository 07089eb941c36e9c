r"""The 35 test problems of Moré, Garbow & Hillstrom (1981), written in torch.

Moré, J. J., Garbow, B. S. & Hillstrom, K. E. (1981). *Testing unconstrained optimization
software.* ACM Transactions on Mathematical Software 7(1), 17-41. Every problem is a sum of
squares :math:`f(x) = \sum_i r_i(x)^2` with the paper's standard starting point. Where the
paper lets the sizes vary, the common choices are taken (noted per problem). ``minima``
lists the values of :math:`f` at the local minimisers the paper reports (a method that ends
at any of them has solved the problem; one of them may be at infinity).

>>> problem = PROBLEMS[0]
>>> problem.name, problem.n, float(problem.f(problem.x0()))
('rosenbrock', 2, 24.2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

DTYPE = torch.float64


@dataclass(frozen=True)
class Problem:
    number: int
    name: str
    n: int
    residuals: Callable[[Tensor], Tensor]
    start: Tuple[float, ...]
    minima: Tuple[float, ...]

    def f(self, x: Tensor) -> Tensor:
        r = self.residuals(x)
        return torch.dot(r, r)

    def x0(self) -> Tensor:
        return torch.tensor(self.start, dtype=DTYPE)

    def solved(self, value: float, rtol: float = 1e-8) -> bool:
        """``value`` is within ``rtol`` (relative; absolute below 1) of one of the known minima."""
        return any(abs(value - m) <= rtol * max(1.0, abs(m)) for m in self.minima)


def _t(values: Sequence[float]) -> Tensor:
    return torch.tensor(values, dtype=DTYPE)


def _i(m: int) -> Tensor:
    return torch.arange(1, m + 1, dtype=DTYPE)


def rosenbrock(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def freudenstein_roth(x):
    return torch.stack([-13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1], -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1]])


def powell_badly_scaled(x):
    return torch.stack([1e4 * x[0] * x[1] - 1, torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001])


def brown_badly_scaled(x):
    return torch.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2])


def beale(x):
    y = _t([1.5, 2.25, 2.625])
    return y - x[0] * (1 - x[1] ** _i(3))


def jennrich_sampson(x):  # m = 10
    i = _i(10)
    return 2 + 2 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1]))


def helical_valley(x):
    theta = torch.atan(x[1] / x[0]) / (2 * math.pi) + torch.where(x[0] < 0, 0.5, 0.0)
    return torch.stack([10 * (x[2] - 10 * theta), 10 * (torch.sqrt(x[0] ** 2 + x[1] ** 2) - 1), x[2]])


_BARD_Y = [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39]


def bard(x):
    u = _i(15)
    v = 16 - u
    w = torch.minimum(u, v)
    return _t(_BARD_Y) - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSSIAN_Y = [0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989, 0.3521, 0.2420, 0.1295, 0.0540,
               0.0175, 0.0044, 0.0009]


def gaussian(x):
    t = (8 - _i(15)) / 2
    return x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2) - _t(_GAUSSIAN_Y)


_MEYER_Y = [34780, 28610, 23650, 19630, 16370, 13720, 11540, 9744, 8261, 7030, 6005, 5147, 4427, 3820, 3307, 2872]


def meyer(x):
    t = 45 + 5 * _i(16)
    return x[0] * torch.exp(x[1] / (t + x[2])) - _t(_MEYER_Y)


def gulf(x):  # m = 99
    t = _i(99) / 100
    y = 25 + (-50 * torch.log(t)) ** (2 / 3)
    return torch.exp(-torch.abs(y - x[1]) ** x[2] / x[0]) - t


def box_3d(x):  # m = 10
    t = 0.1 * _i(10)
    return torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10 * t))


def powell_singular(x):
    return torch.stack([x[0] + 10 * x[1], math.sqrt(5) * (x[2] - x[3]), (x[1] - 2 * x[2]) ** 2,
                        math.sqrt(10) * (x[0] - x[3]) ** 2])


def wood(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0], math.sqrt(90) * (x[3] - x[2] ** 2), 1 - x[2],
                        math.sqrt(10) * (x[1] + x[3] - 2), (x[1] - x[3]) / math.sqrt(10)])


_KO_Y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
_KO_U = [4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]


def kowalik_osborne(x):
    u = _t(_KO_U)
    return _t(_KO_Y) - x[0] * (u**2 + u * x[1]) / (u**2 + u * x[2] + x[3])


def brown_dennis(x):  # m = 20
    t = _i(20) / 5
    return (x[0] + t * x[1] - torch.exp(t)) ** 2 + (x[2] + x[3] * torch.sin(t) - torch.cos(t)) ** 2


_OSBORNE1_Y = [0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751, 0.718, 0.685, 0.658,
               0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490, 0.478, 0.467, 0.457, 0.448, 0.438, 0.431,
               0.424, 0.420, 0.414, 0.411, 0.406]


def osborne1(x):
    t = 10 * (_i(33) - 1)
    return _t(_OSBORNE1_Y) - (x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4]))


def biggs_exp6(x):  # m = 13
    t = 0.1 * _i(13)
    y = torch.exp(-t) - 5 * torch.exp(-10 * t) + 3 * torch.exp(-4 * t)
    return x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1]) + x[5] * torch.exp(-t * x[4]) - y


_OSBORNE2_Y = [1.366, 1.191, 1.112, 1.013, 0.991, 0.885, 0.831, 0.847, 0.786, 0.725, 0.746, 0.679, 0.608, 0.655,
               0.616, 0.606, 0.602, 0.626, 0.651, 0.724, 0.649, 0.649, 0.694, 0.644, 0.624, 0.661, 0.612, 0.558,
               0.533, 0.495, 0.500, 0.423, 0.395, 0.375, 0.372, 0.391, 0.396, 0.405, 0.428, 0.429, 0.523, 0.562,
               0.607, 0.653, 0.672, 0.708, 0.633, 0.668, 0.645, 0.632, 0.591, 0.559, 0.597, 0.625, 0.739, 0.710,
               0.729, 0.720, 0.636, 0.581, 0.428, 0.292, 0.162, 0.098, 0.054]


def osborne2(x):
    t = (_i(65) - 1) / 10
    model = (x[0] * torch.exp(-t * x[4]) + x[1] * torch.exp(-(t - x[8]) ** 2 * x[5])
             + x[2] * torch.exp(-(t - x[9]) ** 2 * x[6]) + x[3] * torch.exp(-(t - x[10]) ** 2 * x[7]))
    return _t(_OSBORNE2_Y) - model


def watson(x):  # n = 9, m = 31
    n = x.numel()
    t = _i(29) / 29
    j = torch.arange(n, dtype=DTYPE)
    powers = t[:, None] ** j[None, :]  # t_i^(j-1), j = 1..n
    first = (powers[:, :-1] * (j[1:] * x[1:])[None, :]).sum(1)  # sum_{j>=2} (j-1) x_j t^(j-2)
    second = (powers * x[None, :]).sum(1)
    return torch.cat([first - second**2 - 1, torch.stack([x[0], x[1] - x[0] ** 2 - 1])])


def extended_rosenbrock(x):
    return torch.cat([10 * (x[1::2] - x[0::2] ** 2), 1 - x[0::2]])


def extended_powell(x):
    a, b, c, d = x[0::4], x[1::4], x[2::4], x[3::4]
    return torch.cat([a + 10 * b, math.sqrt(5) * (c - d), (b - 2 * c) ** 2, math.sqrt(10) * (a - d) ** 2])


def penalty1(x):
    return torch.cat([math.sqrt(1e-5) * (x - 1), (torch.dot(x, x) - 0.25).reshape(1)])


def penalty2(x):
    n = x.numel()
    i = torch.arange(2, n + 1, dtype=DTYPE)
    y = torch.exp(i / 10) + torch.exp((i - 1) / 10)
    a = math.sqrt(1e-5)
    return torch.cat([(x[0] - 0.2).reshape(1), a * (torch.exp(x[1:] / 10) + torch.exp(x[:-1] / 10) - y),
                      a * (torch.exp(x[1:] / 10) - math.exp(-0.1)),
                      (torch.sum((n - _i(n) + 1) * x**2) - 1).reshape(1)])


def variably_dimensioned(x):
    s = torch.sum(_i(x.numel()) * (x - 1))
    return torch.cat([x - 1, s.reshape(1), (s**2).reshape(1)])


def trigonometric(x):
    n = x.numel()
    return n - torch.sum(torch.cos(x)) + _i(n) * (1 - torch.cos(x)) - torch.sin(x)


def brown_almost_linear(x):
    n = x.numel()
    return torch.cat([x[:-1] + torch.sum(x) - (n + 1), (torch.prod(x) - 1).reshape(1)])


def _grid(n):
    h = 1 / (n + 1)
    return h, _i(n) * h


def discrete_boundary(x):
    h, t = _grid(x.numel())
    padded = torch.cat([x.new_zeros(1), x, x.new_zeros(1)])
    return 2 * x - padded[:-2] - padded[2:] + h**2 * (x + t + 1) ** 3 / 2


def discrete_integral(x):
    n = x.numel()
    h, t = _grid(n)
    c = (x + t + 1) ** 3
    lower = torch.cumsum(t * c, 0)  # sum_{j <= i} t_j c_j
    upper = torch.flip(torch.cumsum(torch.flip((1 - t) * c, [0]), 0), [0]) - (1 - t) * c  # sum_{j > i}
    return x + h * ((1 - t) * lower + t * upper) / 2


def broyden_tridiagonal(x):
    padded = torch.cat([x.new_zeros(1), x, x.new_zeros(1)])
    return (3 - 2 * x) * x - padded[:-2] - 2 * padded[2:] + 1


def broyden_banded(x):
    n = x.numel()
    idx = torch.arange(n)
    band = ((idx[None, :] - idx[:, None] >= -5) & (idx[None, :] - idx[:, None] <= 1) & (idx[None, :] != idx[:, None]))
    return x * (2 + 5 * x**2) + 1 - band.to(DTYPE) @ (x * (1 + x))


def linear_full_rank(x, m=20):
    n = x.numel()
    s = 2 * torch.sum(x) / m
    return torch.cat([x - s - 1, (-s - 1).expand(m - n)])


def linear_rank1(x, m=20):
    return _i(m) * torch.sum(_i(x.numel()) * x) - 1


def linear_rank1_zero(x, m=20):
    n = x.numel()
    s = torch.sum(torch.arange(2, n, dtype=DTYPE) * x[1:-1])
    return torch.cat([x.new_full((1,), -1.0), (_i(m - 2)) * s - 1, x.new_full((1,), -1.0)])


def chebyquad(x):  # m = n
    n = x.numel()
    y = 2 * x - 1
    t_prev, t_cur = torch.ones_like(y), y
    out = []
    for i in range(1, n + 1):
        out.append(t_cur.mean() + (1 / (i**2 - 1) if i % 2 == 0 else 0.0))
        t_prev, t_cur = t_cur, 2 * y * t_cur - t_prev
    return torch.stack(out)


def _rep(pattern, n):
    return tuple(pattern[i % len(pattern)] for i in range(n))


PROBLEMS: List[Problem] = [
    Problem(1, "rosenbrock", 2, rosenbrock, (-1.2, 1.0), (0.0,)),
    Problem(2, "freudenstein-roth", 2, freudenstein_roth, (0.5, -2.0), (0.0, 48.9842536792400)),
    Problem(3, "powell-badly-scaled", 2, powell_badly_scaled, (0.0, 1.0), (0.0,)),
    Problem(4, "brown-badly-scaled", 2, brown_badly_scaled, (1.0, 1.0), (0.0,)),
    Problem(5, "beale", 2, beale, (1.0, 1.0), (0.0,)),
    Problem(6, "jennrich-sampson", 2, jennrich_sampson, (0.3, 0.4), (124.362182355,)),
    Problem(7, "helical-valley", 3, helical_valley, (-1.0, 0.0, 0.0), (0.0,)),
    Problem(8, "bard", 3, bard, (1.0, 1.0, 1.0), (8.21487730657e-3, 17.4286437626)),
    Problem(9, "gaussian", 3, gaussian, (0.4, 1.0, 0.0), (1.12793276961e-8,)),
    Problem(10, "meyer", 3, meyer, (0.02, 4000.0, 250.0), (87.9458551718,)),
    Problem(11, "gulf", 3, gulf, (5.0, 2.5, 0.15), (0.0,)),
    Problem(12, "box-3d", 3, box_3d, (0.0, 10.0, 20.0), (0.0,)),
    Problem(13, "powell-singular", 4, powell_singular, (3.0, -1.0, 0.0, 1.0), (0.0,)),
    Problem(14, "wood", 4, wood, (-3.0, -1.0, -3.0, -1.0), (0.0,)),
    Problem(15, "kowalik-osborne", 4, kowalik_osborne, (0.25, 0.39, 0.415, 0.39), (3.07505603849e-4, 1.02734e-3)),
    Problem(16, "brown-dennis", 4, brown_dennis, (25.0, 5.0, -5.0, -1.0), (85822.2016263,)),
    Problem(17, "osborne-1", 5, osborne1, (0.5, 1.5, -1.0, 0.01, 0.02), (5.46489469748e-5,)),
    Problem(18, "biggs-exp6", 6, biggs_exp6, (1.0, 2.0, 1.0, 1.0, 1.0, 1.0), (0.0, 5.65565e-3)),
    Problem(19, "osborne-2", 11, osborne2, (1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5),
            (4.01377362935e-2,)),
    Problem(20, "watson", 9, watson, (0.0,) * 9, (1.39976155e-6,)),
    Problem(21, "extended-rosenbrock", 10, extended_rosenbrock, _rep((-1.2, 1.0), 10), (0.0,)),
    Problem(22, "extended-powell", 12, extended_powell, _rep((3.0, -1.0, 0.0, 1.0), 12), (0.0,)),
    Problem(23, "penalty-1", 10, penalty1, tuple(float(j) for j in range(1, 11)), (7.08765146e-5,)),
    Problem(24, "penalty-2", 10, penalty2, (0.5,) * 10, (2.93660e-4,)),
    Problem(25, "variably-dimensioned", 10, variably_dimensioned, tuple(1 - j / 10 for j in range(1, 11)), (0.0,)),
    Problem(26, "trigonometric", 10, trigonometric, (0.1,) * 10, (0.0, 2.79506e-5)),
    Problem(27, "brown-almost-linear", 10, brown_almost_linear, (0.5,) * 10, (0.0, 1.0)),
    Problem(28, "discrete-boundary", 10, discrete_boundary, tuple(t * (t - 1) for t in (j / 11 for j in range(1, 11))),
            (0.0,)),
    Problem(29, "discrete-integral", 10, discrete_integral,
            tuple(t * (t - 1) for t in (j / 11 for j in range(1, 11))), (0.0,)),
    Problem(30, "broyden-tridiagonal", 10, broyden_tridiagonal, (-1.0,) * 10, (0.0,)),
    Problem(31, "broyden-banded", 10, broyden_banded, (-1.0,) * 10, (0.0,)),
    Problem(32, "linear-full-rank", 10, linear_full_rank, (1.0,) * 10, (10.0,)),
    Problem(33, "linear-rank-1", 10, linear_rank1, (1.0,) * 10, (20 * 19 / (2 * 41),)),
    Problem(34, "linear-rank-1-zero", 10, linear_rank1_zero, (1.0,) * 10, ((400 + 60 - 6) / (2 * 37),)),
    Problem(35, "chebyquad", 8, chebyquad, tuple(j / 9 for j in range(1, 9)), (3.51687e-3,)),
]

#: Extended (separable) Rosenbrock with n = 100 from (-1.2, 1, -1.2, 1, ...): the issue's waste example.
ROSENBROCK_100 = Problem(21, "extended-rosenbrock-100", 100, extended_rosenbrock, _rep((-1.2, 1.0), 100), (0.0,))


def numpy_check() -> None:
    """Every problem evaluates to a finite value at its start (a smoke check used by the benchmark)."""
    for p in PROBLEMS + [ROSENBROCK_100]:
        value = float(p.f(p.x0()))
        assert np.isfinite(value), p.name
