"""The runner over 2 gloo processes on the CPU (``--distributed``) equals one process on the
same global batches: same losses, accuracies and backprops (to float32 rounding), one set of
files written by rank 0, resumption, and every process taking the same step."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trlib.experiments import Trainer, load_runs, run
from trlib.experiments import distributed as D
from trlib.experiments.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("train_loss", "test_loss", "train_acc", "test_acc")



def single(task, method, budget, **kw):
    return run(task, method, 0, budget, quick=True, progress=False, verbose=False, **kw)


def assert_same_trajectory(one, many, rtol=1e-4):
    """The work counters agree exactly, the metrics to float32 rounding (sums in another order)."""
    assert len(one) == len(many)
    for a, b in zip(one, many):
        for key in ("step", "epoch", "backprops", "batch_size", "phase", "dataset", "stand_in"):
            assert a[key] == b[key], (key, a, b)
        for key in METRICS:
            assert b[key] == pytest.approx(a[key], rel=rtol, abs=1e-6), (key, a, b)
        if a["radius"] is not None:
            assert b["radius"] == pytest.approx(a["radius"], rel=rtol)


def test_torchrun_cli_two_processes_match_one_process(tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trlib.experiments", "run", "--distributed", "--task", "mnist_mlp", "--method", "tr_uniform", "adam",
           "--budget", "3epochs", "--quick", "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for method in ("tr_uniform", "adam"):  # rank 0 alone prints the summary
        assert done.stdout.count(f"mnist_mlp {method} seed 0") == 1, done.stdout
    assert "(2 processes)" in done.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["checkpoints", "mnist_mlp__adam__digits__seed0.jsonl", "mnist_mlp__tr_uniform__digits__seed0.jsonl"]
    runs = {r.provenance["method"]: r for r in load_runs(out)}
    for method, r in runs.items():
        assert r.provenance["world_size"] == 2 and r.provenance["distributed_backend"] == "gloo"
        assert r.provenance["status"] == "complete"
        assert_same_trajectory(single("mnist_mlp", method, "3epochs"), r.records)
    # the TR run took several products per step, and the last batch of each epoch (1437 = 2 * 512
    # + 413) was split 207 / 206: the weighting made the average the mean over the batch anyway
    assert runs["tr_uniform"].records[-1]["backprops"] > runs["tr_uniform"].records[-1]["step"]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        ctx = D.setup("cpu")
        report = {"ctx": [ctx.rank, ctx.world_size, ctx.backend]}
        # 1. interrupted after 4 steps (the same step on both processes), then resumed
        folder = os.path.join(out_dir, "runs")

        def stop(info):
            if info["steps"] == 4:
                raise KeyboardInterrupt

        try:
            run("mnist_mlp", "tr_rms", 0, "2epochs", quick=True, out=folder, distributed=ctx, on_step=stop,
                progress=False, verbose=False, overrides={"radius": 0.05})
        except KeyboardInterrupt:
            report["interrupted"] = True
        report["resumed"] = run("mnist_mlp", "tr_rms", 0, "2epochs", quick=True, out=folder, distributed=ctx,
                                progress=False, verbose=False, overrides={"radius": 0.05})
        # 2. a ResNet (BatchNorm): every process takes exactly the same steps
        from trlib.experiments.configs import get_config
        from trlib.experiments.runner import load_data

        train, test = load_data("cifar_resnet20", "stand-in", verbose=False)
        cfg = get_config("cifar_resnet20", "tr_rms", batch_size=32, max_krylov=3, warmup_epochs=0, radius=0.01)
        trainer = Trainer(cfg, train, test, torch.device("cpu"), 0, ctx)
        for _ in range(2):
            trainer.step()
        trainer.record()
        report["resnet_params"] = [p.detach().clone() for p in trainer.model.parameters()]
        report["resnet_buffers"] = [b.clone() for b in trainer.model.buffers()]
        report["resnet_log"] = trainer.state.log
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_spawned_processes_resume_and_take_the_same_steps(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["ctx"] for r in reports] == [[0, 2, "gloo"], [1, 2, "gloo"]]
    assert all(r.get("interrupted") for r in reports)
    # both processes return the same log, equal to an uninterrupted single process
    drop = lambda log: [{k: v for k, v in rec.items() if k != "time"} for rec in log]  # noqa: E731
    assert drop(reports[0]["resumed"]) == drop(reports[1]["resumed"])
    assert_same_trajectory(single("mnist_mlp", "tr_rms", "2epochs", overrides={"radius": 0.05}), reports[0]["resumed"])
    header = load_runs(tmp_path / "runs")[0].provenance
    assert header["world_size"] == 2 and len(header["sessions"]) == 2 and header["status"] == "complete"
    # BatchNorm: same weights and (averaged) running statistics on every process
    for a, b in zip(reports[0]["resnet_params"], reports[1]["resnet_params"]):
        assert torch.equal(a, b)
    for a, b in zip(reports[0]["resnet_buffers"], reports[1]["resnet_buffers"]):
        assert torch.equal(a, b)
    assert drop(reports[0]["resnet_log"]) == drop(reports[1]["resnet_log"])
    # a checkpoint of 2 processes does not resume in 1
    with pytest.raises(ValueError, match="2 process"):
        single("mnist_mlp", "tr_rms", "3epochs", overrides={"radius": 0.05}, out=tmp_path / "runs")


def test_distributed_outside_torchrun_is_a_clean_error(capsys, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--task", "mnist_mlp", "--method", "sgd", "--quick", "--out", "unused", "--distributed"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        D.setup("cuda:1")


def test_shards_cover_the_batch():
    idx = torch.randperm(413)
    parts = [D.shard(idx, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [207, 206]
    assert torch.equal(torch.cat(parts), idx)
    assert D.in_torchrun() == all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT"))


def test_docs_mention_torchrun():
    text = (ROOT / "README.md").read_text()
    assert "torchrun" in text and "--distributed" in text


def test_docstring_examples():
    import doctest

    assert doctest.testmod(D, optionflags=doctest.ELLIPSIS).failed == 0
