"""trlib.experiments.sweep: the learning-rate sweep of the baselines (scores, the grid's
extension at its ends, seeds, files), against closed-form fake runs and real runs on the digits."""

import math

import pytest

from trlib.experiments import get_config, load_data, load_runs, pick_rates, sweep


def fake_log(loss):
    return [{"train_loss": 2.3, "epoch": 0.0}, {"train_loss": loss, "epoch": 1.0}]


def bowl(center):
    """A fake run whose final loss is a bowl in log(lr) around ``center``, shifted by the seed."""
    calls = []

    def train(method, seed, lr):
        calls.append((method, seed, lr))
        return fake_log(0.1 + (math.log10(lr) - math.log10(center)) ** 2 + 0.01 * seed)

    return train, calls


def test_pick_rates_scores_the_mean_over_seeds_and_finds_the_configured_rate():
    logs = {("sgd", 0.1): [fake_log(0.5), fake_log(0.7)], ("sgd", 0.3): [fake_log(0.4), fake_log(0.2)],
            ("sgd", 1.0): [fake_log(0.1), fake_log(math.inf)], ("adam", 1e-3): fake_log(0.3)}
    rates = pick_rates(logs, configured={"sgd": 0.05, "adam": 1e-3})
    sgd = rates["sgd"]
    assert sgd["grid"] == [0.1, 0.3, 1.0] and sgd["best"] == 0.3 and not sgd["edge"]
    assert sgd["scores"][1.0][0] == math.inf  # one seed diverged
    mean, half = sgd["scores"][0.3]
    assert mean == pytest.approx(0.3) and half == pytest.approx(12.706204736 * 0.1, rel=1e-6)  # t(0.975, 1) sd/sqrt(2)
    assert sgd["configured"] == 0.1  # the grid's rate nearest 0.05 in ratio
    assert rates["adam"] == dict(grid=[1e-3], scores={1e-3: (0.3, rates["adam"]["scores"][1e-3][1])}, best=1e-3,
                                 configured=1e-3, edge=False)
    assert list(pick_rates({("sgd", 0.1): fake_log(0.2), ("sgd", 0.3): fake_log(0.2)})["sgd"]["grid"]) == [0.1, 0.3]
    assert pick_rates({("sgd", 0.1): fake_log(0.2), ("sgd", 0.3): fake_log(0.2)})["sgd"]["best"] == 0.1  # a tie


def test_the_grid_extends_beyond_an_end_while_the_best_sits_there():
    train, calls = bowl(center=30.0)  # far above SGD's configured 0.05 on the MLPs
    result = sweep("mnist_mlp", ["sgd"], "1epochs", seeds=(0, 1), extend=3, train=train)
    grid = result.rates["sgd"]["grid"]
    start = [0.005, 0.015, 0.05, 0.15, 0.5]
    assert grid[:5] == start and len(grid) == 8  # three extensions: the best stayed at the top each time
    for prev, here, new in zip(grid[3:], grid[4:], grid[5:]):
        assert new == pytest.approx(here * here / prev, rel=5e-3)  # the grid's last ratio, to 3 digits
    assert result.best["sgd"] == grid[-1] and result.rates["sgd"]["edge"]
    assert [c for c in calls if c[2] == 0.05] == [("sgd", 0, 0.05), ("sgd", 1, 0.05)]  # every seed at every rate
    assert len(calls) == 2 * len(grid) and result.configured == {"sgd": get_config("mnist_mlp", "sgd")["lr"]}
    train, calls = bowl(center=0.05)
    inside = sweep("mnist_mlp", ["sgd", "adagrad"], "1epochs", extend=3, train=train, rates=[0.01, 0.05, 0.25])
    assert inside.best == {"sgd": 0.05, "adagrad": 0.05} and len(calls) == 6  # inside the grid: no extension
    train, calls = bowl(center=1e-6)
    low = sweep("mnist_mlp", ["adam"], "1epochs", factors=(0.1, 1, 10), extend=1, train=train)
    assert low.rates["adam"]["grid"][0] == pytest.approx(get_config("mnist_mlp", "adam")["lr"] * 1e-2)


def test_the_table_lists_every_rate_with_its_seeds():
    train, _ = bowl(center=0.05)
    result = sweep("mnist_mlp", ["sgd"], "1epochs", seeds=(0, 1, 2), train=train, factors=(0.1, 1, 10))
    rows = result.table()
    assert [r["lr"] for r in rows] == [0.005, 0.05, 0.5] and all(r["seeds"] == 3 for r in rows)
    best = next(r for r in rows if r["best"])
    assert best["lr"] == 0.05 and best["configured"] and best["finals"] == pytest.approx([0.1, 0.11, 0.12])
    assert best["final_train_loss"][0] == pytest.approx(0.11)
    text = result.format()
    assert text.splitlines()[0].split() == ["method", "lr", "seeds", "final", "train", "loss", "best", "configured"]
    assert "0.11 ± 0.025" in text and result.format("markdown").startswith("| method | lr |")


def test_a_real_sweep_writes_one_folder_per_rate_and_a_rerun_trains_nothing(tmp_path):
    digits = load_data("mnist_mlp", "stand-in", verbose=False)
    kwargs = dict(rates=[0.01, 0.1], seeds=(0, 1), datasets=digits, progress=False, verbose=False, out=tmp_path,
                  overrides={"eval_every": 0.5})
    seen = []
    first = sweep("mnist_mlp", ["sgd"], "1epochs", on_run=lambda *a: seen.append(a[:3]), **kwargs)
    assert seen == [("sgd", 0.01, 0), ("sgd", 0.01, 1), ("sgd", 0.1, 0), ("sgd", 0.1, 1)]
    runs = load_runs(tmp_path)
    assert sorted({r.path.parent.name for r in runs}) == ["sgd_lr0.01", "sgd_lr0.1"] and len(runs) == 4
    assert {(r.provenance["config"]["lr"], r.provenance["config"]["eval_every"]) for r in runs} == {(0.01, 0.5),
                                                                                                    (0.1, 0.5)}
    again = sweep("mnist_mlp", ["sgd"], "1epochs", **kwargs)  # the finished runs are read back, not retrained
    assert again.logs == first.logs and again.best == first.best == {"sgd": 0.1}
    with pytest.raises(ValueError, match="unknown method"):
        sweep("mnist_mlp", ["lbfgs"], "1epochs", **kwargs)
