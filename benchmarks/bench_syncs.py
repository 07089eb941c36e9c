r"""Host-device synchronisations per TR/ARC step, counted, with where they come from.

On a GPU every read of a device value by the host (``float(t)``, ``bool(t)``, ``t.item()``,
``.tolist()``, ``.cpu()``, ``.numpy()``, ``nonzero``) waits for the queue to drain: the device
idles while Python decides. This script counts those calls during whole ``step`` calls of
:class:`trlib.TrustRegion` and :class:`trlib.ARC` with a ``torch.overrides.TorchFunctionMode``
that sees every tensor method, so it runs on the CPU too (where the same calls would
synchronise on a GPU; a few of them read tensors that live on the host anyway, such as the
subproblem's random generator, so the count is an upper bound there). On CUDA it also
reports what ``torch.cuda.set_sync_debug_mode("warn")`` flags.

Setting: the Fashion-MNIST MLP (as :func:`trlib.models.build_model` builds it),
a random batch of 256 with Hessian-vector products on its first 32 (the runner's defaults), one
torch thread. Variants: TR-RMS with Steihaug CG (the default; CG's stopping test read once per
product, or once every 5 with ``check_every=5``), with GLTR, ARC-RMS (Lanczos), and TR-RMS with
GGN products. Per variant: synchronisations per step, products per step, and the call sites
(trlib function) that account for them.

Run: ``python benchmarks/bench_syncs.py [--steps 20] [--device cpu|cuda] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings
import weakref

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import _common
import trlib
from trlib.gauss_newton import ggn_operator
from trlib.models import build_model

SYNCING = {"__float__", "__bool__", "__int__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero", "__array__"}


class SyncCounter(TorchFunctionMode):
    """Counts the tensor calls that make the host wait for the device, by trlib call site.

    A value already copied to the host (the result of ``.cpu()``/``.numpy()``, and anything
    computed from it) is read for free: those reads are not counted."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()
        self.host = {}  # id -> weakref of tensors that live on the host after a copy

    def _on_host(self, t) -> bool:
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, out):
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor):
                self.host[id(t)] = weakref.ref(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(str(a) == "cpu" for a in list(args[1:]) + list(kwargs.values()))
        from_host = any(self._on_host(a) for a in args if isinstance(a, torch.Tensor))
        if (name in SYNCING or to_host) and not from_host:
            site = "outside trlib"
            for frame in reversed(traceback.extract_stack()[:-1]):
                path = frame.filename.replace("\\", "/")
                if "/trlib/" in path:
                    site = f"{path.split('/trlib/')[-1]}:{frame.name}"
                    break
            self.sites[site] += 1
        if name == "__iter__" and (from_host or name in SYNCING):
            out = list(out)
            self._mark(out)
            return iter(out)
        if from_host or name in ("cpu", "numpy") or to_host:
            self._mark(out)
        return out


VARIANTS = {
    "tr_rms cg": dict(cls="TrustRegion", method="cg"),
    "tr_rms cg check_every=5": dict(cls="TrustRegion", method="cg", check_every=5),
    "tr_rms gltr": dict(cls="TrustRegion", method="gltr"),
    "arc_rms lanczos": dict(cls="ARC", method="lanczos"),
    "tr_rms ggn": dict(cls="TrustRegion", method="cg", ggn=True),
}


def measure(name, spec, args, device):
    torch.manual_seed(0)
    model = build_model("fashion_mnist_mlp", (1, 28, 28), 10).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (256,), generator=g).to(device)
    spec = dict(spec)
    cls, ggn = getattr(trlib, spec.pop("cls")), spec.pop("ggn", False)
    opt = cls(model.parameters(), norm="rms", module=model, **spec)
    loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    extras = dict(curvature=lambda: ggn_operator(model, x[:32], y[:32]), hessian_fraction=0.125) if ggn else dict(
        hessian_closure=lambda: nn.functional.cross_entropy(model(x[:32]), y[:32]), hessian_fraction=0.125)
    for _ in range(2):  # the automatic first radius / sigma, out of the count
        opt.step(loss, **extras)
    counter, products, flagged = SyncCounter(), 0, 0
    for _ in range(args.steps):
        before = opt.counts["hvp"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            with counter:
                opt.step(loss, **extras)
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        flagged += sum("synchroniz" in str(w.message) for w in caught)
        products += round((opt.counts["hvp"] - before) / 0.125)
    total = sum(counter.sites.values())
    return dict(variant=name, syncs_per_step=total / args.steps, products_per_step=products / args.steps,
                cuda_flagged_per_step=flagged / args.steps if device.type == "cuda" else None,
                sites={k: v / args.steps for k, v in counter.sites.most_common()})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    _common.set_threads(args.threads)
    device = _common.resolve_device(args.device)
    print(f"device: {_common.device_name(device)}, torch {torch.__version__}, {args.steps} steps per variant")
    rows = [measure(name, VARIANTS[name], args, device) for name in args.variants]
    print(f"{'variant':<26} {'syncs/step':>10} {'products/step':>13} {'syncs/product':>13}"
          + ("  cuda-flagged/step" if device.type == "cuda" else ""))
    for r in rows:
        extra = f"  {r['cuda_flagged_per_step']:>17.1f}" if r["cuda_flagged_per_step"] is not None else ""
        print(f"{r['variant']:<26} {r['syncs_per_step']:>10.1f} {r['products_per_step']:>13.1f} "
              f"{r['syncs_per_step'] / max(r['products_per_step'], 1e-9):>13.2f}{extra}")
    for r in rows:
        print(f"\n{r['variant']}: where the synchronisations come from (per step)")
        for site, n in r["sites"].items():
            print(f"  {n:6.1f}  {site}")
    _common.write_json(args.json, dict(environment=_common.environment(device), steps=args.steps, rows=rows))


if __name__ == "__main__":
    main()
