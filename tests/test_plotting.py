"""trlib.plotting: the band statistics against SciPy, what each figure draws and says
(axes, labels, the 99% line, the dataset's display name), on synthetic logs."""

import doctest

import matplotlib
import numpy as np
import pytest
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trlib import plotting  # noqa: E402

STAND_IN = "sklearn digits (offline stand-in for MNIST)"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def fake(method, seed, slope, task="mnist_mlp", dataset=STAND_IN, steps=11, acc=True):
    """Loss 1/(1 + slope*x) and accuracy min(1, slope*x/10) at x = 0, 10, ..., 100 backprops."""
    out = []
    for i in range(steps):
        x = 10.0 * i
        out.append(dict(task=task, method=method, seed=seed, dataset=dataset, step=i, backprops=x, epoch=x / 50,
                        data_passes=x / 20, time=x / 100 * (1 + seed), train_loss=1 / (1 + slope * x),
                        test_loss=1 / (1 + slope * x),
                        train_acc=min(1.0, slope * x / 10) if acc else None,
                        test_acc=min(1.0, slope * x / 12) if acc else None))
    return out


def records():
    return [r for seed, s in enumerate((0.05, 0.1, 0.15)) for r in fake("tr_rms", seed, s)] + \
           [r for seed, s in enumerate((0.02, 0.03)) for r in fake("sgd", seed, s)]


def test_mean_band_matches_scipy():
    curves = [([0, 10, 20], [0.0, 1.0, 2.0]), ([0, 20], [0.0, 4.0]), ([0, 5, 25], [1.0, 2.0, 3.0])]
    grid, mean, lo, hi = plotting.mean_band(curves, grid_points=5)
    assert grid.tolist() == [0.0, 5.0, 10.0, 15.0, 20.0]  # up to the shortest curve's end
    at = np.array([np.interp(grid, x, y) for x, y in curves])
    np.testing.assert_allclose(mean, at.mean(0))
    for j in range(5):
        low, high = stats.t.interval(0.95, 2, loc=at[:, j].mean(), scale=stats.sem(at[:, j]))
        assert (lo[j], hi[j]) == pytest.approx((low, high))
    g, m, l1, h1 = plotting.mean_band(curves[:1], grid_points=3)
    assert m.tolist() == l1.tolist() == h1.tolist() == [0.0, 1.0, 2.0]


def test_plot_curves_draws_mean_band_threshold_and_names_the_stand_in():
    ax = plotting.plot_curves(records(), x="backprops", y="train_acc", grid_points=11)
    assert ax.get_title() == f"mnist_mlp on {STAND_IN}"
    assert ax.get_xlabel() == "backprops (gradients + Hessian-vector products)"
    assert ax.get_ylabel() == "training accuracy"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["TR, RMSProp ellipsoid (3 seeds)", "SGD (2 seeds)", "99% accuracy"]
    tr_line = ax.get_lines()[0]
    expected = np.mean([np.minimum(1, s * np.linspace(0, 100, 11) / 10) for s in (0.05, 0.1, 0.15)], 0)
    np.testing.assert_allclose(tr_line.get_ydata(), expected)
    threshold = ax.get_lines()[-1]
    assert list(threshold.get_ydata()) == [0.99, 0.99] and threshold.get_linestyle() == ":"
    assert len(ax.collections) == 2  # one band per method
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() <= 1.0 and band[:, 1].min() >= 0.0  # accuracy bands stay in [0, 1]


def test_axes_scales_and_styles():
    ax = plotting.plot_curves(records(), x="time", y="train_loss")
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "training time [s]"
    assert all(line.get_ydata()[0] != 0.99 for line in ax.get_lines())  # no accuracy line on a loss panel
    # the common grid ends where the shortest seed ends (seed 0 of each method: time 1.0)
    assert ax.get_lines()[0].get_xdata()[-1] == pytest.approx(1.0)
    assert ax.get_lines()[0].get_linestyle() == "-" and ax.get_lines()[1].get_linestyle() == "--"
    ax2 = plotting.plot_curves(records(), x="epochs", y="test_acc", ax=plt.figure().gca(), methods=["sgd"],
                               threshold=None, legend=False)
    assert ax2.get_xlabel().startswith("epochs") and len(ax2.get_lines()) == 1 and ax2.get_legend() is None


def test_plot_comparison_one_row_per_task_and_no_accuracy_for_autoencoders():
    recs = records() + [r for s in (0, 1) for r in fake("tr_uniform", s, 0.1, task="mnist_autoencoder", acc=False)]
    fig = plotting.plot_comparison(recs, x="epochs", ys=("train_loss", "train_acc"))
    axes = np.array(fig.axes).reshape(2, 2)
    assert axes[0, 0].get_title() == f"mnist_autoencoder on {STAND_IN}"
    assert not axes[0, 1].axison and "no accuracy" in axes[0, 1].texts[0].get_text()
    assert axes[1, 1].get_title() == f"mnist_mlp on {STAND_IN}" and axes[1, 1].get_ylabel() == "training accuracy"
    assert "95%" in fig._suptitle.get_text()


def test_plot_budget_axes_shows_backprops_data_passes_epochs_and_time():
    fig = plotting.plot_budget_axes(records(), y="train_loss")
    assert [ax.get_xlabel().split()[0] for ax in fig.axes] == ["backprops", "data", "epochs", "training"]
    line = fig.axes[1].get_lines()[0]  # against data passes = backprops / 20
    assert line.get_xdata()[-1] == pytest.approx(100 / 20)
    old = [{k: v for k, v in r.items() if k != "data_passes"} for r in records()]  # written before they were
    assert len(plotting.plot_budget_axes(old).axes) == 3
    with pytest.raises(ValueError, match="data_passes is not recorded"):
        plotting.plot_curves(old, x="data_passes")


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="invalid x 'hours'"):
        plotting.plot_curves(records(), x="hours")
    with pytest.raises(ValueError, match="invalid y"):
        plotting.plot_curves(records(), y="accuracy")
    two = records() + fake("sgd", 0, 0.1, task="cifar_mlp", dataset="sklearn digits (offline stand-in for CIFAR-10)")
    with pytest.raises(ValueError, match="several .task, dataset. pairs"):
        plotting.plot_curves(two)
    assert plotting.plot_curves(two, task="cifar_mlp").get_title().endswith("(offline stand-in for CIFAR-10)")
    with pytest.raises(ValueError, match="not recorded"):
        plotting.plot_curves(fake("sgd", 0, 0.1, task="mnist_autoencoder", acc=False), y="train_acc")
    with pytest.raises(ValueError, match="no records"):
        plotting.plot_curves(records(), task="cifar_conv")


def test_docstring_examples():
    assert doctest.testmod(plotting, optionflags=doctest.ELLIPSIS).failed == 0


# ----------------------------------------------------------------------------- autoencoder figures
def test_reconstructions_draw_each_image_in_its_row():
    rng = np.random.default_rng(0)
    inputs, outputs = rng.random((4, 1, 3, 2)), rng.random((4, 6))
    fig = plotting.plot_reconstructions([("inputs", inputs), ("outputs", outputs)], (3, 2), title="t")
    axes = np.array(fig.axes).reshape(2, 4)
    for row, images in zip(axes, (inputs, outputs)):
        for ax, image in zip(row, images):
            np.testing.assert_array_equal(ax.images[0].get_array(), image.reshape(3, 2))
            assert ax.images[0].get_clim() == (0, 1)
    assert [ax.get_title(loc="left") for ax in axes[:, 0]] == ["inputs", "outputs"]
    with pytest.raises(ValueError, match="equally many"):
        plotting.plot_reconstructions([("a", inputs), ("b", outputs[:3])], (3, 2))


def test_tr_diagnostics_panels_hold_the_traces():
    curvature = [dict(backprops=b, loss=5.0 - b, grad_norm=1.0 / (1 + b), lam_min=-0.1 * b) for b in (0, 1, 2)]
    steps = [dict(backprops=1, accepted=True, on_boundary=True, length=0.5, share=[0.25, 0.75]),
             dict(backprops=2, accepted=True, on_boundary=False, length=0.1, share=[0.5, 0.5]),
             dict(backprops=3, accepted=False, on_boundary=True, length=0.0, share=None)]
    fig = plotting.plot_tr_diagnostics({"tr_rms": dict(curvature=curvature, steps=steps)}, ["enc1", "dec1"],
                                       reference=4.5)
    loss, grad, lam, lengths, shares = fig.axes
    np.testing.assert_allclose(loss.lines[0].get_ydata(), [5.0, 4.0, 3.0])
    assert loss.lines[-1].get_ydata()[0] == 4.5  # the reference line
    np.testing.assert_allclose(lam.lines[0].get_ydata(), [0.0, -0.1, -0.2])
    assert grad.get_yscale() == "log" and lengths.get_yscale() == "log"
    filled, hollow = lengths.collections  # the rejected step is not drawn
    np.testing.assert_allclose(filled.get_offsets(), [[1, 0.5]])
    np.testing.assert_allclose(hollow.get_offsets(), [[2, 0.1]])
    np.testing.assert_allclose([p.get_height() for p in shares.patches], [0.375, 0.625])  # mean over accepted steps
    assert [t.get_text() for t in shares.get_xticklabels()] == ["enc1", "dec1"]
