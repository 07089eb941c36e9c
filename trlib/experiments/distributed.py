"""Data-parallel training of the experiments over several processes (``torchrun``).

::

    torchrun --standalone --nproc_per_node=4 -m trlib.experiments run --distributed \\
        --task cifar_resnet18 --method tr_rms adam --seeds 0 1 2 --budget 20000backprops \\
        --device cuda --data real --out results/

Every process runs the same loop on the same data order (the run's seed) and keeps a full
copy of the model. What each one does differently, and where they talk to each other:

* **the batch.** The global mini-batch is the configured ``batch_size`` (as in a single
  process); process ``r`` of ``W`` takes the ``r``-th of ``W`` contiguous slices of it
  (equal sizes when ``W`` divides the batch; the last batch of an epoch may differ by one
  sample). Its loss is its data term summed and divided by ``batch / W`` (plus the L2 term),
  so the *average over processes* is exactly the mean over the whole batch, whatever the
  slice sizes.
* **trust-region methods** use ``TrustRegion(distributed=True)``: one all-reduce each for
  the loss, the gradient, every Hessian-vector product and the trial loss. Every process
  then solves the same subproblem and takes the same step, so the run equals one process on
  the whole batch, up to the order of floating-point sums.
* **first-order methods** (and warm-ups) average the gradients with one all-reduce per step
  (all parameters in one flat buffer) before ``optimizer.step()``.
* **evaluation** is sharded: each process evaluates a slice of the training and test sets
  and one all-reduce adds the sums (the batch-growth check of the TR methods uses it too).
* **control**: one all-reduce of two numbers per step agrees on the training seconds (the
  slowest process's) and on whether a Ctrl-C/SIGTERM arrived, so all processes stop at the
  same step.
* **BatchNorm** normalises with the statistics of each process's slice (as
  ``DistributedDataParallel`` does without ``SyncBatchNorm``, which has no double backward
  and so cannot give Hessian-vector products): a network with BatchNorm (the ResNets) is then
  trained like one process with "ghost batches" of ``batch / W`` samples, not exactly like one
  process on the whole batch. Running statistics are averaged over processes before every
  evaluation and checkpoint. Networks without BatchNorm (MLPs, LeNets, autoencoders) follow
  the single-process trajectory.
* **files**: only rank 0 writes the JSON lines, the checkpoints and the progress bar. On
  resumption every process reads rank 0's checkpoint (one machine, or a shared file system),
  which must come from a run with the same number of processes.

Backends: NCCL on CUDA (process ``r`` uses ``cuda:LOCAL_RANK``), gloo on the CPU.

From Python, after ``torch.distributed.init_process_group`` (or under torchrun)::

    from trlib.experiments import run, distributed
    ctx = distributed.setup("cpu")          # or "cuda"
    log = run("mnist_mlp", "tr_rms", 0, "5epochs", distributed=ctx, out="results/")
    distributed.teardown(ctx)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "teardown", "in_torchrun", "shard", "load_data_on_rank0_first"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """The data-parallel communicator of the runner (see :class:`trlib.experiments.runner.SingleProcess`
    for the interface): this process is ``rank`` of ``world_size``, on ``device``, talking over
    ``backend`` (``"nccl"`` or ``"gloo"``) in ``group`` (None: the world)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def trust_region_options(self) -> Dict[str, Any]:
        """TrustRegion averages the loss, the gradient, every product and the trial loss."""
        return dict(distributed=True, process_group=self.group)

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's contiguous piece of ``idx`` (see :func:`shard`)."""
        return shard(idx, self.rank, self.world_size)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` replaced, in place, by its average over the processes (one all-reduce)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
            tensor.div_(self.world_size)
        return tensor

    def agree(self, stop: bool, seconds: float):
        """(whether any process saw a Ctrl-C/SIGTERM, the slowest process's training seconds):
        one all-reduce of two numbers, so all processes stop at the same step."""
        if self.world_size == 1:
            return stop, seconds
        flags = torch.tensor([1.0 if stop else 0.0, seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flags[0] > 0), float(flags[1])

    def average_buffers(self, module: torch.nn.Module) -> None:
        """BatchNorm running statistics: the average over processes (each saw its own slices)."""
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if self.world_size > 1 and buffers:
            flat = self.mean(torch.cat([b.reshape(-1) for b in buffers]))
            with torch.no_grad():
                for b, chunk in zip(buffers, flat.split([b.numel() for b in buffers])):
                    b.copy_(chunk.view_as(b))

    def barrier(self) -> None:
        if self.world_size > 1:
            if self.backend == "nccl":
                dist.barrier(group=self.group, device_ids=[self.device.index])
            else:
                dist.barrier(group=self.group)


def in_torchrun() -> bool:
    """Whether the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...) is set."""
    return all(k in os.environ for k in _ENV)


def setup(device="cpu", *, timeout_s: Optional[float] = None) -> Context:
    """Join (or create) the default process group and return this process's :class:`Context`.

    ``device``: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, on ``cuda:LOCAL_RANK``). If
    ``torch.distributed`` is already initialised (e.g. by ``torch.multiprocessing.spawn``
    code), that group is used; otherwise it is created from the torchrun environment.
    ValueError when neither is there, or when the device does not fit the backend.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--distributed supports the devices cpu and cuda, got {device}")
    if device.type == "cuda" and device.index is not None:
        raise ValueError(f"with --distributed pass --device cuda, not {device}: process r uses cuda:LOCAL_RANK")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if not dist.is_available():
        raise ValueError("--distributed: this build of torch has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if not in_torchrun():
            missing = ", ".join(k for k in _ENV if k not in os.environ)
            raise ValueError("--distributed needs the environment torchrun sets up (missing: "
                             f"{missing}); start it as: torchrun --standalone --nproc_per_node=N "
                             "-m trlib.experiments run --distributed ...")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        kwargs = {}
        if timeout_s is not None:
            import datetime

            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, **kwargs)
    backend = str(dist.get_backend())
    if device.type == "cuda":
        if backend != "nccl":
            raise ValueError(f"--device cuda needs the nccl backend, the process group uses {backend}")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend != "gloo":
        raise ValueError(f"--device cpu needs the gloo backend, the process group uses {backend}")
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=device, backend=backend)


def teardown(ctx: Optional[Context] = None) -> None:
    """Leave the process group (after a barrier, so no process exits while others still talk)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if ctx is not None:
                ctx.barrier()
        finally:
            dist.destroy_process_group()


def shard(idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's slice of the global batch ``idx``: the ``rank``-th of ``world_size``
    contiguous pieces (sizes differ by at most one).

    >>> shard(torch.arange(10), 0, 2).tolist(), shard(torch.arange(10), 1, 2).tolist()
    ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    >>> [len(shard(torch.arange(7), r, 2)) for r in range(2)]
    [4, 3]
    """
    return torch.tensor_split(idx, world_size)[rank]


def load_data_on_rank0_first(ctx: Context, load: Callable[[str, bool], Any], data: str):
    """Load the datasets with ``load(data, verbose)``: rank 0 first (it may download), then the
    others, told by rank 0 whether the real dataset or the stand-in was loaded, so that every
    process trains on the same data and nobody downloads twice. An exception on rank 0 is
    raised on every process (as the same type when it is a DatasetUnavailableError)."""
    from ..data import DatasetUnavailableError

    outcome: list = [None]
    result = None
    if ctx.is_main:
        try:
            result = load(data, True)
            outcome[0] = ("ok", "stand-in" if result[0].is_stand_in else "real")
        except DatasetUnavailableError as err:
            outcome[0] = ("unavailable", str(err))
        except Exception as err:  # noqa: BLE001 - passed on, then raised everywhere
            outcome[0] = ("error", f"{type(err).__name__}: {err}")
    if ctx.world_size > 1:
        dist.broadcast_object_list(outcome, src=0, group=ctx.group)
    kind, detail = outcome[0]
    if kind == "unavailable":
        raise DatasetUnavailableError(detail)
    if kind == "error":
        raise RuntimeError(f"rank 0 could not load the data: {detail}")
    return result if ctx.is_main else load(detail, False)
