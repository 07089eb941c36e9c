"""Data-parallel TrustRegion over 2 gloo processes equals one process on the union batch."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import trlib


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _batches(steps):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g))
            for _ in range(steps)]


def _train(model, opt, batches, rank=0, world=1):
    losses = []
    for x, y in batches:
        xs, ys = x[rank::world], y[rank::world]  # this process's shard (equal sizes)
        losses.append(float(opt.step(lambda: nn.functional.cross_entropy(model(xs), ys))))
    return losses


def _worker(rank, world, init_file, out_dir, method):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model()
        opt = trlib.TrustRegion(model.parameters(), norm="rms", method=method, distributed=True)
        _train(model, opt, _batches(6), rank, world)
        torch.save({"params": [p.detach() for p in model.parameters()], "counts": opt.counts,
                    "radius": opt.radius, "last": opt.last}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["cg", "gltr"])
def test_two_gloo_processes_match_the_union_batch(method):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, method), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    model = _model()
    opt = trlib.TrustRegion(model.parameters(), norm="rms", method=method)
    _train(model, opt, _batches(6))
    for r in results:
        for p, q in zip(model.parameters(), r["params"]):
            torch.testing.assert_close(q, p.detach(), rtol=1e-9, atol=1e-12)
        assert r["counts"] == opt.counts
        assert r["last"]["accepted"] == opt.last["accepted"]
    for p, q in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(p, q)  # every process took exactly the same steps


def test_distributed_without_init_is_a_clear_error():
    with pytest.raises(ValueError, match="distributed"):
        trlib.TrustRegion(_model().parameters(), distributed=True)
