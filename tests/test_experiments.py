"""trlib.experiments: budgets, work counting, bit-for-bit resumption, provenance, results
files, the table's statistics and the command line, all on the sklearn digits stand-in."""

import doctest
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scipy import stats

import trlib.experiments.runner as runner
from trlib.data import DatasetUnavailableError
from trlib.experiments import (METHODS, format_table, get_config, load_data, load_results, load_runs, mean_ci,
                               parse_budget, parse_overrides, run, summarize, write_run)
from trlib.experiments.__main__ import main
from trlib.experiments.storage import load_checkpoint
from trlib.models import TASKS

ROOT = Path(__file__).resolve().parents[1]
N = 1437  # digits training split
STAND_IN = "sklearn digits (offline stand-in for MNIST)"



@pytest.fixture(scope="module")
def digits():
    return load_data("mnist_mlp", "stand-in", verbose=False)


def go(method, budget, digits, task="mnist_mlp", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("verbose", False)
    return run(task, method, kw.pop("seed", 0), budget, datasets=digits, **kw)


def without_time(log):
    return [{k: v for k, v in r.items() if k != "time"} for r in log]


# --- configuration and budgets -------------------------------------------------------------

def test_budget_parsing():
    assert parse_budget("20epochs") == runner.Budget(20.0, "epochs")
    assert parse_budget("5000backprops") == runner.Budget(5000.0, "backprops")
    assert parse_budget("300s") == runner.Budget(300.0, "seconds")
    assert parse_budget("2.5 epochs") == runner.Budget(2.5, "epochs")
    assert str(parse_budget("300s")) == "300s" and str(parse_budget("20epochs")) == "20epochs"
    for bad in ("20", "epochs", "0epochs", "-3s", "5 parsecs", "1e"):
        with pytest.raises(ValueError, match="invalid budget"):
            parse_budget(bad)


@pytest.mark.parametrize("task,method,expected", [
    ("mnist_mlp", "tr_uniform", dict(radius=.05, decrease=1.5, eta1=.01, eta2=.95, batch_size=512, batch_growth=1.05,
                                     batch_cap=.2, warmup_epochs=0)),
    ("mnist_mlp", "tr_rms", dict(radius=1e-4, decrease=1.75, increase=1.1, max_radius=10.0, krylov_tol=.1,
                                 max_krylov=50)),
    ("fashion_mnist_mlp", "tr_adagrad", dict(radius=.05, decrease=1.5)),
    ("mnist_conv", "tr_rms", dict(radius=1e-4, decrease=1.5, eta1=1e-5, eta2=.9, batch_size=2048, batch_growth=1.025,
                                  batch_cap=.1, warmup_method="rmsprop", warmup_lr=5e-4, warmup_epochs=1)),
    ("cifar_conv", "tr_uniform", dict(radius=.005, decrease=1.25, warmup_method="adagrad", warmup_lr=.01,
                                      warmup_epochs=20)),
    ("mnist_autoencoder", "tr_adagrad", dict(radius=.01, decrease=1.5, eta1=1e-7, eta2=.8, batch_size=128,
                                             increase=1.25, max_radius=5.0, loss="squared_error", l2=0.0)),
    ("fashion_mnist_autoencoder", "tr_rms", dict(radius=.001, decrease=1.25, batch_growth=1.075, batch_cap=.05)),
    ("mnist_mlp", "sgd", dict(lr=.05, batch_size=128, l2=1e-4, loss="cross_entropy+l2")),
    ("mnist_conv", "rmsprop", dict(lr=5e-5)),
    ("mnist_autoencoder", "adagrad", dict(lr=.01)),
])
def test_config_follows_the_authors_table(task, method, expected):
    cfg = get_config(task, method, preset="paper")
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["preset"] == "paper"
    if cfg["kind"] == "tr":  # the paper's algorithm: products and ratio test on the step's batch, the loss rule
        assert (cfg["hessian_batch"], cfg["acceptance"], cfg["batch_rule"]) == (1.0, "own", "paper")


@pytest.mark.parametrize("task", list(TASKS))
def test_the_defaults_are_the_authors_table_with_the_measured_changes(task):
    for method in METHODS:
        paper, default = get_config(task, method, preset="paper"), get_config(task, method)
        changed = {k for k in paper if paper[k] != default[k]} - {"preset"}
        if paper["kind"] == "first_order":
            assert changed <= {"lr"}  # tuned rates where a sweep on the real data is recorded
            continue
        mlp = task.endswith("_mlp")
        expected = {"hessian_batch", "radius", "batch_size"} if mlp else {"hessian_batch", "radius"}
        assert changed == (expected - {"radius"} if paper["kind"] == "arc" else expected)  # ARC: sigma=None in both
        assert default["hessian_batch"] == 0.125 and default.get("radius") is None
        assert default["batch_size"] == (256 if mlp else paper["batch_size"])


def test_every_task_and_method_has_a_config():
    for task in TASKS:
        for method in METHODS:
            cfg = get_config(task, method)
            json.dumps(cfg)  # stored with every result
            assert cfg["kind"] == ("tr" if method.startswith("tr_") else "arc" if method.startswith("arc_")
                                   else "first_order")


def test_tr_options_are_validated():
    assert get_config("mnist_mlp", "tr_rms", hessian_batch=64)["hessian_batch"] == 64  # an int: a size
    assert get_config("mnist_mlp", "tr_rms", hessian_batch=0.25)["hessian_batch"] == 0.25
    for bad in (0, 0.0, 1.5, 64.0, -3, True, "half"):
        with pytest.raises(ValueError, match="'hessian_batch' must be a fraction of the batch in .0, 1. or a number"):
            get_config("mnist_mlp", "tr_rms", hessian_batch=bad)
    with pytest.raises(ValueError, match="'acceptance' must be one of 'own', 'independent', got 'batch'"):
        get_config("mnist_mlp", "tr_rms", acceptance="batch")
    with pytest.raises(ValueError, match="'batch_rule' must be one of 'paper', 'noise'"):
        get_config("mnist_mlp", "tr_rms", batch_rule="loss")
    with pytest.raises(ValueError, match="batch_rule='noise' estimates the gradient noise from the Hessian sub-batch"):
        get_config("mnist_mlp", "tr_rms", preset="paper", batch_rule="noise")
    with pytest.raises(ValueError, match="'noise_batch_scale' must be a positive number"):
        get_config("mnist_mlp", "tr_rms", batch_rule="noise", noise_batch_scale=0)
    with pytest.raises(ValueError, match="unknown setting 'hessian_batch' for method 'adam'"):
        get_config("mnist_mlp", "adam", hessian_batch=0.5)


def test_config_overrides_are_validated():
    assert get_config("mnist_mlp", "sgd", lr=1)["lr"] == 1.0
    with pytest.raises(ValueError, match="unknown setting 'radius' for method 'sgd'"):
        get_config("mnist_mlp", "sgd", radius=0.1)
    with pytest.raises(ValueError, match="'lr' must be a float"):
        get_config("mnist_mlp", "sgd", lr="fast")
    with pytest.raises(ValueError, match="'batch_size' must be a positive int"):
        get_config("mnist_mlp", "tr_rms", batch_size=0)
    with pytest.raises(ValueError, match="unknown method"):
        get_config("mnist_mlp", "lbfgs")
    assert parse_overrides(["lr=3e-3", "warmup_method=None", "subproblem=gltr"]) == {
        "lr": 3e-3, "warmup_method": None, "subproblem": "gltr"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["lr"])


# --- the objective and evaluation ------------------------------------------------------------

def test_objective_is_cross_entropy_plus_l2_and_evaluation_is_not_training(digits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    obj = runner.Objective("classification", model, 1e-4)
    x, y = digits[0].x, digits[0].y
    l2 = sum(float((p.detach().double() ** 2).sum()) for p in model.parameters())
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model(x), y)) + 1e-4 * l2
    assert float(obj(model(x), y).detach()) == pytest.approx(expected, rel=1e-6)
    model.train()
    loss, acc = runner.evaluate(model, obj, digits[0], batch_size=100)  # chunked
    assert loss == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        assert acc == pytest.approx(float((model(x).argmax(1) == y).float().mean()))
    assert model.training and all(p.grad is None for p in model.parameters())
    ae = runner.Objective("reconstruction", model, 0.0)
    out = torch.rand(5, 64)
    target = torch.rand(5, 64)
    assert float(ae(out, target)) == pytest.approx(float(((out - target) ** 2).sum(1).mean()), rel=1e-6)


# --- work counting and budgets ----------------------------------------------------------------

def test_sgd_backprops_follow_the_closed_form_and_evaluation_is_free(digits):
    dense = go("sgd", "3epochs", digits, overrides={"eval_every": 0.1})
    sparse = go("sgd", "3epochs", digits, overrides={"eval_every": 100.0})
    steps = 3 * math.ceil(N / 128)
    assert dense[-1]["backprops"] == sparse[-1]["backprops"] == dense[-1]["step"] == steps
    assert dense[-1]["epoch"] == 3.0 and len(dense) > len(sparse) == 2
    # evaluating 31 times did not change the trajectory by a single bit
    assert without_time(dense[-1:]) == without_time(sparse[-1:])


def test_tr_backprops_are_gradients_plus_hvps_and_evaluation_is_free(digits, monkeypatch):
    seen = []
    real_step = runner.TrustRegion.step

    def spy(self, closure, **extras):
        out = real_step(self, closure, **extras)
        seen.append(self.last["iterations"])
        assert not extras  # the paper's algorithm: products on the step's own batch
        return out

    monkeypatch.setattr(runner.TrustRegion, "step", spy)
    dense = go("tr_adagrad", "4epochs", digits, preset="paper", overrides={"eval_every": 0.05})
    steps = len(seen)
    assert dense[-1]["backprops"] == steps + sum(seen) and dense[-1]["step"] == steps
    sparse = go("tr_adagrad", "4epochs", digits, preset="paper", overrides={"eval_every": 100.0})
    assert without_time(dense[-1:]) == without_time(sparse[-1:])


def test_products_on_a_sub_batch_count_their_fraction_of_a_backprop_and_of_the_data(digits, monkeypatch):
    # independent of opt.counts: the sizes of the batches the runner built closures for, and the
    # products the solver reported
    sizes, steps = [], []
    real_closure, real_step = runner.Trainer.closure, runner.TrustRegion.step

    def closure_spy(self, idx):
        sizes.append(len(idx))
        return real_closure(self, idx)

    def step_spy(self, closure, **extras):
        out = real_step(self, closure, **extras)
        b, m = sizes[-2:]  # the step's batch, then its Hessian sub-batch
        assert extras["hessian_fraction"] == m / b and "test_closure" not in extras
        steps.append((b, m, self.last["iterations"]))
        return out

    monkeypatch.setattr(runner.Trainer, "closure", closure_spy)
    monkeypatch.setattr(runner.TrustRegion, "step", step_spy)
    log = go("tr_adagrad", "3epochs", digits, overrides={"eval_every": 100.0})  # the defaults: 1/8, batch 256
    assert {b for b, _, _ in steps} == {256, 157} and {m for _, m, _ in steps} == {32, 20}
    assert max(k for _, _, k in steps) > 1 and len(sizes) == 2 * len(steps)
    first = 1 / 8  # the automatic first radius: one product on the first step's sub-batch
    assert log[-1]["backprops"] == pytest.approx(first + sum(1 + m / b * (1 + k) for b, m, k in steps), rel=1e-12)
    assert log[-1]["data_passes"] == pytest.approx((32 + sum(b + m * (1 + k) for b, m, k in steps)) / N, rel=1e-12)
    steps.clear()
    sized = go("tr_adagrad", "1epochs", digits, overrides={"eval_every": 100.0, "hessian_batch": 40})
    assert {m for _, m, _ in steps} == {40}
    assert sized[-1]["data_passes"] == pytest.approx((40 + sum(b + m * (1 + k) for b, m, k in steps)) / N, rel=1e-12)


def test_data_passes_are_the_samples_through_gradients_and_products(digits, monkeypatch):
    # independent of opt.counts: the batch each step drew, and the products its solver reported
    steps, real_step = [], runner.Trainer.step

    def spy(self):
        drawn, tr = self.state.samples, isinstance(self.opt, runner.TrustRegion)
        real_step(self)
        steps.append((self.state.samples - drawn, self.opt.last["iterations"] if tr else 0))

    monkeypatch.setattr(runner.Trainer, "step", spy)
    log = go("tr_adagrad", "3epochs", digits, preset="paper")
    assert {b for b, _ in steps} == {512, 413} and max(k for _, k in steps) > 1
    assert log[-1]["data_passes"] == pytest.approx(sum(b * (1 + k) for b, k in steps) / N, rel=1e-12)
    assert log[-1]["data_passes"] > log[-1]["epoch"] == 3.0
    # a first-order step sends its batch through one gradient: data passes are epochs
    assert all(r["data_passes"] == pytest.approx(r["epoch"]) for r in go("sgd", "2.5epochs", digits))
    steps.clear()
    warm = go("tr_rms", "2epochs", digits, preset="paper", overrides={"warmup_method": "rmsprop", "warmup_lr": 5e-4,
                                                                       "warmup_epochs": 1, "radius": 0.05})
    main_steps = [(b, k) for b, k in steps if k]
    assert warm[1]["phase"] == "main" and warm[1]["data_passes"] == 1.0  # the warm-up epoch
    assert warm[-1]["data_passes"] == pytest.approx(1.0 + sum(b * (1 + k) for b, k in main_steps) / N)


def spent_per_step(unit):
    seen = []
    return seen, lambda info: seen.append(info[unit])


@pytest.mark.parametrize("method,budget", [("sgd", 25), ("tr_uniform", 40)])
def test_backprop_budget(method, budget, digits):
    seen, hook = spent_per_step("backprops")
    log = go(method, f"{budget}backprops", digits, on_step=hook)
    assert log[-1]["backprops"] == seen[-1] >= budget > seen[-2]  # stops at the first step that reaches it
    if method == "sgd":
        assert seen[-1] == budget


def test_epoch_budget_may_end_mid_epoch(digits):
    log = go("sgd", "2.5epochs", digits)
    assert 2.5 <= log[-1]["epoch"] < 2.5 + 128 / N


def test_time_budget_counts_training_only(digits, monkeypatch):
    real, calls = runner.evaluate, []

    def slow(*a, **k):
        calls.append(1)
        time.sleep(0.1)
        return real(*a, **k)

    monkeypatch.setattr(runner, "evaluate", slow)
    seen, hook = spent_per_step("seconds")
    t0 = time.perf_counter()
    log = go("sgd", "0.3s", digits, on_step=hook, overrides={"eval_every": 2.0})
    wall = time.perf_counter() - t0
    assert log[-1]["time"] == seen[-1] >= 0.3 > seen[-2]
    assert len(calls) >= 4 and log[-1]["time"] + 0.1 * len(calls) <= wall  # the sleeps were not counted


def test_tr_batch_grows_when_the_full_loss_check_fails(digits, monkeypatch):
    rising = iter(range(100))  # every check sees a higher full loss than the last
    monkeypatch.setattr(runner.Trainer, "full_training_loss", lambda self: float(next(rising)))
    log = go("tr_uniform", "6epochs", digits, overrides={"batch_size": 128, "batch_cap": 0.1})
    b, expected = 128, [128]
    for _ in range(6):  # x1.05 rounded up, capped at 10% of n = 143
        b = min(math.ceil(b * 1.05), int(0.1 * N))
        expected.append(b)
    assert [r["batch_size"] for r in log] == expected == [128, 135, 142, 143, 143, 143, 143]
    falling = iter(range(100, 0, -1))
    monkeypatch.setattr(runner.Trainer, "full_training_loss", lambda self: float(next(falling)))
    assert {r["batch_size"] for r in go("tr_uniform", "5epochs", digits, overrides={"batch_size": 128})} == {128}


def test_independent_acceptance_tests_each_step_on_a_fresh_batch_of_its_size(digits, monkeypatch):
    drawn, steps = [], []
    real_closure, real_step = runner.Trainer.closure, runner.TrustRegion.step

    def closure_spy(self, idx):
        drawn.append(idx.clone())
        return real_closure(self, idx)

    def step_spy(self, closure, **extras):
        out = real_step(self, closure, **extras)
        batch, sub, test = drawn[-3:]
        assert torch.equal(sub, batch[:len(sub)]) and len(test) == len(batch)
        steps.append((batch, test, self.last))
        return out

    monkeypatch.setattr(runner.Trainer, "closure", closure_spy)
    monkeypatch.setattr(runner.TrustRegion, "step", step_spy)
    go("tr_rms", "2epochs", digits, overrides={"acceptance": "independent", "eval_every": 100.0})
    for batch, test, last in steps:
        assert len(set(batch.tolist()) & set(test.tolist())) < len(batch) // 2  # not the step's batch
        assert math.isfinite(last["test_loss"]) and last["test_loss"] != last["loss"]
    assert len({tuple(t.tolist()) for _, t, _ in steps}) == len(steps)  # a new test batch every step


def test_noise_batch_rule_grows_the_batch_without_the_full_loss_check(digits, monkeypatch):
    def no_check(self):
        raise AssertionError("batch_rule='noise' needs no full-loss check")

    monkeypatch.setattr(runner.Trainer, "full_training_loss", no_check)
    log = go("tr_rms", "4epochs", digits, overrides={"batch_rule": "noise", "noise_batch_scale": 8.0,
                                                      "eval_every": 0.5})
    sizes = [r["batch_size"] for r in log]
    assert sizes[0] == 256 and sizes == sorted(sizes) and 256 < sizes[-1] <= int(0.2 * N)


def test_non_finite_curvature_ends_the_run_as_diverged(tmp_path, digits, monkeypatch):
    real_step, calls = runner.TrustRegion.step, []

    def failing(self, closure, **extras):
        calls.append(1)
        if len(calls) == 3:
            raise runner.NonFiniteCurvatureError()
        return real_step(self, closure, **extras)

    monkeypatch.setattr(runner.TrustRegion, "step", failing)
    log = go("tr_rms", "3epochs", digits, out=tmp_path)  # caught by the runner: no traceback
    assert len(calls) == 3 and log[-1]["step"] == 3 and math.isfinite(log[-1]["train_loss"])
    (r,) = load_runs(tmp_path)
    assert r.provenance["status"] == "diverged" and r.records == log
    assert go("tr_rms", "5epochs", digits, out=tmp_path) == log and len(calls) == 3  # a diverged run is over


def test_warmup_then_trust_region(digits):
    log = go("tr_rms", "2epochs", digits, preset="paper", overrides={"warmup_method": "rmsprop", "warmup_lr": 5e-4,
                                                                      "warmup_epochs": 1, "eval_every": 0.5})
    warm = [r for r in log if r["phase"] == "warmup"]
    main_ = [r for r in log if r["phase"] == "main"]
    assert warm and main_ and all(r["lr"] == 5e-4 and r["batch_size"] == 128 for r in warm)
    first = main_[0]
    assert first["epoch"] == 1.0 and first["backprops"] == math.ceil(N / 128) and first["radius"] == 1e-4
    assert all(r["batch_size"] == 512 and r["radius"] is not None for r in main_)


# --- resumption ------------------------------------------------------------------------------

class Stop(Exception):
    pass


def interrupt_at(step, exc):
    def hook(info):
        if info["steps"] == step:
            raise exc
    return hook


@pytest.mark.parametrize("method,overrides,stop_at", [
    ("tr_rms", {"warmup_method": "rmsprop", "warmup_lr": 5e-4, "warmup_epochs": 1}, 7),  # in the warm-up
    ("tr_rms", {"warmup_method": "rmsprop", "warmup_lr": 5e-4, "warmup_epochs": 1}, 17),  # in the TR phase
    ("adam", {}, 20),
    ("tr_rms", {"acceptance": "independent", "batch_rule": "noise", "noise_batch_scale": 8.0}, 9),
])
def test_ctrl_c_then_resume_is_bit_for_bit(tmp_path, digits, method, overrides, stop_at):
    overrides = dict(overrides, eval_every=0.3)
    reference = go(method, "4epochs", digits, overrides=overrides)
    with pytest.raises(KeyboardInterrupt):
        go(method, "4epochs", digits, overrides=overrides, out=tmp_path, on_step=interrupt_at(stop_at, KeyboardInterrupt))
    (run_file,) = tmp_path.glob("*.jsonl")
    assert load_runs(run_file)[0].provenance["status"] == "interrupted"
    assert load_runs(run_file)[0].provenance["budget_spent"]["steps"] == stop_at
    resumed = go(method, "4epochs", digits, overrides=overrides, out=tmp_path)
    assert without_time(resumed) == without_time(reference)
    (prov,) = [r.provenance for r in load_runs(tmp_path)]
    assert prov["status"] == "complete" and len(prov["sessions"]) == 2
    assert without_time(load_results(tmp_path)) == without_time(reference)


def test_crash_then_resume_from_the_epoch_checkpoint_is_bit_for_bit(tmp_path, digits):
    # A crash (or a killed process) writes nothing: the run restarts from the last epoch's checkpoint.
    reference = go("tr_adagrad", "3epochs", digits)
    with pytest.raises(Stop):
        go("tr_adagrad", "3epochs", digits, out=tmp_path, on_step=interrupt_at(9, Stop()))
    ck = load_checkpoint(next(tmp_path.glob("checkpoints/*.pt")))
    assert ck["state"]["epochs_done"] == 1 and ck["state"]["steps"] == 6  # 6 TR batches of 256 per epoch
    assert without_time(go("tr_adagrad", "3epochs", digits, out=tmp_path)) == without_time(reference)


def test_a_larger_budget_continues_a_finished_run(tmp_path, digits):
    reference = go("sgd", "3epochs", digits)
    short = go("sgd", "1epochs", digits, out=tmp_path)
    assert short[-1]["epoch"] == 1.0
    assert go("sgd", "1epochs", digits, out=tmp_path) == short  # nothing left to do: nothing redone
    assert without_time(go("sgd", "3epochs", digits, out=tmp_path)) == without_time(reference)


def test_resuming_with_other_settings_is_refused(tmp_path, digits):
    go("sgd", "1epochs", digits, out=tmp_path)
    with pytest.raises(ValueError, match="other settings.*lr"):
        go("sgd", "2epochs", digits, out=tmp_path, overrides={"lr": 0.1})
    assert go("sgd", "1epochs", digits, out=tmp_path, overrides={"lr": 0.1}, fresh=True)[-1]["lr"] == 0.1


def test_ctrl_c_in_the_cli_then_resume_is_bit_for_bit(tmp_path, digits, monkeypatch, capsys):
    # A real SIGINT, mid-epoch: it is honoured after the current step, the CLI says how to
    # resume and exits with 130; running the same command again finishes the run.
    real_step, calls = runner.Trainer.step, []

    def step_then_ctrl_c(self):
        real_step(self)
        calls.append(1)
        if len(calls) == 30:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(runner.Trainer, "step", step_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    argv = ["run", "--task", "mnist_mlp", "--method", "sgd", "--budget", "5epochs", "--out", str(tmp_path),
            "--quick", "--no-progress"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted: mnist_mlp sgd seed 0" in err and "Run the same command again to resume" in err
    (prov,) = [r.provenance for r in load_runs(tmp_path)]
    assert prov["status"] == "interrupted" and prov["budget_spent"]["steps"] == 30
    assert signal.getsignal(signal.SIGINT) is handler  # the run's own handler is gone
    assert main(argv) == 0
    reference = go("sgd", "5epochs", digits, quick=True)
    assert without_time(load_results(tmp_path)) == without_time(reference)


# --- provenance and results files ---------------------------------------------------------------

def test_provenance(tmp_path, digits):
    go("tr_rms", "1epochs", digits, out=tmp_path, seed=3)
    (r,) = load_runs(tmp_path)
    p = r.provenance
    assert r.path.name == "mnist_mlp__tr_rms__digits__seed3.jsonl"
    assert {"task", "method", "seed", "config", "budget", "budget_spent", "status", "dataset", "device", "torch",
            "trlib", "python", "git_commit", "started", "finished", "sessions"} <= set(p)
    assert (p["task"], p["method"], p["seed"], p["budget"], p["status"]) == ("mnist_mlp", "tr_rms", 3, "1epochs",
                                                                             "complete")
    assert p["config"] == get_config("mnist_mlp", "tr_rms")
    assert p["dataset"] == dict(name="digits", display_name=STAND_IN, is_stand_in=True, stand_in_for="mnist",
                                n_train=N, n_test=360)
    assert p["torch"] == torch.__version__ and p["device"] and p["started"][:4].isdigit()
    assert [(x["budget"], x["from_step"]) for x in p["sessions"]] == [("1epochs", 0)]
    assert p["budget_spent"]["data_passes"] == r.records[-1]["data_passes"] > p["budget_spent"]["epochs"] == 1.0
    if (ROOT / ".git").exists():
        assert len(p["git_commit"]) == 40
    assert all(rec["dataset"] == STAND_IN and rec["stand_in"] for rec in r.records)


def test_jsonl_round_trip_and_bad_files(tmp_path):
    records = [dict(task="t", method="sgd", seed=0, dataset="d", step=i, train_loss=1.0 / (i + 1), train_acc=None,
                    phase="main") for i in range(3)]
    prov = {"task": "t", "config": {"lr": 0.1, "warmup": None}, "status": "complete"}
    write_run(tmp_path / "a.jsonl", prov, records)
    (r,) = load_runs(tmp_path)
    assert r.verified and r.records == records and load_results(tmp_path / "a.jsonl") == records
    assert {k: v for k, v in r.provenance.items() if k != "integrity"} == prov
    text = (tmp_path / "a.jsonl").read_text()
    body = text.split("\n", 1)[1].encode()
    head = json.dumps(prov).encode()  # the checksum covers the provenance and every record line
    assert r.provenance["integrity"] == {"records": 3, "sha256": hashlib.sha256(head + b"\n" + body).hexdigest()}
    nan = [dict(records[0], train_loss=float("nan"))]
    write_run(tmp_path / "b.jsonl", prov, nan)
    assert math.isnan(load_results(tmp_path / "b.jsonl")[0]["train_loss"])
    assert load_runs(tmp_path / "b.jsonl")[0].verified
    legacy = "\n".join(json.dumps(x) for x in [{"provenance": prov}] + records) + "\n"  # before checksums
    (tmp_path / "legacy.jsonl").write_text(legacy)
    (old,) = load_runs(tmp_path / "legacy.jsonl")
    assert not old.verified and old.records == records
    (tmp_path / "c.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(ValueError, match="c.jsonl:1: a run file starts with a provenance line"):
        load_runs(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_runs(tmp_path / "missing")


# --- the table ---------------------------------------------------------------------------------

def fake_run(method, seed, reach_at, final_loss, task="mnist_mlp", dataset=STAND_IN, passes_per_bp=0.03):
    """Evaluations every 10 backprops; the accuracy crosses 99% at backprops=reach_at (None: never),
    and 90% at reach_at / 2."""
    out = []
    for i in range(11):
        bp = 10 * i
        acc = 0.5 if reach_at is None else 0.995 if bp >= reach_at else 0.92 if bp >= reach_at / 2 else 0.5
        out.append(dict(task=task, method=method, seed=seed, dataset=dataset, step=i, backprops=bp, epoch=bp / 100,
                        data_passes=bp * passes_per_bp, time=bp / 1000, train_loss=final_loss + (10 - i),
                        train_acc=acc, test_acc=acc - 0.1))
    return out


def test_table_statistics_match_scipy():
    reach = {0: 30, 1: 50, 2: 80}
    records = [r for s, at in reach.items() for r in fake_run("tr_rms", s, at, 0.1 * (s + 1))]
    records += [r for s, at in {0: 40, 1: None, 2: 60}.items() for r in fake_run("sgd", s, at, 0.5)]
    records += [r for s in range(2) for r in fake_run("adam", s, None, 0.7)]
    rows = {row["method"]: row for row in summarize(records)}
    xs = list(reach.values())
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=stats.tmean(xs), scale=stats.sem(xs))
    mean, half = rows["tr_rms"]["backprops"]
    assert mean == pytest.approx(sum(xs) / 3) and (mean - half, mean + half) == pytest.approx((lo, hi))
    assert rows["tr_rms"]["epochs"][0] == pytest.approx(sum(xs) / 300)
    assert rows["tr_rms"]["final_train_loss"][0] == pytest.approx(0.2)
    assert rows["sgd"]["reached"] == [0, 2] and rows["sgd"]["backprops"][0] == pytest.approx(50)
    assert rows["adam"]["reached"] == [] and rows["adam"]["backprops"] is None
    assert mean_ci([5.0]) == (5.0, pytest.approx(float("nan"), nan_ok=True))
    text = format_table(list(rows.values()))
    assert STAND_IN in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in rows}
    assert "3/3" in lines["tr_rms"] and f"53 ± {half:,.0f}" in lines["tr_rms"]
    assert "2/3" in lines["sgd"] and "(2/3 seeds)" in lines["sgd"]
    assert "0/2" in lines["adam"] and "never reached 99%" in lines["adam"]
    md = format_table(list(rows.values()), "markdown")
    assert md.count("| tr_rms |") == 1
    csv_rows = format_table(list(rows.values()), "csv").splitlines()
    assert csv_rows[0].startswith("task,dataset,method,seeds,reached,backprops_mean,backprops_ci")
    assert len(csv_rows) == 4 and float(csv_rows[1].split(",")[5]) == pytest.approx(mean)
    assert csv_rows[0].split(",")[7:9] == ["data_passes_mean", "data_passes_ci"]


def test_table_costs_to_a_chosen_threshold_in_four_measures():
    records = [r for s, at in {0: 40, 1: 80}.items() for r in fake_run("tr_rms", s, at, 0.1, passes_per_bp=0.05)]
    (row,) = summarize(records, threshold=0.9)
    # 90% is first reached at the first evaluation at or above reach_at / 2: backprops 20 and 40
    assert row["reached"] == [0, 1] and row["backprops"][0] == 30
    assert row["data_passes"][0] == pytest.approx(30 * 0.05) and row["epochs"][0] == pytest.approx(0.3)
    text = format_table([row], threshold=0.9)
    head = next(line for line in text.splitlines() if line.startswith("method"))
    for column in ("reached 90%", "backprops to 90%", "data passes to 90%", "epochs to 90%", "seconds to 90%"):
        assert column in head
    assert "1.5 ± " in text  # data passes: mean 1.5 over the two seeds
    assert "reached 99.5%" in format_table(summarize(records, threshold=0.995), threshold=0.995)
    # files written before data passes were recorded: the column says so
    old = [{k: v for k, v in r.items() if k != "data_passes"} for r in records]
    (row,) = summarize(old, threshold=0.9)
    assert row["data_passes"] is None and row["backprops"][0] == 30
    assert "not recorded" in format_table([row], threshold=0.9)


def test_table_of_an_autoencoder_has_no_accuracy():
    records = [dict(r, train_acc=None, test_acc=None) for r in fake_run("sgd", 0, None, 1.0, task="mnist_autoencoder")]
    (row,) = summarize(records)
    assert row["reached"] is None and row["final_test_acc"] is None
    assert "n/a (no accuracy)" in format_table([row])


# --- data choice and naming ----------------------------------------------------------------------

def test_auto_falls_back_to_the_stand_in_loudly_and_real_fails_clearly(monkeypatch, capsys):
    def missing(name, **kw):
        if name == "mnist":
            raise DatasetUnavailableError("MNIST ('mnist') is not available: no copy here.\nTo get it: ...")
        return real_load(name, **kw)

    real_load = runner.load_dataset
    monkeypatch.setattr(runner, "load_dataset", missing)
    train, test = load_data("mnist_mlp", "auto")
    assert train.is_stand_in and test.is_stand_in and train.display_name == STAND_IN
    assert "NOTE: sklearn digits (offline stand-in for MNIST) is used, not MNIST: MNIST ('mnist') is not available" \
        in capsys.readouterr().err
    with pytest.raises(DatasetUnavailableError, match="is not available"):
        load_data("mnist_mlp", "real")
    assert main(["run", "--task", "mnist_mlp", "--method", "sgd", "--budget", "1epochs", "--out", "/nonexistent",
                 "--data", "real"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: MNIST ('mnist') is not available") and "Traceback" not in err


# --- command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["run", "--task", "mnist_mlp", "--method", "sgd", "--budget", "20parsecs", "--out", "x"], "invalid budget"),
    (["run", "--task", "mnist_mpl", "--method", "sgd", "--budget", "1epochs", "--out", "x"], "unknown task 'mnist_mpl'"),
    (["run", "--task", "mnist_mlp", "--method", "newton", "--budget", "1epochs", "--out", "x"], "unknown method"),
    (["run", "--task", "mnist_mlp", "--method", "sgd", "--out", "x"], "--budget"),
    (["run", "--task", "mnist_mlp", "--method", "tr_rms", "--budget", "1epochs", "--out", "x", "--set", "lr=0.1"],
     "unknown setting 'lr' for method 'tr_rms'"),
    (["run", "--task", "mnist_mlp", "--method", "sgd", "--budget", "1epochs", "--out", "x", "--data", "web"],
     "invalid choice: 'web'"),
    (["run", "--task", "mnist_mlp", "--method", "sgd", "--budget", "1epochs", "--out", "x", "--seeds", "-1"],
     "seeds must be >= 0"),
    (["table", "--in", "/nonexistent/results"], "no results at"),
    (["table", "--in", ".", "--threshold", "99"], "expected a number in (0, 1]"),
    (["plot", "--in", ".", "--x", "hours", "--out", "f.png"], "invalid choice: 'hours'"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_give_a_clean_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "usage:" in err


def test_cuda_without_cuda_is_a_clean_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        main(["run", "--task", "mnist_mlp", "--method", "sgd", "--budget", "1epochs", "--out", "x", "--device", "cuda"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_cli_end_to_end(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "trlib.experiments", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    out = tmp_path / "results"
    done = cli("run", "--task", "mnist_mlp", "--method", "tr_uniform", "sgd", "--seeds", "0", "1", "--budget",
               "60backprops", "--out", str(out), "--data", "stand-in", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert "NOTE: sklearn digits (offline stand-in for MNIST) is used" in done.stderr
    assert len(list(out.glob("*.jsonl"))) == 4 and done.stdout.count(STAND_IN) == 4
    table = cli("table", "--in", str(out))
    assert table.returncode == 0, table.stderr
    assert f"mnist_mlp on {STAND_IN}" in table.stdout and "tr_uniform" in table.stdout and "sgd" in table.stdout
    fig = tmp_path / "fig.png"
    plot = cli("plot", "--in", str(out), "--x", "data_passes", "--out", str(fig))
    assert plot.returncode == 0, plot.stderr
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = cli("table", "--in", str(out), "--threshold", "0.5")
    assert table.returncode == 0 and "data passes to 50%" in table.stdout, table.stderr


def test_tr_options_from_the_cli(tmp_path, capsys):
    assert main(["config", "--task", "fashion_mnist_mlp", "--method", "tr_rms", "--set", "hessian_batch=64",
                 "acceptance=independent"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["hessian_batch"], cfg["acceptance"], cfg["batch_size"]) == (64, "independent", 256)
    assert main(["run", "--task", "mnist_mlp", "--method", "tr_rms", "--budget", "2backprops", "--out", str(tmp_path),
                 "--data", "stand-in", "--no-progress", "--set", "hessian_batch=0.5"]) == 0
    (r,) = load_runs(tmp_path)
    assert r.provenance["config"]["hessian_batch"] == 0.5 and r.records[-1]["backprops"] % 0.5 == 0


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and "--budget" in out and "5000backprops" in out and "--data {auto,real,stand-in}" in out
    assert "auto: CUDA when present, else the CPU (default: auto)" in out and "--preset {paper}" in out


def test_device_auto_is_cuda_when_present(tmp_path, digits):
    assert runner.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert runner.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            runner.resolve_device("cuda:0")
    assert main(["run", "--task", "mnist_mlp", "--method", "sgd", "--budget", "1backprops", "--out", str(tmp_path),
                 "--data", "stand-in", "--no-progress"]) == 0  # no --device
    (r,) = load_runs(tmp_path)
    assert r.provenance["device_type"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_quick_demo_trains_tr_rms_with_the_automatic_first_radius(digits):
    # the paper's first radius 1e-4 is for thousands of steps: in the 30 steps of the quick demo
    # TR-RMS stays near chance; the automatic first radius (the first Cauchy step) trains
    assert get_config("mnist_mlp", "tr_rms", quick=True)["radius"] is None
    demo = go("tr_rms", "10epochs", digits, quick=True)
    paper = go("tr_rms", "10epochs", digits, quick=True, preset="paper")
    assert paper[0]["radius"] == 1e-4 and paper[-1]["train_acc"] < 0.5 < 0.9 < demo[-1]["train_acc"]
    assert go("tr_rms", "1epochs", digits, quick=True, overrides={"radius": 1e-4})[-1]["radius"] < 1e-3
    with pytest.raises(ValueError, match="unknown preset 'authors'; valid presets: paper"):
        get_config("mnist_mlp", "tr_rms", preset="authors")


def test_quick_mode_runs_every_task(digits):
    # Quick mode is what the book runs: one step of every task on its stand-in.
    for task in TASKS:
        if task == "cifar_resnet18":  # 11M parameters: too slow for CI (same code as ResNet-20)
            continue
        data = digits if TASKS[task].dataset == "mnist" else None
        log = run(task, "tr_rms", 0, "1backprops", quick=True, progress=False, verbose=False, datasets=data)
        assert log[-1]["backprops"] >= 1 and log[-1]["dataset"].startswith("sklearn digits (offline stand-in for")


def test_docstring_examples():
    import trlib.experiments.configs as configs
    import trlib.experiments.results as results

    for module in (configs, results, runner):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, module.__name__
