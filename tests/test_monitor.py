"""trlib.experiments.Monitor: what run(..., monitor=) shows a monitor, and that watching is no work."""

import pytest
import torch

from trlib.experiments import load_data, run
from trlib.experiments import Monitor
from trlib.experiments.runner import Objective
from trlib.optim import TrustRegion


@pytest.fixture(scope="module")
def digits():
    return load_data("mnist_mlp", "stand-in", verbose=False)


def go(method, budget, digits, **kw):
    return run("mnist_mlp", method, 0, budget, datasets=digits, progress=False, verbose=False, **kw)


def without_time(log):
    return [{k: v for k, v in r.items() if k != "time"} for r in log]


class Recorder(Monitor):
    """Checks each step's batch against the loss the optimizer reported, from the weights before the step."""

    def __init__(self):
        self.steps, self.records, self.batch_losses, self.before = 0, [], [], None

    def snapshot(self, trainer):
        self.before = [p.detach().clone() for p in trainer.model.parameters()]

    def after_record(self, trainer, record):
        self.records.append(dict(record))
        if self.before is None:
            self.snapshot(trainer)

    def after_step(self, trainer):
        self.steps += 1
        if isinstance(trainer.opt, TrustRegion):
            now = [p.detach().clone() for p in trainer.model.parameters()]
            with torch.no_grad():
                for p, q in zip(trainer.model.parameters(), self.before):
                    p.copy_(q)
                x, y = trainer.train.x[trainer.batch], trainer.train.y[trainer.batch]
                loss = float(Objective("classification", trainer.model, trainer.cfg["l2"])(trainer.model(x), y))
                for p, q in zip(trainer.model.parameters(), now):
                    p.copy_(q)
            self.batch_losses.append((loss, trainer.opt.last["loss"]))
        self.snapshot(trainer)


@pytest.mark.parametrize("method", ["tr_rms", "adam"])
def test_monitor_sees_every_step_record_and_the_step_batch(method, digits):
    seen = Recorder()
    log = go(method, "2epochs", digits, monitor=seen, preset="paper")
    assert seen.steps == log[-1]["step"] > 0
    assert seen.records == log  # every evaluation, the first at step 0 included, as logged
    if method == "tr_rms":
        # the loss of trainer.batch at the weights before the step is the loss the step reported
        assert len(seen.batch_losses) == seen.steps
        for recomputed, reported in seen.batch_losses:
            assert recomputed == pytest.approx(reported, rel=1e-5)


class Meddler(Monitor):
    """Draws random numbers and runs Hessian-vector products: none of it may change the run."""

    def after_step(self, trainer):
        torch.randn(10)
        x, y = trainer.train.x[:64], trainer.train.y[:64]
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        loss = trainer.objective(trainer.model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        torch.autograd.grad(grads, params, [torch.randn_like(g) for g in grads])

    def after_record(self, trainer, record):
        torch.rand(3)


@pytest.mark.parametrize("method", ["tr_uniform", "sgd"])
def test_a_monitor_is_no_work(method, digits):
    torch.manual_seed(5)
    plain = go(method, "1.5epochs", digits)
    after_plain = torch.rand(4)
    torch.manual_seed(5)
    watched = go(method, "1.5epochs", digits, monitor=Meddler())
    after_watched = torch.rand(4)
    assert without_time(watched) == without_time(plain)
    # the global random state (dropout, a model's own sampling) is untouched by the monitor's draws
    assert torch.equal(after_watched, after_plain)


def test_an_error_in_the_monitor_stops_the_run(digits):
    class Stop(Exception):
        pass

    class Failing(Monitor):
        def after_step(self, trainer):
            if trainer.state.steps == 3:
                raise Stop

    with pytest.raises(Stop):
        go("sgd", "2epochs", digits, monitor=Failing())
