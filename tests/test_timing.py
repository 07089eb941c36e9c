"""trlib.timing: round-robin medians against a fake clock, the TR-step profile against CG's
product count and its own per-round times, the epoch ratio against its closed form, and the
benchmarks' helper being the library's."""

import importlib.util
import statistics
import time
from pathlib import Path

import pytest
import torch

from trlib import timing


class FakeClock:
    """A clock that moves only when a timed function says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def spend(self, seconds):
        self.now += seconds


def test_round_robin_order_and_exact_statistics():
    clock, calls = FakeClock(), []
    costs = {"a": [9.0, 1.0, 3.0, 2.0], "b": [5.0, 10.0, 20.0, 30.0]}  # first value: the warm-up round

    def make(name):
        def fn():
            calls.append(name)
            clock.spend(costs[name][sum(c == name for c in calls) - 1])
        return fn

    t = timing.time_interleaved({"a": make("a"), "b": make("b")}, repeats=3, warmup=1, clock=clock)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three rounds, each calling a then b
    assert t["a"]["times"] == [1.0, 3.0, 2.0] and t["b"]["times"] == [10.0, 20.0, 30.0]
    assert (t["a"]["median"], t["a"]["min"], t["a"]["max"]) == (2.0, 1.0, 3.0)
    assert t["b"]["median"] == 20.0


def test_time_median_measures_at_least_the_work():
    t = timing.time_median(lambda: time.sleep(0.01), repeats=3, warmup=0)
    assert 0.01 <= t["min"] <= t["median"] <= t["max"]
    assert len(t["times"]) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(repeats=0), "repeats"), (dict(repeats=2.5), "repeats"), (dict(warmup=-1), "warmup"),
])
def test_bad_counts_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timing.time_interleaved({"a": lambda: None}, **kwargs)


def test_bad_functions_are_refused():
    with pytest.raises(ValueError, match="empty"):
        timing.time_interleaved({})
    with pytest.raises(ValueError, match="not callable"):
        timing.time_interleaved({"a": 3})


def _quadratic_problem(d=40, n=200):
    """Least squares on a linear model: a positive definite Hessian with d distinct eigenvalues,
    so CG cannot finish in fewer than d products."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.2, 3.0, d)
    y = torch.randn(n, 1, generator=gen)
    model = torch.nn.Linear(d, 1)
    return model, lambda m: ((m(x) - y) ** 2).mean()


def test_profile_counts_the_products_cg_must_spend():
    model, loss = _quadratic_problem()
    p = timing.profile_tr_step(model, loss, repeats=3, max_krylov=7, norm="uniform")
    # a non-binding radius and an unreachable tolerance: every step stops at max_krylov
    assert p.products == [7, 7, 7] and p.products_per_step == 7
    assert set(timing.PASSES) | {"TR step"} == set(p.times)
    assert p.ratio("gradient") == 1.0


def test_profile_overhead_pairs_the_times_of_each_round():
    model, loss = _quadratic_problem()
    for hvp, base, product in (("double_backward", "gradient with graph", "HVP, double backward"),
                               ("forward_over_reverse", "gradient", "HVP, forward-over-reverse")):
        p = timing.profile_tr_step(model, loss, hvp=hvp, repeats=3, max_krylov=4)
        t = {name: p.times[name]["times"] for name in p.times}
        expected = statistics.median(
            s / (b + k * h + f) - 1 for s, b, k, h, f in
            zip(t["TR step"], t[base], p.products, t[product], t["forward (no grad)"]))
        assert p.overhead == pytest.approx(expected, rel=1e-12)
        assert p.hvp == hvp


def test_profile_leaves_the_model_and_its_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    p = timing.profile_tr_step(model, lambda m: torch.nn.functional.cross_entropy(m(x), y), repeats=2,
                               max_krylov=3, extra={"marker": lambda: calls.append(1)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(calls) == 3 and len(p.times["marker"]["times"]) == 2  # 1 warm-up + 2 timed rounds
    assert 1 <= p.products_per_step <= 3


def test_profile_refuses_bad_input():
    model, loss = _quadratic_problem()
    with pytest.raises(ValueError, match="hvp"):
        timing.profile_tr_step(model, loss, hvp="finite_differences")
    with pytest.raises(ValueError, match="names of timed passes"):
        timing.profile_tr_step(model, loss, extra={"TR step": lambda: None})
    frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters"):
        timing.profile_tr_step(frozen, lambda m: m(torch.ones(1, 2)).sum())


def test_epoch_ratio_is_the_closed_form_and_batch_free_for_proportional_costs():
    assert timing.epoch_time_ratio(0.3, 512, 0.01, 128) == pytest.approx((128 / 512) * 0.3 / 0.01)
    # times proportional to the batch (t = c B): the ratio is c_TR / c_FO whatever the batches
    for b_tr, b_fo in ((512, 128), (128, 128), (64, 1024)):
        assert timing.epoch_time_ratio(3e-4 * b_tr, b_tr, 5e-5 * b_fo, b_fo) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="batch"):
        timing.epoch_time_ratio(0.3, 0, 0.01, 128)


def test_the_benchmarks_use_this_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("_common_under_test", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    for name in ("synchronize", "time_median", "time_interleaved"):
        assert getattr(common, name) is getattr(timing, name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_work_is_waited_for():
    a = torch.randn(4096, 4096, device="cuda")
    launched = timing.time_median(lambda: a @ a, None, repeats=3)  # no device: only the launch is timed
    finished = timing.time_median(lambda: a @ a, "cuda", repeats=3)
    assert finished["median"] > launched["median"]
    model = torch.nn.Linear(40, 1).cuda()
    x = torch.randn(64, 40, device="cuda")
    p = timing.profile_tr_step(model, lambda m: ((m(x) - 1) ** 2).mean(), repeats=2, max_krylov=3)
    assert 1 <= p.products_per_step <= 3
