r"""What does one Hessian-vector product cost, in units of one gradient?

Measures, side by side in one run, on (a) an MLP 784-512-256-10 (tanh, batch 512) and
(b) ResNet-20 (``trlib.models.resnet20``, 3x32x32 inputs, BatchNorm in train mode),
float32, cross-entropy loss on random data (fixed seeds):

* ``grad``        one ordinary gradient: forward + backward (``flat_grad``; like every mode
  here, BatchNorm uses batch statistics with running averages frozen);
* ``grad+graph``  the same with ``create_graph=True`` (what double backward needs once per step);
* ``HVP db``      one product by double backward (``hvp_double_backward``), reusing that graph;
* ``HVP fwd-rev`` one product by forward-over-reverse (``functional_loss`` +
  ``hvp_forward_over_reverse``): each product re-runs a forward and a backward pass;
* ``HVP lin``     one product by ``hvp_linearized`` (``torch.func.linearize``), reusing a
  linearisation traced once per step (``lin build``, timed once, not per product).

All times come from ``--repeats`` rounds after ``--warmup`` untimed ones; each round times
every quantity once (round-robin), so on a shared machine they all see the same load. CUDA
is synchronised around every timed call. The table gives median, min and max, and the
ratios to ``grad`` of the medians and of the minima (on a busy CPU the minima are the less
noisy estimate; where the two ratios differ a lot, the machine was loaded: rerun).
Pearlmutter's trick promises a product at a small constant (roughly 1-4) times a gradient.
The per-step cost of ``k`` products is ``grad+graph + k * HVP db`` for double backward, but
``grad + k * HVP fwd-rev`` for forward-over-reverse (the gradient itself is needed anyway).

On CUDA the table also gives the peak extra GPU memory of each mode (above the memory
held by the model and data): double backward keeps the gradient's graph alive between
products, forward-over-reverse does not.

Before timing, the script asserts that the modes agree: ``||Hv_a - Hv_b|| / ||Hv_a||``
below ``--tol`` for the same random ``v`` (BatchNorm layers use batch statistics in every
mode, through ``trlib.curvature.frozen_batchnorm_stats``). TF32 is switched off on CUDA
unless ``--allow-tf32`` (TF32 convolutions alone differ from float32 by ~1e-3).
``--cudnn-benchmark`` lets cuDNN autotune its convolution algorithms: PyTorch's default
heuristics pick a slow fallback kernel (``implicit_convolve_sgemm``) for the convolutions of
the double-backward pass, which then dominates a ResNet product.

On the CPU the default is one thread (``--threads``; 0 keeps the library defaults): with
several threads on cores that other processes also use, OpenMP's synchronisation inflates
and scatters the times of the many small kernels of a product far more than those of a
gradient (on the shared 2-core machine of the published figures, a ResNet-20 gradient
varied from 0.27 s to 2.3 s within one run with 2 threads).

Run: ``python benchmarks/bench_hvp.py [--device cuda] [--resnet-batch 128] [--json out.json]``.
The CPU default for the ResNet batch is 32 (one ResNet-20 product at batch 128 takes
several seconds on a 2-core CPU); on CUDA it is 128.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import _common
from trlib import curvature
from trlib.models import count_parameters, mlp

try:  # trlib.models.resnet20 is the reference ResNet-20; keep a fallback for older checkouts.
    from trlib.models import resnet20
except ImportError:  # pragma: no cover - exercised only on checkouts without it
    resnet20 = None


# torch.func.linearize goes through torch.jit internally and warns about its deprecation.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Attempted to insert a get_attr Node", category=UserWarning)


def _compact_resnet20(num_classes: int = 10) -> torch.nn.Module:
    """A ResNet-20-like net (3 stages x 3 basic blocks, 16/32/64 channels) for checkouts
    whose trlib.models lacks resnet20. Out-of-place ops only (double backward, torch.func)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.sc = nn.Sequential()
            if stride != 1 or cin != cout:
                self.sc = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(out)) + self.sc(x))

    layers, c = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for i, w in enumerate((16, 32, 64)):
        for j in range(3):
            layers.append(Block(c, w, 2 if (i > 0 and j == 0) else 1))
            c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def build_problem(name: str, batch: int, device: torch.device, activation: str):
    """(model, closure, params, description) with fixed seeds."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = mlp(784, (512, 256), 10, activation=activation)
        x = torch.randn(batch, 784, generator=gen)
        desc = f"MLP 784-512-256-10 ({activation}), batch {batch}"
    else:
        if resnet20 is not None:
            model, origin = resnet20(), "trlib.models.resnet20"
        else:
            model, origin = _compact_resnet20(), "compact ResNet-20 (defined in this script)"
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        desc = f"ResNet-20 ({origin}), 3x32x32, BatchNorm train mode, batch {batch}"
    y = torch.randint(0, 10, (batch,), generator=gen)
    model = model.to(device).train()
    x, y = x.to(device), y.to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def closure():
        return F.cross_entropy(model(x), y)

    desc += f", {count_parameters(model):,} parameters"
    return model, closure, params, desc


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a).clamp_min(1e-30))


def _peak_extra_mib(fn, device: torch.device):
    """Peak GPU memory allocated while ``fn()`` runs, above what was allocated before (MiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def bench_network(name: str, batch: int, device: torch.device, args) -> dict:
    model, closure, params, desc = build_problem(name, batch, device, args.activation)
    print(f"[{name}] {desc}", flush=True)
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(device)
    timing = dict(device=device, repeats=args.repeats, warmup=args.warmup)
    res = {"network": name, "description": desc, "batch": batch, "parameters": n}

    # --- correctness first: every mode against double backward, same v --------------------
    with curvature.frozen_batchnorm_stats(model):
        g_graph = curvature.flat_grad(closure(), params, create_graph=True)
        hvp_db = curvature.hvp_double_backward(g_graph, params)
        ref = hvp_db(v)
        f = curvature.functional_loss(closure, model, params)
        hvp_fr = curvature.hvp_forward_over_reverse(f, params)
        agreement = {"fwd-rev vs db": _rel(ref, hvp_fr(v))}
        hvp_lin, lin_error = None, None
        if not args.no_linearized:
            try:
                t0 = time.perf_counter()
                hvp_lin = curvature.hvp_linearized(f, params)
                _common.synchronize(device)
                res["lin_build_s"] = time.perf_counter() - t0
                agreement["lin vs db"] = _rel(ref, hvp_lin(v))
            except Exception as exc:  # report, do not hide: the table says it failed and why
                lin_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                hvp_lin = None
    res["agreement"] = agreement
    res["linearized_error"] = lin_error
    for key, err in agreement.items():
        assert err <= args.tol, f"[{name}] HVP modes disagree: {key} relative error {err:.3e} > tol {args.tol:.1e}"
    del g_graph, hvp_db, ref

    # --- timings: round-robin, so every quantity sees the same load ----------------------
    with curvature.frozen_batchnorm_stats(model):
        g_graph = curvature.flat_grad(closure(), params, create_graph=True)
        hvp_db = curvature.hvp_double_backward(g_graph, params)
        fns = {
            "grad": lambda: curvature.flat_grad(closure(), params),
            "grad+graph": lambda: curvature.flat_grad(closure(), params, create_graph=True),
            "HVP db": lambda: hvp_db(v),
            "HVP fwd-rev": lambda: hvp_fr(v),
        }
        if hvp_lin is not None:
            fns["HVP lin"] = lambda: hvp_lin(v)
        t = _common.time_interleaved(fns, **timing)
        del g_graph, hvp_db, fns
    if hvp_lin is not None:
        t["lin build"] = {"median": res["lin_build_s"], "min": res["lin_build_s"], "max": res["lin_build_s"]}
    del hvp_lin
    res["times_s"] = t
    res["ratio_to_grad"] = {k: tm["median"] / t["grad"]["median"] for k, tm in t.items()}
    res["ratio_to_grad_min"] = {k: tm["min"] / t["grad"]["min"] for k, tm in t.items()}

    # --- memory (CUDA only) ---------------------------------------------------------------
    if device.type == "cuda":
        mem = {}
        mem["grad"] = _peak_extra_mib(lambda: curvature.flat_grad(closure(), params), device)
        with curvature.frozen_batchnorm_stats(model):
            def db_once():
                g = curvature.flat_grad(closure(), params, create_graph=True)
                h = curvature.hvp_double_backward(g, params)
                return (g, h(v))
            mem["grad+graph + 1 HVP db"] = _peak_extra_mib(db_once, device)
            mem["1 HVP fwd-rev"] = _peak_extra_mib(lambda: hvp_fr(v), device)
            if "HVP lin" in t:
                def lin_once():
                    h = curvature.hvp_linearized(f, params)
                    return (h, h(v))
                mem["lin build + 1 HVP"] = _peak_extra_mib(lin_once, device)
        res["peak_extra_mib"] = mem
    return res


def print_network(res: dict) -> None:
    print()
    print(f"{res['network']}: {res['description']}")
    rows = []
    for key, tm in res["times_s"].items():
        rows.append([key, f"{1e3 * tm['median']:.1f}", f"{1e3 * tm['min']:.1f}", f"{1e3 * tm['max']:.1f}",
                     f"{res['ratio_to_grad'][key]:.2f}", f"{res['ratio_to_grad_min'][key]:.2f}"])
    print(_common.format_table(["quantity", "median ms", "min ms", "max ms", "ratio (median)", "ratio (min)"], rows))
    if res.get("linearized_error"):
        print(f"hvp_linearized failed: {res['linearized_error']}")
    print("agreement (relative error vs double backward): "
          + ", ".join(f"{k} {e:.1e}" for k, e in res["agreement"].items()))
    r = res["ratio_to_grad"]
    print(f"one step with k products, in gradients: double backward {r['grad+graph']:.2f} + k*{r['HVP db']:.2f}; "
          f"forward-over-reverse 1 + k*{r['HVP fwd-rev']:.2f}"
          + (f"; linearized 1 + {r['lin build']:.2f} + k*{r['HVP lin']:.2f}" if "HVP lin" in r else ""))
    if "peak_extra_mib" in res:
        rows = [[k, f"{m:.1f}"] for k, m in res["peak_extra_mib"].items()]
        print(_common.format_table(["memory (CUDA)", "peak extra MiB"], rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--networks", default="mlp,resnet", help="comma-separated subset of mlp,resnet")
    p.add_argument("--mlp-batch", type=int, default=512)
    p.add_argument("--resnet-batch", type=int, default=None, help="default: 128 on CUDA, 32 on CPU")
    p.add_argument("--activation", default="tanh", help="MLP activation (trlib.models.mlp)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 5 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tol", type=float, default=1e-3, help="largest relative disagreement between HVP modes")
    p.add_argument("--no-linearized", action="store_true", help="skip hvp_linearized (slow to trace on CPU)")
    p.add_argument("--allow-tf32", action="store_true", help="keep TF32 on (CUDA); loosen --tol accordingly")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (autotuned convolutions; off is PyTorch's default)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and BLAS (default: 1 on CPU, steadiest on a shared machine; "
                        "0: library defaults)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)

    device = _common.resolve_device(args.device)
    if args.threads is None:
        args.threads = 1 if device.type == "cpu" else 0
    _common.set_threads(args.threads)
    if device.type == "cuda" and not args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    if args.repeats is None:
        args.repeats = 20 if device.type == "cuda" else 5
    if args.resnet_batch is None:
        args.resnet_batch = 128 if device.type == "cuda" else 32
    networks = [s.strip() for s in args.networks.split(",") if s.strip()]
    for s in networks:
        if s not in ("mlp", "resnet"):
            p.error(f"unknown network {s!r}")

    env = _common.environment(device)
    settings = dict(repeats=args.repeats, warmup=args.warmup, mlp_batch=args.mlp_batch,
                    resnet_batch=args.resnet_batch, dtype="float32", tol=args.tol,
                    tf32=bool(device.type == "cuda" and args.allow_tf32),
                    cudnn_benchmark=bool(args.cudnn_benchmark), threads=args.threads)
    _common.print_environment("HVP cost vs one gradient (trlib.curvature)", env, settings)
    results = []
    t_start = time.perf_counter()
    for name in networks:
        batch = args.mlp_batch if name == "mlp" else args.resnet_batch
        res = bench_network(name, batch, device, args)
        print_network(res)
        results.append(res)
    print(f"\nall HVP modes agree within tol={args.tol:.0e} (asserted); total wall time {time.perf_counter() - t_start:.0f} s")
    _common.write_json(args.json, {"benchmark": "bench_hvp", "environment": env, "settings": settings,
                                   "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
