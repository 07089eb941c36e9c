"""Run one (task, method, seed) under a budget, with checkpoints, resumption and provenance.

What one run measures, and how:

* **work** is counted in backprops (the paper's unit): for the TR methods
  ``opt.backprops`` (gradients + Hessian-vector products), for a first-order method one per
  mini-batch; in data passes (samples sent through gradient and Hessian-vector passes /
  training-set size: a TR step of batch ``b`` costs ``b`` x (gradients + products), with
  ``opt.counts["hvp"]`` in full-batch products, a first-order step ``b``), which is fair
  across batch sizes; in epochs (samples drawn / training-set size); and in seconds of
  training (the clock stops for evaluations and checkpoints; on CUDA it reads after
  ``torch.cuda.synchronize``). A warm-up counts in all four.
* **evaluation** (training loss and accuracy on the whole training set, test loss and
  accuracy) runs every ``eval_every`` epochs, in eval mode under ``torch.no_grad()``, and
  is no work: it changes none of the counters and no random state.
* the TR batch grows as in the paper when the full training loss, checked every
  ``check_every`` epochs, did not decrease (that check is part of the algorithm: it is timed,
  but as a forward-only pass it adds no backprops); with ``batch_rule="noise"`` it grows
  instead to ``noise_batch_scale`` times the gradient noise scale (below).
* the TR options of :mod:`~trlib.experiments.configs`: ``hessian_batch`` passes the head of the
  shuffled batch (a uniformly random part of it) as ``step``'s ``hessian_closure`` with its
  exact fraction, so backprops and data passes count each product at that fraction;
  ``acceptance="independent"`` passes a batch of the same size drawn from the training set by
  the run's own generator (saved in checkpoints) as ``test_closure``. A step whose loss, gradient
  or curvature is NaN/inf ends the run as ``"diverged"`` (the weights stay at the last finite
  point).
* a **checkpoint** (model, optimizer, RNG states, position in the epoch's data order, log,
  budget spent) is written after every epoch, when Ctrl-C arrives (it is honoured at the end
  of the current step, so the checkpoint is always consistent; a second Ctrl-C stops at
  once), and at the end. Calling :func:`run` again with the same arguments resumes and gives
  exactly the log of an uninterrupted run, bit for bit on the CPU (except the wall-clock
  ``time``; on CUDA, kernels need not be deterministic); a larger budget continues a finished
  run. A killed process loses at most the epoch in progress.
* **nothing lost, nothing silently wrong** (:mod:`trlib.experiments.storage`): one process
  writes a run at a time (a lock; a second one stops with :class:`RunLockedError`); every
  file is replaced atomically, and temporary files a kill left behind are removed; the
  checkpoint carries a checksum and the results file its record count and checksum, both
  checked before use, and anything that fails ends in one line naming the file (and
  ``--fresh`` where starting over is the way out). The checkpoint is written before the
  results, whose records it always contains, so a damaged or stale results file is rewritten
  from it; a finished run whose checkpoint is gone is returned from its results. A rerun with
  a smaller budget than already spent changes nothing but the list of sessions in the
  provenance, and warns (:class:`BudgetWarning`).
* **several processes** (``torchrun ... --distributed``, :mod:`trlib.experiments.distributed`):
  the :class:`Trainer` talks to the other processes only through its communicator
  (:class:`SingleProcess`, or the data-parallel :class:`~trlib.experiments.distributed.Context`):
  every process takes its shard of each global mini-batch; the losses, gradients and
  Hessian-vector products are averaged across processes, evaluations are reduced, and only
  rank 0 writes results, checkpoints and the progress bar.

Example (a few seconds on a CPU):

>>> from trlib.experiments import run
>>> log = run("mnist_mlp", "sgd", seed=0, budget="2epochs", data="stand-in", progress=False, verbose=False)
>>> [round(r["epoch"], 2) for r in log], log[-1]["backprops"]   # 1,437 digits, batch 128: 12 steps/epoch
([0.0, 1.0, 2.0], 24)
>>> log[-1]["data_passes"]   # every sample went through one gradient per epoch
2.0
>>> log[-1]["dataset"]
'sklearn digits (offline stand-in for MNIST)'
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F

from .. import __version__
from ..data import DatasetUnavailableError, dataset_info, load_dataset, load_stand_in, stand_in, subset as subset_of
from ..models import build_model, get_task
from ..gauss_newton import ggn_operator, per_sample_gradients
from ..optim import ARC, NonFiniteCurvatureError, NonFiniteLossError, TrustRegion
from .configs import FIRST_ORDER, get_config
from .distributed import load_data_on_rank0_first
from .results import RunFileError, read_run, write_run
from .storage import (CheckpointError, RunLock, RunLockedError, load_checkpoint, remove_temporaries,
                      save_checkpoint)

__all__ = ["Budget", "BudgetWarning", "parse_budget", "run", "load_data", "run_id", "Objective", "evaluate",
           "SingleProcess", "Trainer", "TrainerState", "Monitor", "resolve_device", "prepare_out", "RunFiles"]

_UNITS = {"backprops": "backprops", "backprop": "backprops", "bp": "backprops",
          "epochs": "epochs", "epoch": "epochs", "ep": "epochs",
          "s": "seconds", "sec": "seconds", "secs": "seconds", "seconds": "seconds", "second": "seconds"}
_CHECKPOINT_VERSION = 4


@dataclass(frozen=True)
class Budget:
    """How much work a run may do: ``amount`` of ``unit`` (backprops, epochs or seconds).

    >>> parse_budget("20epochs"), parse_budget("5000backprops"), parse_budget("300s")
    (Budget(20.0, 'epochs'), Budget(5000.0, 'backprops'), Budget(300.0, 'seconds'))
    """

    amount: float
    unit: str

    def __post_init__(self):
        if self.unit not in _UNITS.values() or not (math.isfinite(self.amount) and self.amount > 0):
            raise ValueError(f"invalid budget {self.amount!r} {self.unit!r}: expected a positive finite amount of "
                             "backprops, epochs or seconds")

    def __repr__(self) -> str:
        return f"Budget({self.amount!r}, {self.unit!r})"

    def __str__(self) -> str:
        amount = int(self.amount) if float(self.amount).is_integer() else self.amount
        return f"{amount}{'s' if self.unit == 'seconds' else self.unit}"


def parse_budget(budget: Union[str, Budget]) -> Budget:
    """``"20epochs"``, ``"5000backprops"``, ``"300s"`` (also ``"2.5 epochs"``, ``"60sec"``) -> Budget.

    ValueError for anything else, including amounts that are not finite (``"1e400epochs"``)."""
    if isinstance(budget, Budget):
        return budget
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]+)\s*", str(budget).lower())
    if not m or m.group(2) not in _UNITS or not float(m.group(1)) > 0:
        raise ValueError(f"invalid budget {budget!r}: expected a positive number followed by a unit, "
                         "e.g. '20epochs', '5000backprops' or '300s'")
    if not math.isfinite(float(m.group(1))):
        raise ValueError(f"invalid budget {budget!r}: {m.group(1)} is too large to be a number of "
                         f"{_UNITS[m.group(2)]} (it overflows to infinity)")
    return Budget(float(m.group(1)), _UNITS[m.group(2)])


# --- data ------------------------------------------------------------------------------

def load_data(task: str, data: str = "auto", *, device="cpu", root=None, verbose: bool = True,
              subset: Optional[int] = None, test_subset: Optional[int] = None, seed: int = 0):
    """The (train, test) datasets of ``task``: ``data`` is ``"real"`` (DatasetUnavailableError
    when missing), ``"stand-in"`` (the offline stand-in, e.g. sklearn digits for MNIST) or
    ``"auto"`` (real if it can be loaded or downloaded, else the stand-in, announced on stderr).
    A stand-in is marked: ``is_stand_in=True`` and a display name such as
    ``"sklearn digits (offline stand-in for MNIST)"``.

    ``subset`` and ``test_subset`` keep at most that many training and test samples, a
    class-stratified random choice fixed by ``seed`` (:func:`trlib.data.subset`, which marks the
    display name: ``"Fashion-MNIST (6,000 of 60,000 training images, seed 0)"``); None keeps the
    whole split. Pass the result to :func:`run` as ``datasets``: its records and provenance then
    name the subset, and its files do not mix with those of the whole dataset.
    """
    name = get_task(task).dataset
    if data not in ("auto", "real", "stand-in"):
        raise ValueError(f"invalid data {data!r}; expected 'auto', 'real' or 'stand-in'")
    for what, size in (("subset", subset), ("test_subset", test_subset)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"invalid {what} {size!r}: expected an int >= 1 or None")
    why = "--data stand-in was asked for"
    splits = None
    if data != "stand-in":
        try:
            splits = tuple(load_dataset(name, root=root, train=t, device=device) for t in (True, False))
        except DatasetUnavailableError as err:
            if data == "real" or stand_in(name) == name:
                raise
            why = str(err).splitlines()[0]
    if splits is None:
        splits = tuple(load_stand_in(name, root=root, train=t, device=device) for t in (True, False))
        if verbose and splits[0].is_stand_in:
            print(f"NOTE: {splits[0].display_name} is used, not {dataset_info(name).display_name}: {why}.",
                  file=sys.stderr, flush=True)
    return tuple(split if size is None else subset_of(split, size, seed=seed)
                 for split, size in zip(splits, (subset, test_subset)))


# --- loss and evaluation -----------------------------------------------------------------

class Objective:
    """The training objective of a task: cross-entropy + ``l2`` * (sum of squared parameters)
    for classifiers, the per-image squared reconstruction error (summed over pixels, averaged
    over images) for autoencoders. ``objective(model(x), target)`` is the mini-batch loss."""

    def __init__(self, kind: str, model: torch.nn.Module, l2: float):
        self.classification = kind == "classification"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.l2 = float(l2)

    def target(self, x, y):
        return y if self.classification else x

    def data_sum(self, out, target):
        """The data term summed over the batch (not averaged)."""
        if self.classification:
            return F.cross_entropy(out, target, reduction="sum")
        return (out - target).pow(2).sum()

    def penalty(self):
        if not self.l2:
            return 0.0
        return self.l2 * sum(p.pow(2).sum() for p in self.params)

    def __call__(self, out, target):
        return self.data_sum(out, target) / out.shape[0] + self.penalty()


# --- communicators ----------------------------------------------------------------------

class SingleProcess:
    """The communicator of a run in one process: nothing to share, every reduction is the identity.

    A communicator tells the runner how the processes of a run cooperate. It has ``rank``,
    ``world_size``, ``is_main`` and ``trust_region_options`` (keywords of
    :class:`trlib.TrustRegion`), and four operations:

    * ``shard(idx)``: this process's part of the global mini-batch (or of an index range);
    * ``mean(tensor)``: the average over processes, in place;
    * ``agree(stop, seconds)``: one decision to stop and one clock for all processes;
    * ``average_buffers(module)``: BatchNorm statistics averaged over processes.

    :class:`trlib.experiments.distributed.Context` is the data-parallel communicator.
    """

    rank, world_size, is_main = 0, 1, True
    trust_region_options: Dict[str, Any] = {}

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        return idx

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def agree(self, stop: bool, seconds: float):
        return stop, seconds

    def average_buffers(self, module: torch.nn.Module) -> None:
        pass

    def barrier(self) -> None:
        pass


@torch.no_grad()
def evaluate(model, objective: Objective, data, batch_size: int = 4096, comm=None):
    """(loss, accuracy) on the whole of ``data`` in eval mode; accuracy is None for autoencoders.

    ``comm`` (a communicator; default one process): each process evaluates its slice of
    ``data`` and the sums are combined, after averaging BatchNorm statistics."""
    comm = SingleProcess() if comm is None else comm
    comm.average_buffers(model)
    piece = comm.shard(torch.arange(len(data)))
    start, stop = (int(piece[0]), int(piece[-1]) + 1) if len(piece) else (0, 0)
    sums = torch.zeros(2, dtype=torch.float64, device=data.x.device)  # data term, correct predictions
    was_training = model.training
    model.eval()
    try:
        for lo in range(start, stop, batch_size):
            x, y = data.x[lo:min(lo + batch_size, stop)], data.y[lo:min(lo + batch_size, stop)]
            out = model(x)
            sums[0] += objective.data_sum(out, objective.target(x, y)).double()
            if objective.classification:
                sums[1] += (out.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    if comm.world_size > 1:
        sums = comm.mean(sums).mul_(comm.world_size)
    loss = float(sums[0]) / len(data) + float(objective.penalty())
    return loss, (round(float(sums[1])) / len(data) if objective.classification else None)


# --- provenance -------------------------------------------------------------------------

def _git_commit() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # installed with pip from git (e.g. on Colab): pip records the commit
        from importlib.metadata import distribution
        info = json.loads(distribution("trlib-torch").read_text("direct_url.json") or "{}")
        return info.get("vcs_info", {}).get("commit_id")
    except Exception:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine() or 'CPU'} ({os.cpu_count()} cores)"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_id(task: str, method: str, dataset: str, seed: int) -> str:
    """File stem of a run: ``mnist_mlp__tr_rms__digits__seed0``."""
    return f"{task}__{method}__{dataset}__seed{seed}"


# --- the training loop ------------------------------------------------------------------

def _first_order(name: str, params, lr: float) -> torch.optim.Optimizer:
    return getattr(torch.optim, FIRST_ORDER[name])(params, lr=lr)


@dataclass
class TrainerState:
    """Where a run stands: everything needed to resume it besides the model, the optimizer and
    the random generators. Plain values (and the epoch's data order), saved in checkpoints.

    ``samples``: samples drawn (epochs = samples / n); ``pass_samples``: samples sent through
    gradient and Hessian-vector passes (data passes = pass_samples / n); ``position``: where the
    next batch starts in ``order``; ``check_loss``: the full training loss at the last batch-size
    check (TR); ``next_eval``: the sample count of the next evaluation; ``noise``: the running
    averages of ``batch_rule="noise"`` (trace, signal, weight)."""

    phase: str
    batch_size: int
    steps: int = 0
    backprops: float = 0
    samples: int = 0
    pass_samples: float = 0
    seconds: float = 0.0
    epochs_done: int = 0
    order: Optional[torch.Tensor] = None
    position: int = 0
    check_loss: Optional[float] = None
    next_eval: int = 0
    status: str = "running"
    log: List[Dict[str, Any]] = field(default_factory=list)
    noise: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Monitor:
    """Looks inside a run while it trains: subclass it and pass an instance as ``run(...,
    monitor=)``. Both methods do nothing here.

    * ``after_step(trainer)`` runs after every step, ``after_record(trainer, record)`` after every
      evaluation (the first, at step 0, included) with the record just appended to the log.
      ``trainer`` is the :class:`Trainer`: ``trainer.model``, ``trainer.opt`` (the current
      phase's optimizer: its ``last`` and ``ellipsoid`` for a :class:`~trlib.TrustRegion`),
      ``trainer.batch`` (the indices of the step's mini-batch in ``trainer.train``),
      ``trainer.objective`` and ``trainer.state``. After the step that ends a warm-up,
      ``trainer.opt`` is already the next phase's optimizer (``trainer.state.phase`` says which),
      and a :class:`~trlib.TrustRegion` before its first step has an empty ``last``.
    * What a monitor does is no work: it runs outside the clock and the counters, and under
      ``torch.random.fork_rng``, so a run's log is the same with and without it. It must
      leave the weights as it found them. It runs on every process of a distributed run.
    * An exception raised in it interrupts the run as in ``on_step`` (a KeyboardInterrupt
      writes a checkpoint first).

    >>> class Radii(Monitor):
    ...     def __init__(self):
    ...         self.radii = []
    ...     def after_step(self, trainer):
    ...         self.radii.append(trainer.opt.last["radius"])
    >>> radii = Radii()
    >>> log = run("mnist_mlp", "tr_rms", 0, "3backprops", data="stand-in", progress=False, verbose=False,
    ...           monitor=radii)
    >>> len(radii.radii) == log[-1]["step"]
    True
    """

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_record(self, trainer: "Trainer", record: Dict[str, Any]) -> None:
        pass


class Trainer:
    """One run's model, optimizer, data order and :class:`TrainerState`, and the step that
    advances them. ``comm`` is the communicator (:class:`SingleProcess` by default);
    ``monitor`` a :class:`Monitor` (None: nothing looks inside)."""

    def __init__(self, cfg: Dict[str, Any], train, test, device: torch.device, seed: int, comm=None,
                 monitor: Optional[Monitor] = None):
        self.cfg, self.train, self.test, self.device, self.seed = cfg, train, test, device, seed
        self.comm = SingleProcess() if comm is None else comm
        self.monitor = monitor
        self.batch: Optional[torch.Tensor] = None  # the last step's mini-batch (indices into train)
        torch.manual_seed(seed)  # the initial weights: the same on every process
        self.model = build_model(cfg["task"], dataset=train).to(device)
        self.model.train()
        self.objective = Objective(get_task(cfg["task"]).loss, self.model, cfg["l2"])
        self.gen = torch.Generator().manual_seed(seed)  # data order, on the CPU on every device
        self.test_gen = torch.Generator().manual_seed(2**31 + seed)  # the independent test batches
        self.n = len(train)
        self.tr = cfg["kind"] in ("tr", "arc")
        warm = self.tr and cfg["warmup_epochs"] > 0
        self.state = TrainerState(phase="warmup" if warm else "main",
                                  batch_size=min(cfg["warmup_batch_size"] if warm else cfg["batch_size"], self.n))
        self.order = None  # state.order on the device
        self.opt = self._optimizer()

    def _optimizer(self):
        """The optimizer of the current phase."""
        cfg, params = self.cfg, self.model.parameters()
        if self.state.phase == "warmup":
            return _first_order(cfg["warmup_method"], params, cfg["warmup_lr"])
        if not self.tr:
            return _first_order(cfg["method"], params, cfg["lr"])
        if cfg["kind"] == "arc":
            return ARC(params, norm=cfg["norm"], sigma=cfg["sigma"], min_sigma=cfg["min_sigma"], eta1=cfg["eta1"],
                       eta2=cfg["eta2"], increase=cfg["increase"], decrease=cfg["decrease"], method=cfg["subproblem"],
                       krylov_tol=cfg["krylov_tol"], max_krylov=cfg["max_krylov"], module=self.model, seed=self.seed,
                       **self.comm.trust_region_options)
        return TrustRegion(params, norm=cfg["norm"], radius=cfg["radius"], max_radius=cfg["max_radius"],
                           eta1=cfg["eta1"], eta2=cfg["eta2"], increase=cfg["increase"], decrease=cfg["decrease"],
                           method=cfg["subproblem"], krylov_tol=cfg["krylov_tol"], max_krylov=cfg["max_krylov"],
                           module=self.model, seed=self.seed, **self.comm.trust_region_options)

    def closure(self, idx: torch.Tensor):
        """The loss on this process's part of the global batch ``idx``: its data term divided by
        ``len(idx) / world_size`` (plus the L2 term), so that the average over processes is the
        mean over the whole batch, whatever the sizes of the parts."""
        local = self.comm.shard(idx)
        xb, yb = self.train.x[local], self.train.y[local]
        target, objective = self.objective.target(xb, yb), self.objective
        per_process = len(idx) / self.comm.world_size
        return lambda: objective.data_sum(self.model(xb), target) / per_process + objective.penalty()

    def _local_batch(self, idx: torch.Tensor):
        local = self.comm.shard(idx)
        xb = self.train.x[local]
        return xb, self.objective.target(xb, self.train.y[local]), len(idx) / self.comm.world_size

    def ggn_closure(self, idx: torch.Tensor):
        r"""``step``'s ``curvature`` for the batch ``idx``: the generalised Gauss-Newton matrix of the
        objective (the data term's :math:`J^\top H_L J`, scaled as :meth:`closure` scales it, plus the
        L2 term's :math:`2\,\mathrm{l2}\,I`)."""
        xb, target, per_process = self._local_batch(idx)
        loss = "cross_entropy" if self.objective.classification else "mse"
        l2 = 2.0 * self.objective.l2

        def build():
            data = ggn_operator(self.model, xb, target, loss, reduction="sum")
            return lambda v: data(v) / per_process + l2 * v

        return build

    def per_sample_closure(self, idx: torch.Tensor):
        """``step``'s ``per_sample_grads`` for the batch ``idx``: each sample's data-term gradient."""
        xb, target, _ = self._local_batch(idx)
        loss = "cross_entropy" if self.objective.classification else (lambda out, t: (out - t).pow(2).sum())
        return lambda: per_sample_gradients(self.model, xb, target, loss)

    def evaluate(self, data):
        return evaluate(self.model, self.objective, data, self.cfg["eval_batch_size"], self.comm)

    def full_training_loss(self) -> float:
        """The loss on the whole training set (the TR batch schedule's check; forward only)."""
        return self.evaluate(self.train)[0]

    def spent(self, unit: str) -> float:
        s = self.state
        return {"backprops": s.backprops, "epochs": s.samples / self.n, "seconds": s.seconds}[unit]

    def exhausted(self, budget: Budget) -> bool:
        if budget.unit == "epochs":  # exact integer arithmetic: 20 epochs are exactly 20 n samples
            return self.state.samples >= math.ceil(budget.amount * self.n - 1e-9)
        return self.spent(budget.unit) >= budget.amount

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        """One mini-batch step, and the end of the epoch if it completes one (timed)."""
        s = self.state
        self._sync()
        t0 = time.perf_counter()
        paper_rule = self.tr and self.cfg["batch_rule"] == "paper"
        if paper_rule and s.phase == "main" and s.check_loss is None:  # the batch schedule's baseline
            s.check_loss = self.full_training_loss()
        if s.order is None:
            s.order, s.position = torch.randperm(self.n, generator=self.gen), 0
            self.order = None
        if self.order is None:
            self.order = s.order.to(self.device)
        idx = self.order[s.position:s.position + s.batch_size]
        self.batch = idx
        closure = self.closure(idx)
        if isinstance(self.opt, TrustRegion):
            before, counts = self.opt.backprops, self.opt.counts
            try:
                self.opt.step(closure, **self._tr_extras(idx))
            except (NonFiniteLossError, NonFiniteCurvatureError):
                s.status = "diverged"
            if s.status != "diverged" and self.cfg["batch_rule"] == "noise":
                self._grow_to_noise(len(idx))
            after = self.opt.counts
            s.backprops += self.opt.backprops - before
            # counts["hvp"] is in full-batch products: a product on part of the batch counts a part
            s.pass_samples += len(idx) * (after["gradient"] - counts["gradient"] + after["hvp"] - counts["hvp"])
        else:
            self.opt.zero_grad(set_to_none=True)
            closure().backward()
            if self.comm.world_size > 1:
                self._average_gradients()
            self.opt.step()
            s.backprops += 1
            s.pass_samples += len(idx)
        s.steps += 1
        s.samples += len(idx)
        s.position += len(idx)
        if s.position >= self.n:
            self._end_epoch()
        self._sync()
        s.seconds += time.perf_counter() - t0

    def _tr_extras(self, idx: torch.Tensor) -> Dict[str, Any]:
        """``step``'s Hessian sub-batch and independent test batch for the global batch ``idx``."""
        cfg, extras = self.cfg, {}
        h = cfg["hessian_batch"]
        size = min(h, len(idx)) if isinstance(h, int) else max(1, round(h * len(idx)))
        if cfg.get("curvature", "hessian") == "ggn":
            extras["curvature"] = self.ggn_closure(idx[:size])
            if size < len(idx):
                extras["hessian_fraction"] = size / len(idx)
        elif size < len(idx):  # the head of a shuffled batch: a uniformly random part of it
            extras.update(hessian_closure=self.closure(idx[:size]), hessian_fraction=size / len(idx))
        if getattr(self.opt.norm, "uses_per_sample_gradients", False):
            extras["per_sample_grads"] = self.per_sample_closure(idx)
        if cfg["acceptance"] == "independent":
            test = torch.randint(0, self.n, (len(idx),), generator=self.test_gen).to(self.device)
            extras["test_closure"] = self.closure(test)
        return extras

    def _grow_to_noise(self, b: int) -> None:
        r"""``batch_rule="noise"``: the batch grows (never shrinks) to ``noise_batch_scale`` x the
        gradient noise scale :math:`\mathcal B = \operatorname{tr}\Sigma / \|\nabla\mathcal L\|^2`
        (McCandlish, Kaplan, Amodei et al. 2018; the norm test of Byrd, Chin, Nocedal & Wu 2012 asks
        for a batch of about that size), both in the region's metric, from the step's free noise
        estimate: ``b * noise_var`` estimates tr Sigma, ``grad_sq - noise_var`` the squared full
        gradient. Averaged over steps (decay 0.95) before use; capped at ``batch_cap`` of n."""
        s, last = self.state, self.opt.last
        var, sq = last.get("noise_var", math.nan), last.get("grad_sq", math.nan)
        if not (math.isfinite(var) and math.isfinite(sq)):
            return
        decay = 0.95
        trace, signal_, weight = s.noise
        s.noise = [decay * trace + (1 - decay) * b * var, decay * signal_ + (1 - decay) * (sq - var),
                   decay * weight + (1 - decay)]
        if s.noise[2] < 0.5 or s.noise[1] <= 0:  # too few steps averaged yet, or no signal left to measure
            return
        target = self.cfg["noise_batch_scale"] * s.noise[0] / s.noise[1]
        if target > s.batch_size:
            cap = max(s.batch_size, int(self.cfg["batch_cap"] * self.n))
            s.batch_size = int(min(math.ceil(target), cap, self.n))

    def _average_gradients(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        self.comm.mean(flat)
        for p, chunk in zip(params, flat.split([p.numel() for p in params])):
            p.grad = chunk.view_as(p)

    def _end_epoch(self) -> None:
        s, cfg = self.state, self.cfg
        s.epochs_done += 1
        s.order, s.position = None, 0
        if s.phase == "warmup":
            if s.epochs_done >= cfg["warmup_epochs"]:
                s.phase, s.batch_size = "main", min(cfg["batch_size"], self.n)
                self.opt = self._optimizer()
        elif (self.tr and cfg["batch_rule"] == "paper"
              and (s.epochs_done - cfg["warmup_epochs"]) % cfg["check_every"] == 0):
            loss = self.full_training_loss()
            if not loss < s.check_loss:
                cap = max(s.batch_size, int(cfg["batch_cap"] * self.n))
                s.batch_size = min(math.ceil(s.batch_size * cfg["batch_growth"]), cap, self.n)
            s.check_loss = loss

    def record(self) -> Dict[str, Any]:
        """Evaluate (no work counted) and append a log record."""
        s, cfg = self.state, self.cfg
        train_loss, train_acc = self.evaluate(self.train)
        test_loss, test_acc = self.evaluate(self.test)
        tr = isinstance(self.opt, TrustRegion)
        rec = dict(task=cfg["task"], method=cfg["method"], seed=self.seed, dataset=self.train.display_name,
                   stand_in=self.train.is_stand_in, step=s.steps, epoch=s.samples / self.n,
                   backprops=s.backprops, data_passes=s.pass_samples / self.n, time=s.seconds,
                   train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc,
                   phase=s.phase, batch_size=s.batch_size, radius=self.opt.radius if tr else None,
                   lr=None if tr else self.opt.param_groups[0]["lr"])
        if isinstance(self.opt, ARC):  # ARC has no radius: its regularisation weight
            rec["sigma"] = self.opt.sigma
        s.log.append(rec)
        if not math.isfinite(train_loss):
            s.status = "diverged"
        interval = max(1, round(cfg["eval_every"] * self.n))
        s.next_eval = (s.samples // interval + 1) * interval
        self.watch("after_record", rec)
        return rec

    def watch(self, event: str, *args) -> None:
        """Call the monitor's ``event`` method, if there is a monitor (no work: random state kept)."""
        if self.monitor is not None:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                getattr(self.monitor, event)(self, *args)

    # checkpoints
    def state_dict(self) -> Dict[str, Any]:
        self.comm.average_buffers(self.model)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and self.device.type == "cuda" else []
        return dict(version=_CHECKPOINT_VERSION, config=self.cfg, seed=self.seed, state=self.state.to_dict(),
                    model=self.model.state_dict(), optimizer=self.opt.state_dict(),
                    rng=dict(torch=torch.get_rng_state(), cuda=cuda, batches=self.gen.get_state(),
                             test_batches=self.test_gen.get_state()))

    def load_state_dict(self, ck: Dict[str, Any]) -> None:
        self.state = TrainerState(**ck["state"])
        self.order = None
        self.model.load_state_dict(ck["model"])
        self.opt = self._optimizer()
        self.opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"])
        if ck["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        self.gen.set_state(ck["rng"]["batches"])
        self.test_gen.set_state(ck["rng"]["test_batches"])


@contextlib.contextmanager
def _deferred_sigint(distributed: bool = False):
    """Turn the first Ctrl-C into a flag read between steps (so the checkpoint written for it
    is consistent); a second Ctrl-C interrupts at once. Only in the main thread.

    ``distributed``: SIGTERM is deferred too and a second signal does not interrupt (torchrun
    passes a Ctrl-C on to every worker, and interrupting one process in the middle of a
    collective would leave the others waiting; torchrun's own SIGKILL is the hard stop)."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    signums = (signal.SIGINT, signal.SIGTERM) if distributed else (signal.SIGINT,)
    previous = {signum: signal.getsignal(signum) for signum in signums}
    if previous[signal.SIGINT] is None:  # a handler not installed from Python: leave it alone
        yield flag
        return

    def handler(signum, frame):
        flag["set"] = True
        if not distributed:
            old = previous[signal.SIGINT]
            signal.signal(signal.SIGINT, old if callable(old) else signal.default_int_handler)

    installed = []
    try:
        for signum in signums:
            if previous[signum] is None:
                continue
            signal.signal(signum, handler)
            installed.append(signum)
    except ValueError:  # not allowed here (e.g. an embedded interpreter): no deferral
        for signum in installed:
            signal.signal(signum, previous[signum])
        yield flag
        return
    try:
        yield flag
    finally:
        for signum in installed:
            signal.signal(signum, previous[signum])


@contextlib.contextmanager
def _threads(n: Optional[int]):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run(task: str, method: str, seed: int, budget: Union[str, Budget], *,
        out: Union[str, os.PathLike, None] = None, data: str = "auto", device: Union[str, torch.device] = "cpu",
        quick: bool = False, preset: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
        progress: bool = True, verbose: bool = True, fresh: bool = False, threads: Optional[int] = None,
        data_root=None, datasets=None, on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
        monitor: Optional[Monitor] = None, distributed=None) -> List[Dict[str, Any]]:
    """Train ``method`` on ``task`` from seed ``seed`` until ``budget`` is spent; return the log.

    Args:
        task: a name of :data:`trlib.models.TASKS`; method: one of :data:`METHODS`.
        budget: ``"20epochs"``, ``"5000backprops"``, ``"300s"`` (training seconds) or a Budget.
        out: folder for ``<run_id>.jsonl`` (results with provenance) and
            ``checkpoints/<run_id>.pt``; None keeps everything in memory (no resumption).
            An existing checkpoint of the same run is resumed (a finished run with an
            equal or smaller budget is returned as it is; a larger budget continues it).
        data: ``"auto"``, ``"real"`` or ``"stand-in"`` (see :func:`load_data`).
        device: a torch device, or ``"auto"`` (CUDA when present, else the CPU).
        quick: tiny-budget mode for the book and the CLI demo: the offline stand-in (unless
            ``data="real"``), 1 CPU thread, and quick mode's settings (evaluation every 1/4
            epoch, warm-ups of at most 1 epoch; see :func:`get_config`).
        preset: a name of :data:`trlib.experiments.configs.PRESETS` (e.g. ``"paper"``).
        overrides: settings replacing those of :func:`get_config` (e.g. ``{"lr": 3e-3}``).
        fresh: delete an existing checkpoint and results of this run first.
        threads: torch CPU threads during the run (None: unchanged). On small models and
            shared CPUs one thread is much faster than several.
        datasets: (train, test) already loaded by :func:`load_data` (saves reloading).
        on_step: called after every step with ``{"steps", "backprops", "data_passes", "epoch",
            "seconds"}`` (progress reports; an exception raised there interrupts the run, and a
            KeyboardInterrupt writes a checkpoint first).
        monitor: a :class:`Monitor`, which sees the trainer (model, optimizer, mini-batch) after
            every step and every evaluation: diagnostics that count as no work.
        distributed: the communicator. None: one process (:class:`SingleProcess`). A
            :class:`trlib.experiments.distributed.Context` (from
            :func:`trlib.experiments.distributed.setup`, e.g. under ``torchrun``) trains
            data-parallel over its processes: every process calls :func:`run` with the same
            arguments (``device`` is ignored: each process uses ``distributed.device``),
            takes its shard of every global mini-batch of ``batch_size`` samples, and gets
            the same log back; only rank 0 writes ``out``, prints and shows progress. The
            provenance records the world size.

    Returns the list of log records: ``task, method, seed, dataset`` (display name),
    ``stand_in, step, epoch, backprops, data_passes, time, train_loss, train_acc, test_loss,
    test_acc, phase, batch_size, radius, lr``. ``train_acc``/``test_acc`` are None for
    autoencoders.
    """
    budget = parse_budget(budget)
    comm = SingleProcess() if distributed is None else distributed
    main = comm.is_main
    if distributed is not None:
        device = distributed.device
        progress, verbose = progress and main, verbose and main
    device = resolve_device(device)
    if quick:
        data = "stand-in" if data == "auto" else data
        threads = 1 if threads is None else threads
    cfg = get_config(task, method, quick=quick, preset=preset, **dict(overrides or {}))
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"invalid seed {seed!r}: expected an int >= 0")
    folder = None if out is None else prepare_out(out) if main else Path(out)  # checked before any loading
    if datasets is None and distributed is not None:  # rank 0 first: it may download, the others follow it
        datasets = load_data_on_rank0_first(
            distributed, lambda d, v: load_data(task, d, device=device, root=data_root, verbose=verbose and v), data)
    train, test = datasets if datasets is not None else load_data(task, data, device=device, root=data_root,
                                                                 verbose=verbose)
    train, test = train.to(device), test.to(device)
    rid = run_id(task, method, train.name, seed)
    provenance = dict(task=task, method=method, seed=seed, config=cfg, budget=str(budget), status="running",
                      dataset=dict(name=train.name, display_name=train.display_name, is_stand_in=train.is_stand_in,
                                   stand_in_for=train.stand_in_for, n_train=len(train), n_test=len(test)),
                      device=_device_name(device), device_type=device.type, threads=None,
                      torch=str(torch.__version__), trlib=__version__, python=platform.python_version(),
                      git_commit=_git_commit(), started=_now(), sessions=[], world_size=comm.world_size,
                      distributed_backend=getattr(comm, "backend", None))
    session = dict(started=provenance["started"], budget=str(budget), from_step=0)
    with _threads(threads):
        provenance["threads"] = torch.get_num_threads()
        trainer = Trainer(cfg, train, test, device, seed, comm, monitor)
        if folder is None:
            provenance["sessions"].append(session)
            return _loop(trainer, budget, lambda status: None, progress, on_step, rid, distributed is not None)
        files = RunFiles(folder, rid)
        with _locked(files, comm, f"the run {rid} in {folder}"):
            if main:
                for path in (files.results, files.checkpoint):
                    remove_temporaries(path)  # left by a killed writer of this run
                    if fresh:
                        path.unlink(missing_ok=True)
            comm.barrier()  # nobody looks at the files before rank 0 has cleaned them
            previous = _resume(trainer, files, budget, verbose)
            if isinstance(previous, list):  # finished, and its checkpoint is gone or damaged
                return previous
            if previous is not None:
                session["from_step"] = trainer.state.steps
                provenance.update(started=previous["started"], sessions=list(previous["sessions"]),
                                  budget=previous["budget"])
            provenance["sessions"].append(session)

            def save(status):
                state = trainer.state_dict()  # on every process (data-parallel: averages BatchNorm statistics)
                if not main:
                    return
                s = trainer.state
                provenance.update(status=status, finished=_now() if status != "running" else None,
                                  budget_spent=dict(backprops=s.backprops, data_passes=s.pass_samples / trainer.n,
                                                    epochs=s.samples / trainer.n, seconds=s.seconds, steps=s.steps))
                save_checkpoint(files.checkpoint, dict(state, provenance=provenance))
                write_run(files.results, provenance, s.log)

            idle = previous is not None and (trainer.exhausted(budget) or trainer.state.status == "diverged")
            if idle:  # nothing to train: the run keeps its budget and status; this session is recorded
                if main and trainer.state.status != "diverged" and trainer.spent(budget.unit) > budget.amount:
                    warnings.warn(f"{rid} has already spent {trainer.spent(budget.unit):.6g} {budget.unit}, more "
                                  f"than the budget {budget} asks for: nothing to do; its results and its budget "
                                  f"({previous['budget']}) stay as they are", BudgetWarning, stacklevel=2)
                save(previous["status"])
                return [dict(r) for r in trainer.state.log]
            provenance["budget"] = str(budget)
            if trainer.state.status == "complete":  # a larger budget continues it
                trainer.state.status = "running"
            return _loop(trainer, budget, save, progress, on_step, rid, distributed is not None)


class BudgetWarning(UserWarning):
    """A rerun asked for less than the run has already spent."""


def prepare_out(out: Union[str, os.PathLike]) -> Path:
    """The output folder ``out`` (and its ``checkpoints/``), created when missing; ValueError in one
    line when it cannot hold results (a file, a folder that cannot be created or written)."""
    folder = Path(out)
    for path in (folder, folder / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise ValueError(f"the output folder {path} is a file, not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot create the output folder {path}: {err.strerror or err}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"the output folder {path} is not writable")
    return folder


class RunFiles:
    """Where the run ``rid`` lives in ``folder``: ``<rid>.jsonl`` (results), ``checkpoints/<rid>.pt``
    and ``checkpoints/<rid>.lock``. ValueError when one of them is taken by a folder."""

    def __init__(self, folder: Path, rid: str):
        self.results = folder / f"{rid}.jsonl"
        self.checkpoint = folder / "checkpoints" / f"{rid}.pt"
        self.lock = folder / "checkpoints" / f"{rid}.lock"
        for path in (self.results, self.checkpoint, self.lock):
            if path.is_dir():
                raise ValueError(f"{path} is a folder, where the run's file belongs; move it away or write to "
                                 "another --out")


@contextlib.contextmanager
def _locked(files: RunFiles, comm, what: str):
    """Hold the run's lock (rank 0) for the block; every process stops if rank 0 could not take it."""
    lock, error = None, None
    if comm.is_main:
        try:
            lock = RunLock(files.lock, what).__enter__()
        except ValueError as err:
            error = err
    failed, _ = comm.agree(error is not None, 0.0)
    if failed:
        raise error if error is not None else RunLockedError(f"{what}: rank 0 could not lock it")
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _covers(provenance: Dict[str, Any], budget: Budget) -> bool:
    """Whether a finished run's recorded spending reaches ``budget`` (a diverged run is done)."""
    if provenance.get("status") == "diverged":
        return True
    spent = (provenance.get("budget_spent") or {}).get(budget.unit)
    if provenance.get("status") != "complete" or spent is None:
        return False
    if budget.unit == "epochs":
        n = provenance["dataset"]["n_train"]
        return round(spent * n) >= math.ceil(budget.amount * n - 1e-9)
    return spent >= budget.amount


def _resume(trainer: Trainer, files: RunFiles, budget: Budget, verbose: bool):
    """Load what ``files`` hold into ``trainer``. Returns the checkpoint's provenance (resumed),
    None (nothing there: a new run), or the records of a finished run whose checkpoint is gone
    or damaged (returned as recorded, when they cover ``budget``). Raises ValueError in one line,
    naming the file and offering ``--fresh``, for anything that cannot be resumed safely."""
    fresh = "pass fresh=True (--fresh) to train the run again from the start"
    results, results_problem = None, None
    if files.results.exists():
        try:
            results = read_run(files.results)
        except RunFileError as err:
            results_problem = str(err)
    if results is not None:
        old = results.provenance.get("config")
        if old != trainer.cfg:
            diff = sorted(k for k in set(trainer.cfg) | set(old or {}) if trainer.cfg.get(k) != (old or {}).get(k))
            raise ValueError(f"the results {files.results} belong to a run with other settings (differing: "
                             f"{', '.join(diff)}); pass fresh=True (--fresh) to start over, or another output folder")
        fresh += f" (it replaces {files.results.name}, which holds {len(results.records)} records)"
    ck, ck_problem = None, None
    if files.checkpoint.exists():
        try:
            ck = _checked(load_checkpoint(files.checkpoint), files.checkpoint, trainer)
        except CheckpointError as err:
            ck_problem = str(err)
    elif results is not None or results_problem is not None:
        ck_problem = f"{files.checkpoint}: missing"
    if ck_problem is not None:
        if results is not None and _covers(results.provenance, budget):
            if verbose and files.checkpoint.exists():
                print(f"warning: {ck_problem}; {files.results} holds the finished run, returned as it is "
                      "(a larger budget needs --fresh)", file=sys.stderr)
            return [dict(r) for r in results.records]
        raise CheckpointError(f"{ck_problem}, so {files.results.name} cannot be continued; {fresh}"
                              if results is not None or results_problem else f"{ck_problem}; {fresh}")
    if ck is None:
        return None
    try:
        trainer.load_state_dict(ck)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{files.checkpoint}: does not fit this run ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); {fresh}") from None
    log = trainer.state.log
    if results is not None and [json.dumps(r) for r in results.records] != [json.dumps(r) for r in
                                                                            log[:len(results.records)]]:
        raise CheckpointError(f"{files.results} holds records that its checkpoint {files.checkpoint} does not (the "
                              f"checkpoint is older than the results, or belongs to another run); {fresh}")
    if verbose:
        if results_problem is not None:
            print(f"note: {results_problem.split('; ')[0]}: rewritten from its checkpoint", file=sys.stderr)
        print(f"resuming {files.results.stem} from {files.checkpoint} ({trainer.state.steps} steps done)",
              file=sys.stderr)
    return ck["provenance"]


def _checked(ck, path: Path, trainer: Trainer) -> Dict[str, Any]:
    """``ck`` if it is a checkpoint of this run; CheckpointError (or ValueError for other settings)."""
    keys = ("version", "config", "state", "model", "optimizer", "rng", "provenance")
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of a run (no {missing[0]!r})")
    if ck["version"] != _CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: written by another version of trlib (checkpoint format {ck['version']!r}, "
                              f"this one reads {_CHECKPOINT_VERSION})")
    cfg, old = trainer.cfg, ck["config"]
    if old != cfg:
        diff = sorted(k for k in set(cfg) | set(old) if cfg.get(k) != old.get(k))
        raise ValueError(f"the checkpoint {path} belongs to a run with other settings (differing: "
                         f"{', '.join(diff)}); pass fresh=True (--fresh) to start over, or another output folder")
    world = ck["provenance"].get("world_size", 1)
    if world != trainer.comm.world_size:
        raise ValueError(f"the checkpoint {path} was written by a run over {world} process(es); resume it with "
                         f"{world} (this run has {trainer.comm.world_size}), or pass fresh=True (--fresh)")
    return ck


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; anything else as ``torch.device`` reads it.
    ValueError for CUDA where there is none."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but CUDA is not available here")
    return device


def _loop(trainer: Trainer, budget: Budget, save, progress: bool, on_step, rid: str, distributed: bool = False):
    if progress:  # tqdm.auto looks for Jupyter widgets: only worth its import when a bar is shown
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    s = trainer.state
    bar = tqdm(total=budget.amount, initial=min(trainer.spent(budget.unit), budget.amount), unit=budget.unit,
               desc=rid, disable=not progress, leave=False, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.4g}/{total:.4g} {unit} [{elapsed}<{remaining}{postfix}]")
    consistent = True
    try:
        with _deferred_sigint(distributed) as sigint:
            if not s.log:
                trainer.record()
            while s.status == "running":
                stop, s.seconds = trainer.comm.agree(sigint["set"], s.seconds)  # the same on every process
                if trainer.exhausted(budget):
                    break
                if stop:
                    raise KeyboardInterrupt
                before = trainer.spent(budget.unit)
                consistent = False
                epochs_before = s.epochs_done
                trainer.step()
                consistent = True
                trainer.watch("after_step")
                if s.samples >= s.next_eval:
                    rec = trainer.record()
                    bar.set_postfix(loss=f"{rec['train_loss']:.4g}", refresh=False)
                if s.epochs_done > epochs_before:
                    save("running")
                bar.update(min(trainer.spent(budget.unit), budget.amount) - min(before, budget.amount))
                if on_step is not None:
                    on_step(dict(steps=s.steps, backprops=s.backprops, data_passes=s.pass_samples / trainer.n,
                                 epoch=s.samples / trainer.n, seconds=s.seconds))
            if s.log[-1]["step"] != s.steps:
                trainer.record()
            if s.status == "running":
                s.status = "complete"
            save(s.status)
    except KeyboardInterrupt:
        if consistent:
            save("interrupted")
        raise
    finally:
        bar.close()
    return [dict(r) for r in s.log]
