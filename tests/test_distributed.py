"""Data-parallel TrustRegion over 2 gloo processes equals one process on the union batch.

The reference is one process whose closure averages the shards' mean losses, which is the
union batch's mean loss (equal shards) with the same floating-point sums as the all-reduce
(a + b, then / 2): the runs then agree bit for bit, so even a stopping test that sits on its
threshold cannot make them differ, and a real difference (a missing all-reduce, a product
not averaged) shows as a failure.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import trlib

WORLD = 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _batches(steps):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g))
            for _ in range(steps)]


def _loss(model, x, y, rank):
    return nn.functional.cross_entropy(model(x[rank::WORLD]), y[rank::WORLD])  # this process's shard


def _worker(rank, init_file, out_dir, method):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        opt = trlib.TrustRegion(model.parameters(), norm="rms", method=method, distributed=True)
        for x, y in _batches(6):
            opt.step(lambda: _loss(model, x, y, rank))
        torch.save({"params": [p.detach() for p in model.parameters()], "counts": opt.counts,
                    "radius": opt.radius, "last": opt.last}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["cg", "gltr"])
def test_two_gloo_processes_match_the_union_batch(method):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, method), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    model = _model()
    opt = trlib.TrustRegion(model.parameters(), norm="rms", method=method)
    union = []
    for x, y in _batches(6):
        shards = lambda: sum(_loss(model, x, y, r) for r in range(WORLD)) / WORLD  # noqa: E731
        with torch.no_grad():
            union.append(float(nn.functional.cross_entropy(model(x), y)) - float(shards()))
        opt.step(shards)
    assert max(abs(d) for d in union) < 1e-14  # the shards' mean is the union batch's loss
    assert opt.counts["hvp"] > 6 and 0 < opt.radius
    for r in results:
        for p, q in zip(model.parameters(), r["params"]):
            assert torch.equal(q, p.detach())
        assert r["counts"] == opt.counts and r["radius"] == opt.radius and r["last"] == opt.last


def test_distributed_without_init_is_a_clear_error():
    with pytest.raises(ValueError, match="distributed"):
        trlib.TrustRegion(_model().parameters(), distributed=True)
