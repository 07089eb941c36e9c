"""The runner's methods beyond the paper (arc_rms, tr_adam, tr_hutchinson, tr_fisher, tr_rms_ggn, arc_rms_ggn)
on the sklearn digits stand-in: configurations, curvature of the objective, counts, training."""

import math

import pytest
import torch

from trlib.experiments import ARC_METHODS, BEYOND_PAPER, METHODS, get_config, load_data, run
from trlib.experiments.runner import Trainer
from trlib.gauss_newton import ggn_operator


@pytest.fixture(scope="module")
def digits():
    return load_data("mnist_mlp", "stand-in", verbose=False)


def test_configs_of_the_new_methods():
    assert set(BEYOND_PAPER) <= set(METHODS)
    cfg = get_config("fashion_mnist_mlp", "arc_rms")
    assert cfg["kind"] == "arc" and cfg["sigma"] is None and "radius" not in cfg and cfg["subproblem"] == "lanczos"
    assert cfg["hessian_batch"] == 0.125 and cfg["curvature"] == "hessian"
    assert get_config("mnist_mlp", "tr_rms_ggn")["curvature"] == "ggn"
    assert get_config("mnist_mlp", "arc_rms", curvature="ggn", sigma=2.0)["sigma"] == 2.0
    assert "curvature" not in get_config("mnist_mlp", "tr_rms")  # the paper's methods keep their recorded configs
    with pytest.raises(ValueError, match="curvature"):
        get_config("mnist_mlp", "tr_adam", curvature="fisher")
    with pytest.raises(ValueError, match="sigma"):
        get_config("mnist_mlp", "arc_rms", sigma=-1.0)
    with pytest.raises(ValueError, match="radius"):
        get_config("mnist_mlp", "arc_rms", radius=1.0)


@pytest.mark.parametrize("task", ["mnist_mlp", "mnist_autoencoder"])
def test_the_runner_ggn_is_the_objectives_gauss_newton_matrix(task, digits):
    data = digits if task == "mnist_mlp" else load_data(task, "stand-in", verbose=False)
    train = data[0]
    trainer = Trainer(get_config(task, "tr_rms_ggn"), train, data[1], torch.device("cpu"), 0)
    idx = torch.arange(12)
    G = trainer.ggn_closure(idx)()
    v = torch.randn(sum(p.numel() for p in trainer.model.parameters()), generator=torch.Generator().manual_seed(0))
    x = train.x[idx]
    if task == "mnist_mlp":  # mean cross-entropy + l2 ||w||^2
        ref = ggn_operator(trainer.model, x, train.y[idx], "cross_entropy")(v) + 2 * trainer.objective.l2 * v
    else:  # squared error summed over pixels, averaged over images: (2 / B) J^T J
        ref = ggn_operator(trainer.model, x, x, "mse", reduction="sum")(v) / len(idx)
    torch.testing.assert_close(G(v), ref)


@pytest.mark.parametrize("method", sorted(BEYOND_PAPER))
def test_each_new_method_trains_and_counts_its_work(method, digits):
    log = run("mnist_mlp", method, 0, "1epochs", datasets=digits, progress=False, verbose=False,
              overrides=dict(eval_every=0.5))
    first, last = log[0], log[-1]
    assert last["train_loss"] < first["train_loss"], (method, first["train_loss"], last["train_loss"])
    steps = last["step"]
    # per step: 1 gradient, products and the sub-batch's gradient at 1/8 (Hessian products only),
    # and for tr_fisher one more gradient (the per-sample pass)
    extra = 1.0 if method == "tr_fisher" else 0.0
    assert last["backprops"] >= steps * (1 + extra) and math.isfinite(last["backprops"])
    if method in ARC_METHODS:
        assert last["radius"] is None and last["sigma"] > 0
