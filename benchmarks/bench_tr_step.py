"""How close does one TrustRegion step get to the cost of its autodiff passes alone?

One TR iteration costs 1 gradient (with graph, for double-backward products) + k
Hessian-vector products + 1 forward at the trial point. This script times those passes alone, then whole ``TrustRegion.step`` calls,
and reports

    overhead = time(step) / (t_grad_graph + k * t_hvp + t_forward) - 1

with ``k`` the products the step really used, i.e. the solver's own cost (vector updates,
norm, copies, host-device synchronisation). It also reports the time per epoch of TR-RMS
(batch ``--tr-batch``) against Adam (batch ``--adam-batch``) on the same network, and the
effect of CG's ``check_every`` (how often the host waits for the device's stopping test).

Inputs are random tensors shaped like CIFAR-10 batches (a timing benchmark needs shapes,
not images); labels are random. Run, e.g.::

    python benchmarks/bench_tr_step.py                         # CPU, ResNet-20, small
    python benchmarks/bench_tr_step.py --device cuda --model resnet18 --tr-batch 512

All numbers come from one run, side by side; read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import datetime
import subprocess

import torch
from torch import nn

import trlib
from _common import device_name, set_threads, synchronize as _sync, time_median
from trlib import curvature, models


def _median_time(fn, device, repeats, warmup=2):
    return time_median(fn, device, repeats=repeats, warmup=warmup)["median"]


def build(name, device, channels_last=False):
    torch.manual_seed(0)
    if name == "resnet18":
        net = models.resnet18_cifar()
    elif name == "resnet20":
        net = models.resnet20()
    elif name == "mlp":
        net = models.mlp(3 * 32 * 32, (512, 256), 10)
    else:
        raise ValueError(f"Invalid --model: {name!r}")
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net.train()


def batch(size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (size,), generator=g).to(device)
    return x, y


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet20", choices=["resnet18", "resnet20", "mlp"])
    p.add_argument("--tr-batch", type=int, default=128)
    p.add_argument("--adam-batch", type=int, default=128)
    p.add_argument("--krylov", type=int, default=10, help="max Krylov products per TR step")
    p.add_argument("--check-every", type=int, nargs="+", default=[1, 5])
    p.add_argument("--hvp", default="double_backward", choices=["double_backward", "forward_over_reverse"])
    p.add_argument("--hessian-fraction", type=float, default=1.0,
                   help="products on this fraction of the TR batch (step's hessian_closure; 1: the whole batch)")
    p.add_argument("--optimizer", default="tr", choices=["tr", "arc"], help="TrustRegion or ARC (both RMS norm)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch and BLAS (0: library defaults); one is steadiest on a shared machine")
    p.add_argument("--epoch-size", type=int, default=50000)
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="keep cuDNN's default algorithm choice (benchmark mode makes double-backward "
                        "convolutions ~2x faster on Hopper)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if device.type == "cpu":
        set_threads(args.threads)
    name = device_name(device)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    out = {"provenance": {"commit": commit, "date": datetime.date.today().isoformat(),
                          "note": "random tensors shaped like CIFAR-10 batches (a timing benchmark)"},
           "device": name, "torch": torch.__version__, "model": args.model,
           "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if device.type == "cuda" else None, "tr_batch": args.tr_batch,
           "adam_batch": args.adam_batch, "krylov": args.krylov, "hvp": args.hvp,
           "hessian_fraction": args.hessian_fraction, "optimizer": args.optimizer}

    net = build(args.model, device)
    params = [q for q in net.parameters() if q.requires_grad]
    x, y = batch(args.tr_batch, device)
    loss_fn = nn.functional.cross_entropy
    closure = lambda: loss_fn(net(x), y)  # noqa: E731

    # --- the autodiff passes alone
    def grad_plain():
        torch.autograd.grad(closure(), params)

    def grad_graph():
        return curvature.flat_grad(closure(), params, create_graph=True)

    t_grad = _median_time(grad_plain, device, args.repeats)
    t_grad_graph = _median_time(grad_graph, device, args.repeats)
    g = grad_graph()
    v = torch.randn_like(g)
    if args.hvp == "double_backward":
        hvp = curvature.hvp_double_backward(g, params)
        t_hvp = _median_time(lambda: hvp(v), device, args.repeats)
    else:
        f = curvature.functional_loss(closure, net, params)
        raw = curvature.hvp_forward_over_reverse(f, params)

        def fr():
            with curvature.frozen_batchnorm_stats(net):
                return raw(v)

        t_hvp = _median_time(fr, device, args.repeats)
    del g  # frees the gradient's graph (the operators hold it only while alive)
    hvp = raw = None

    def forward():
        with torch.no_grad(), curvature.frozen_batchnorm_stats(net):
            closure()

    t_fwd = _median_time(forward, device, args.repeats)
    out.update(t_grad=t_grad, t_grad_graph=t_grad_graph, t_hvp=t_hvp, t_forward=t_fwd,
               hvp_over_grad=t_hvp / t_grad, grad_graph_over_grad=t_grad_graph / t_grad)

    # --- whole TR steps
    out["tr"] = {}
    for check_every in args.check_every:
        net_tr = build(args.model, device)
        params_tr = list(net_tr.parameters())
        if args.optimizer == "arc":
            opt = trlib.ARC(params_tr, norm="rms", module=net_tr, krylov_tol=1e-9, max_krylov=args.krylov,
                            hvp=args.hvp)
        else:
            opt = trlib.TrustRegion(params_tr, norm="rms", module=net_tr, radius=1.0, max_radius=1e6,
                                    krylov_tol=1e-9, max_krylov=args.krylov, hvp=args.hvp, check_every=check_every)
        m = max(1, round(args.hessian_fraction * args.tr_batch))
        extras = {} if m >= args.tr_batch else dict(
            hessian_closure=lambda: loss_fn(net_tr(x[:m]), y[:m]), hessian_fraction=m / args.tr_batch)
        step = lambda: opt.step(lambda: loss_fn(net_tr(x), y), **extras)  # noqa: E731
        for _ in range(2):
            step()
        times, predicted, products = [], [], []
        for _ in range(args.repeats):
            before = opt.counts["hvp"]
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
            k = round((opt.counts["hvp"] - before) * args.tr_batch / m)  # products, whatever batch they ran on
            products.append(k)
            # forward-over-reverse needs no graph on the gradient: the plain gradient is the pass
            # (with a sub-batch the passes alone are not measured: no overhead figure)
            predicted.append((t_grad_graph if args.hvp == "double_backward" else t_grad) + k * t_hvp + t_fwd
                             if m >= args.tr_batch else math.nan)
        t_step = statistics.median(times)
        overhead = statistics.median([t / pr - 1 for t, pr in zip(times, predicted)])
        out["tr"][check_every] = dict(t_step=t_step, hvps=statistics.mean(products), overhead=overhead)

    # --- epoch time: TR-RMS vs Adam
    net_a = build(args.model, device)
    adam = torch.optim.Adam(net_a.parameters(), lr=1e-3)
    xa, ya = batch(args.adam_batch, device, seed=1)

    def adam_step():
        adam.zero_grad(set_to_none=True)
        loss_fn(net_a(xa), ya).backward()
        adam.step()

    t_adam = _median_time(adam_step, device, args.repeats)
    best = min(out["tr"].values(), key=lambda r: r["t_step"])
    epoch_tr = best["t_step"] * args.epoch_size / args.tr_batch
    epoch_adam = t_adam * args.epoch_size / args.adam_batch
    out.update(t_adam_step=t_adam, epoch_tr=epoch_tr, epoch_adam=epoch_adam, epoch_ratio=epoch_tr / epoch_adam)

    print(f"device: {name}   torch {torch.__version__}   model: {args.model}   HVP mode: {args.hvp}")
    print(f"TR batch {args.tr_batch} (CIFAR-shaped random tensors), at most {args.krylov} products per step")
    print(f"  gradient                 {t_grad * 1e3:9.2f} ms")
    print(f"  gradient with graph      {t_grad_graph * 1e3:9.2f} ms   ({t_grad_graph / t_grad:.2f} x gradient)")
    print(f"  Hessian-vector product   {t_hvp * 1e3:9.2f} ms   ({t_hvp / t_grad:.2f} x gradient)")
    print(f"  forward (no grad)        {t_fwd * 1e3:9.2f} ms   ({t_fwd / t_grad:.2f} x gradient)")
    for ce, r in out["tr"].items():
        print(f"  TR step, check_every={ce:<3d} {r['t_step'] * 1e3:9.2f} ms   ({r['hvps']:.1f} products per step; "
              f"overhead over the autodiff passes {100 * r['overhead']:+.1f}%)")
    print(f"Adam step (batch {args.adam_batch})   {t_adam * 1e3:9.2f} ms")
    if m < args.tr_batch:
        print(f"  (products on {m} of the {args.tr_batch} samples: hessian_fraction {m / args.tr_batch:.4g})")
    label = "ARC-RMS" if args.optimizer == "arc" else "TR-RMS"
    print(f"epoch of {args.epoch_size}: {label} {epoch_tr:.1f} s vs Adam {epoch_adam:.1f} s  "
          f"(ratio {epoch_tr / epoch_adam:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=str)
    return out


if __name__ == "__main__":
    main()
