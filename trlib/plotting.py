"""Figures of the experiments: learning curves with confidence bands over seeds.

Each seed's curve is interpolated on a common grid of the x axis (from 0 to the shortest
seed's end, so every grid point averages all seeds); the line is the mean and the band the
95% confidence interval of the mean (Student's t over seeds). Accuracy panels draw the
99% line the paper's Figure 3 uses. Titles name the dataset by its display name, so a
stand-in (e.g. "sklearn digits (offline stand-in for MNIST)") is never labelled as the real
dataset.

>>> import matplotlib; matplotlib.use("Agg")
>>> from trlib.experiments import run
>>> from trlib import plotting
>>> logs = [r for s in (0, 1) for r in run("mnist_mlp", "sgd", s, "2epochs", data="stand-in",
...                                          progress=False, verbose=False, threads=1)]
>>> ax = plotting.plot_curves(logs, x="epochs", y="train_acc")
>>> ax.get_title()
'mnist_mlp on sklearn digits (offline stand-in for MNIST)'
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["X_AXES", "Y_LABELS", "METHOD_LABELS", "method_style", "mean_band", "plot_curves",
           "plot_comparison", "plot_budget_axes", "region_outline", "plot_contours", "plot_reconstructions",
           "plot_tr_diagnostics"]

#: x axis name -> (record key, axis label)
X_AXES = {
    "backprops": ("backprops", "backprops (gradients + Hessian-vector products)"),
    "data_passes": ("data_passes", "data passes (samples through gradients and products / training-set size)"),
    "epochs": ("epoch", "epochs (samples seen / training-set size)"),
    "time": ("time", "training time [s]"),
}
Y_LABELS = {"train_loss": "training loss", "test_loss": "test loss",
            "train_acc": "training accuracy", "test_acc": "test accuracy"}
#: Legend label of each method. ``tr_uniform_equal_volume`` is a ``tr_uniform`` run relabelled: its first
#: radius gives the sphere the volume of TR-RMS's first region (chapter 7 of the course). Chapter 8
#: ("Beyond the paper") trains variants of TR-RMS through the runner's settings and names each run after
#: what it changes (``hessian_batch``: the fraction of the batch the Hessian-vector products see;
#: ``norm``: the region's shape). Runs with the authors' table (``preset="paper"``) shown next to the
#: library's defaults are relabelled ``<method>_paper`` (chapter 5), so that the two never share a curve.
METHOD_LABELS = {"tr_uniform": "TR, sphere (uniform)",
                 "tr_uniform_equal_volume": "TR, sphere (equal-volume first radius)",
                 "tr_adagrad": "TR, Adagrad ellipsoid", "tr_rms": "TR, RMSProp ellipsoid", "sgd": "SGD",
                 "adagrad": "Adagrad", "rmsprop": "RMSProp", "adam": "Adam",
                 "tr_rms_full_hessian": "TR-RMS, products on the whole batch",
                 "tr_rms_hessian_1_8": "TR-RMS, products on 1/8 of the batch",
                 "tr_rms_hessian_1_32": "TR-RMS, products on 1/32 of the batch", "tr_adam": "TR, Adam ellipsoid",
                 "tr_hutchinson": "TR, Hutchinson ellipsoid", "tr_fisher": "TR, empirical Fisher ellipsoid",
                 "tr_rms_safeguarded": "TR, RMSProp ellipsoid, safeguarded",
                 "tr_rms_ggn": "TR-RMS, Gauss-Newton curvature", "arc_rms": "ARC, RMSProp ellipsoid",
                 "adam_lr0.001": "Adam, lr 1e-3"}
METHOD_LABELS.update({f"{m}_paper": f"{METHOD_LABELS[m]}, authors' settings"
                      for m in ("tr_uniform", "tr_adagrad", "tr_rms")})
_COLORS = {"tr_uniform": "tab:blue", "tr_uniform_equal_volume": "tab:brown", "tr_adagrad": "tab:orange",
           "tr_rms": "tab:red", "sgd": "tab:gray", "adagrad": "tab:olive", "rmsprop": "tab:purple", "adam": "tab:cyan",
           "tr_rms_full_hessian": "darkred", "tr_rms_hessian_1_8": "tab:red", "tr_rms_hessian_1_32": "salmon",
           "tr_adam": "tab:green", "tr_hutchinson": "tab:pink", "tr_fisher": "gold", "tr_rms_safeguarded": "tab:brown",
           "tr_rms_ggn": "navy", "arc_rms": "black", "adam_lr0.001": "teal", "tr_uniform_paper": "lightskyblue",
           "tr_adagrad_paper": "peru", "tr_rms_paper": "orchid"}


def method_style(method: str) -> Dict[str, Any]:
    """Colour and line style of a method: TR methods solid, first-order baselines dashed."""
    return dict(color=_COLORS.get(method), linestyle="-" if method.startswith("tr_") else "--")


def mean_band(curves: Sequence[Tuple[Sequence[float], Sequence[float]]], grid_points: int = 200,
              confidence: float = 0.95):
    """``(grid, mean, low, high)`` of curves ``(x, y)`` (one per seed, x non-decreasing)
    interpolated on a common grid from 0 to the smallest final x. With one curve the band
    is the curve itself.

    >>> g, m, lo, hi = mean_band([([0, 2], [0, 2]), ([0, 1, 2], [0, 2, 2])], grid_points=3)
    >>> g.tolist(), m.tolist()
    ([0.0, 1.0, 2.0], [0.0, 1.5, 2.0])
    """
    from scipy import stats

    if not curves:
        raise ValueError("no curves to average")
    end = min(float(np.max(x)) for x, _ in curves)
    grid = np.linspace(0.0, end, grid_points)
    ys = np.stack([np.interp(grid, np.asarray(x, float), np.asarray(y, float)) for x, y in curves])
    mean = ys.mean(0)
    n = len(curves)
    if n < 2:
        return grid, mean, mean, mean
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * ys.std(0, ddof=1) / math.sqrt(n)
    return grid, mean, mean - half, mean + half


def group_runs(records: Iterable[Dict[str, Any]]) -> Dict[tuple, Dict[Any, List[Dict[str, Any]]]]:
    """``{(task, dataset, method): {seed: records sorted by step}}``."""
    groups: Dict[tuple, Dict[Any, List[Dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        groups[(rec["task"], rec["dataset"], rec["method"])][rec["seed"]].append(rec)
    return {k: {seed: sorted(v, key=lambda r: r["step"]) for seed, v in sorted(runs.items())}
            for k, runs in groups.items()}


def _select(records: Iterable[Dict[str, Any]], task: Optional[str], methods: Optional[Sequence[str]]):
    groups = group_runs(records)
    if task is not None:
        groups = {k: v for k, v in groups.items() if k[0] == task}
    if methods is not None:
        groups = {k: v for k, v in groups.items() if k[2] in methods}
    problems = sorted({k[:2] for k in groups})
    if not problems:
        raise ValueError(f"no records to plot (task={task!r}, methods={methods!r})")
    if len(problems) > 1:
        raise ValueError(f"the records hold several (task, dataset) pairs {problems}; pass task=... "
                         "or use plot_comparison")
    order = {m: i for i, m in enumerate(METHOD_LABELS)}
    return problems[0], sorted(groups.items(), key=lambda kv: order.get(kv[0][2], len(order)))


def plot_curves(records: Iterable[Dict[str, Any]], x: str = "backprops", y: str = "train_loss", ax=None, *,
                task: Optional[str] = None, methods: Optional[Sequence[str]] = None, confidence: float = 0.95,
                log_y: Optional[bool] = None, threshold: Optional[float] = 0.99, title: Optional[str] = None,
                legend: bool = True, grid_points: int = 200):
    """One panel: ``y`` against ``x`` (``"backprops"``, ``"epochs"`` or ``"time"``) for every
    method in ``records`` (of one task; pass ``task`` when they hold several), mean and
    ``confidence`` band over seeds. Loss axes are logarithmic unless ``log_y=False``;
    accuracy axes get the ``threshold`` line (None: no line). Returns the axes."""
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        raise ValueError(f"invalid x {x!r}; expected one of {', '.join(X_AXES)}")
    if y not in Y_LABELS:
        raise ValueError(f"invalid y {y!r}; expected one of {', '.join(Y_LABELS)}")
    (task_name, dataset), groups = _select(records, task, methods)
    ax = ax if ax is not None else plt.gca()
    key = X_AXES[x][0]
    for (_, _, method), runs in groups:
        if any(r.get(key) is None for recs in runs.values() for r in recs):
            raise ValueError(f"{x} is not recorded in the records of {task_name} {method} (files written "
                             f"before the runner recorded it); choose another x axis")
        curves = [([r[key] for r in recs if r.get(y) is not None], [r[y] for r in recs if r.get(y) is not None])
                  for recs in runs.values()]
        curves = [c for c in curves if c[0]]
        if not curves:
            raise ValueError(f"{y} is not recorded for {task_name} (an autoencoder has no accuracy)")
        grid, mean, lo, hi = mean_band(curves, grid_points, confidence)
        if y.endswith("_acc"):  # a band past 0 or 100% says nothing
            lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
        elif log_y if log_y is not None else y.endswith("_loss"):
            # with few seeds the t-band can reach below 0, which a log axis cannot show: floor it
            # at the smallest value any seed reached, so the axis keeps the curves' scale
            floor = min(min(v for v in c[1] if v > 0) for c in curves if any(v > 0 for v in c[1]))
            lo = np.maximum(lo, floor)
        style = method_style(method)
        ax.plot(grid, mean, label=f"{METHOD_LABELS.get(method, method)} ({len(curves)} seeds)", **style)
        ax.fill_between(grid, lo, hi, color=style["color"], alpha=0.2, linewidth=0)
    if y.endswith("_acc") and threshold is not None:
        ax.axhline(threshold, color="green", linestyle=":", linewidth=1.5, label=f"{threshold:.0%} accuracy")
    if log_y if log_y is not None else y.endswith("_loss"):
        from matplotlib.ticker import FuncFormatter, LogFormatter

        ax.set_yscale("log")  # plain numbers (0.2, not 2x10^-1); minor labels only where they fit
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    if y.endswith("_acc"):
        from matplotlib.ticker import PercentFormatter

        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(X_AXES[x][1])
    ax.set_ylabel(Y_LABELS[y])
    ax.set_title(title if title is not None else f"{task_name} on {dataset}")
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize="small")
    return ax


def plot_comparison(records: Iterable[Dict[str, Any]], x: str = "backprops",
                    ys: Sequence[str] = ("train_loss", "train_acc"), *, tasks: Optional[Sequence[str]] = None,
                    methods: Optional[Sequence[str]] = None, confidence: float = 0.95, panel_size=(5.5, 3.8)):
    """The paper's Figure 3 / 9-11 family: one row per (task, dataset) in ``records``, one
    column per metric in ``ys`` (accuracy panels are left out for autoencoders), all against
    ``x``. Returns the figure."""
    import matplotlib.pyplot as plt

    records = list(records)
    problems = sorted({k[:2] for k in group_runs(records)})
    if tasks is not None:
        problems = [p for p in problems if p[0] in tasks]
    if not problems:
        raise ValueError("no records to plot")
    fig, axes = plt.subplots(len(problems), len(ys), figsize=(panel_size[0] * len(ys), panel_size[1] * len(problems)),
                             squeeze=False)
    for row, (task, dataset) in enumerate(problems):
        subset = [r for r in records if r["task"] == task and r["dataset"] == dataset]
        has_acc = any(r.get("train_acc") is not None for r in subset)
        for col, y in enumerate(ys):
            ax = axes[row][col]
            if y.endswith("_acc") and not has_acc:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{task}: no accuracy (autoencoder)", ha="center", va="center",
                        transform=ax.transAxes)
                continue
            plot_curves(subset, x=x, y=y, ax=ax, methods=methods, confidence=confidence, legend=(col == 0))
    fig.suptitle(f"Mean and {confidence:.0%} confidence band over seeds")
    fig.tight_layout()
    return fig


def plot_budget_axes(records: Iterable[Dict[str, Any]], y: str = "train_loss", *, task: Optional[str] = None,
                     methods: Optional[Sequence[str]] = None, confidence: float = 0.95,
                     xs: Optional[Sequence[str]] = None):
    """One metric against several measures of work side by side (the paper's "fair comparison"
    of Section 5, with data passes added). ``xs``: names of :data:`X_AXES`; default: every
    measure the records hold (backprops, data passes, epochs, time). Returns the figure."""
    import matplotlib.pyplot as plt

    records = list(records)
    if xs is None:
        xs = [x for x, (key, _) in X_AXES.items() if all(r.get(key) is not None for r in records)]
    fig, axes = plt.subplots(1, len(xs), figsize=(4.2 * len(xs), 4.2), squeeze=False)
    for i, (x, ax) in enumerate(zip(xs, axes[0])):
        plot_curves(records, x=x, y=y, ax=ax, task=task, methods=methods, confidence=confidence, legend=(i == 0))
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- two-dimensional pictures
def region_outline(center, radius: float, ellipsoid=None, basis=None, points: int = 200) -> np.ndarray:
    r"""Boundary points of a two-dimensional trust region, for drawing it:

    .. math:: \{\, c + s \;:\; \|Q^\top s\|_{\operatorname{diag}(a)} = \Delta \,\}
              = \{\, c + \Delta\, Q \operatorname{diag}(a)^{-1/2} (\cos\phi, \sin\phi) \,\},

    with centre :math:`c`, radius :math:`\Delta`, ``ellipsoid`` :math:`a` (None: the circle)
    and ``basis`` :math:`Q` (orthogonal; None: the coordinate axes), so that the region's
    matrix is :math:`Q \operatorname{diag}(a) Q^\top`. Returns an array of shape
    ``(points, 2)``. Tensors or arrays are accepted.

    >>> xy = region_outline((1.0, 0.0), 2.0, ellipsoid=(4.0, 1.0), points=5)
    >>> np.round(xy, 6).tolist()
    [[2.0, 0.0], [1.0, 2.0], [0.0, 0.0], [1.0, -2.0], [2.0, -0.0]]

    Reference: Conn, Gould & Toint, *Trust-Region Methods* (2000), §7.7 (ellipsoidal norms).
    """
    def arr(x):
        return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=float)

    phi = np.linspace(0.0, 2.0 * np.pi, points)
    unit = np.stack([np.cos(phi), np.sin(phi)], axis=1)
    scale = np.ones(2) if ellipsoid is None else 1.0 / np.sqrt(arr(ellipsoid))
    q = np.eye(2) if basis is None else arr(basis)
    return arr(center) + (float(radius) * unit * scale) @ q.T


def plot_contours(ax, fun, xlim: Tuple[float, float], ylim: Tuple[float, float], *, levels=20, log: bool = False,
                  points: int = 200, **kwargs):
    r"""Contour lines of a function of two variables on a grid, :math:`f(x, y)` or, with
    ``log``, :math:`\log_{10}(f - \min f + 10^{-12})` (for functions such as Rosenbrock's whose
    interesting level sets are spread over decades). ``fun`` takes two arrays (the grid) and
    returns an array; ``kwargs`` go to ``ax.contour`` (default: grey thin lines).

    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> _, ax = plt.subplots()
    >>> lines = plot_contours(ax, lambda x, y: x**2 + 4 * y**2, (-1, 1), (-1, 1), levels=5)
    >>> len(lines.levels) > 0
    True
    """
    x, y = np.meshgrid(np.linspace(*xlim, points), np.linspace(*ylim, points))
    z = np.asarray(fun(x, y), dtype=float)
    if log:
        z = np.log10(z - z.min() + 1e-12)
    kwargs.setdefault("colors", "0.75")
    kwargs.setdefault("linewidths", 0.8)
    if "cmap" in kwargs:
        kwargs.pop("colors")
    return ax.contour(x, y, z, levels=levels, **kwargs)


# ----------------------------------------------------------------------------- autoencoders
def plot_reconstructions(rows: Sequence[Tuple[str, Any]], image_shape: Sequence[int], *, title: Optional[str] = None,
                         row_height: float = 1.3):
    """The paper's Figure 12: one row of images per ``(label, images)`` in ``rows`` (the same
    inputs reconstructed by several networks), drawn in grey on [0, 1] with the label above the
    row. ``images`` is a tensor or array of equally many images of ``image_shape`` pixels
    (e.g. ``(28, 28)``). Returns the figure.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> fig = plot_reconstructions([("inputs", np.zeros((3, 4))), ("outputs", np.ones((3, 4)))], (2, 2))
    >>> len(fig.axes), fig.axes[0].get_title(loc="left")
    (6, 'inputs')
    """
    import matplotlib.pyplot as plt

    arrays = [np.asarray(images.detach().cpu() if hasattr(images, "detach") else images, dtype=float)
              for _, images in rows]
    if not arrays or len({len(a) for a in arrays}) != 1 or len(arrays[0]) == 0:
        raise ValueError("plot_reconstructions needs rows with equally many images (at least one)")
    columns = len(arrays[0])
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns, row_height * len(rows)), squeeze=False)
    for r, ((label, _), images) in enumerate(zip(rows, arrays)):
        for c in range(columns):
            axes[r, c].imshow(images[c].reshape(tuple(image_shape)), cmap="gray_r", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_title(label, loc="left", fontsize=9)
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9 if title else 0.95, wspace=0.1, hspace=0.5)
    return fig


def plot_tr_diagnostics(traces: Dict[str, Dict[str, List[Dict[str, Any]]]], layers: Sequence[str], *,
                        reference: Optional[float] = None, title: Optional[str] = None):
    r"""What trust-region runs do on a plateau, one figure of five panels against backprops:
    the loss and the gradient norm on a fixed set of samples, the Lanczos estimate
    :math:`\theta \ge \lambda_{\min}` of the Hessian there, the Euclidean length of every accepted
    step (filled: on the boundary of the region), and each layer's share of the squared step
    length (mean over accepted steps).

    ``traces``: method -> ``{"curvature": [...], "steps": [...]}`` with curvature entries
    ``{"backprops", "loss", "grad_norm", "lam_min"}`` and step entries ``{"backprops",
    "accepted", "on_boundary", "length", "share"}`` (``share``: one fraction per entry of
    ``layers``, None for a rejected step). ``reference``: a loss drawn as a dotted line (e.g.
    the mean image's). Returns the figure.
    """
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(16, 9))
    grid = fig.add_gridspec(2, 6)
    axes = [fig.add_subplot(grid[0, 0:2]), fig.add_subplot(grid[0, 2:4]), fig.add_subplot(grid[0, 4:6]),
            fig.add_subplot(grid[1, 0:3]), fig.add_subplot(grid[1, 3:6])]
    width = 0.8 / max(1, len(traces))
    for k, (method, trace) in enumerate(traces.items()):
        style, label = method_style(method), METHOD_LABELS.get(method, method)
        curv = trace["curvature"]
        bp = [c["backprops"] for c in curv]
        axes[0].plot(bp, [c["loss"] for c in curv], marker="o", label=label, **style)
        axes[1].semilogy(bp, [c["grad_norm"] for c in curv], marker="o", label=label, **style)
        axes[2].plot(bp, [c["lam_min"] for c in curv], marker="o", label=label, **style)
        steps = [t for t in trace["steps"] if t["accepted"]]
        for on_boundary, fill in ((True, style["color"]), (False, "none")):
            points = [(t["backprops"], t["length"]) for t in steps if t["on_boundary"] == on_boundary]
            if points:
                axes[3].scatter(*zip(*points), s=14, facecolors=fill, edgecolors=style["color"],
                                label=f"{label}, {'on the boundary' if on_boundary else 'inside'}")
        shares = [t["share"] for t in steps if t["share"] is not None]
        if shares:
            axes[4].bar(np.arange(len(layers)) + (k - (len(traces) - 1) / 2) * width, np.mean(shares, axis=0),
                        width=width, color=style["color"], label=label)
    if reference is not None:
        axes[0].axhline(reference, color="black", linestyle=":", linewidth=1.2, label="mean image")
    axes[2].axhline(0.0, color="black", linewidth=0.8)
    labels = (("loss on the probe samples", "loss"), ("gradient norm", r"$\|\nabla \mathcal{L}\|$"),
              (r"smallest Hessian eigenvalue (Lanczos $\theta$)", r"$\theta \geq \lambda_{\min}$"),
              ("accepted steps", r"Euclidean step length $\|s_t\|_2$"),
              ("share of the squared step per layer", r"fraction of $\|s_t\|^2$ (mean over steps)"))
    for ax, (panel, ylabel) in zip(axes, labels):
        ax.set_title(panel)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("backprops")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    if any(t["accepted"] for trace in traces.values() for t in trace["steps"]):
        axes[3].set_yscale("log")
    axes[4].set_xticks(np.arange(len(layers)), list(layers), rotation=30, fontsize="small")
    axes[4].set_xlabel("layer")
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
