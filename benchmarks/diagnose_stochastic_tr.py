"""Diagnose the stochastic trust region: per-step measurements that a training curve hides.

A TR step is accepted when the ratio rho of actual to predicted decrease, measured on the
step's *own* mini-batch, is at least eta1. That batch also chose the step, so rho is biased
upwards: a step can fit the batch's noise, be accepted, and raise the full loss. This script
trains ``--method`` on ``--task`` with the runner's configuration and, for every step,
measures what the optimizer cannot see (forward passes only; they change nothing the run does):

* ``rho`` on the own batch (from ``opt.last``), ``rho_ind`` with the actual decrease on an
  independent batch of the same size, ``rho_probe`` on a fixed probe subset of the
  training set (``--probe`` samples, a proxy for the full loss), all over the same model
  decrease;
* the step's length in the region's norm against the radius, and in the Euclidean norm;
* Krylov products, boundary and negative-curvature flags, acceptance;
* every ``--noise-every`` steps, the gradient noise from ``--groups`` equal micro-batches:
  the norm test's ratio ``noise = E||g_B - grad L||^2 / ||g_B||^2`` (Byrd, Chin, Nocedal &
  Wu 2012; a step direction is reliable while it is well below 1) and the inner-product
  test's (Bollapragada, Byrd & Nocedal 2018);
* at every epoch end, the full training loss and accuracy and the batch size (grown as the
  runner grows it: by ``batch_growth`` when the full loss did not decrease).

It prints one summary row per epoch and, with ``--jsonl PATH``, writes every step.
It uses only the public API (``trlib.TrustRegion``, ``trlib.experiments``, ``trlib.models``).

Usage (real Fashion-MNIST, TR-RMS with the library's defaults, 3 epochs; ~1-2 min on one core)::

    python benchmarks/diagnose_stochastic_tr.py --task fashion_mnist_mlp --method tr_rms --epochs 3
    python benchmarks/diagnose_stochastic_tr.py --preset paper --epochs 3     # the authors' settings
    python benchmarks/diagnose_stochastic_tr.py --set hessian_batch=1.0 beta=0.99 --accept independent
    python benchmarks/diagnose_stochastic_tr.py --opt max_krylov=10 --jsonl steps.jsonl

``--preset`` and ``--set`` choose the runner's configuration (``python -m trlib.experiments
config``), whose ``hessian_batch`` and ``acceptance`` the steps use unless ``--hessian-batch``
or ``--accept`` say otherwise; ``--opt`` passes extra keyword arguments to ``TrustRegion``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import trlib  # noqa: E402
from trlib.experiments import Objective, evaluate, get_config, load_data, parse_overrides  # noqa: E402
from trlib.models import build_model, get_task  # noqa: E402

_CONFIG_KWARGS = {  # runner config key -> TrustRegion keyword
    "norm": "norm", "radius": "radius", "max_radius": "max_radius", "eta1": "eta1", "eta2": "eta2",
    "increase": "increase", "decrease": "decrease", "subproblem": "method", "krylov_tol": "krylov_tol",
    "max_krylov": "max_krylov", "beta": "beta", "eps": "eps",
}


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def gradient_noise(model, objective, x, target, groups: int, ellipsoid=None):
    """Norm-test and inner-product-test ratios of the batch gradient, from ``groups`` equal
    micro-batches (the sample variance of their gradients, scaled to the batch mean);
    ``noise_A``: the norm test in the region's variables (gradients scaled by ``a^{-1/2}``),
    the metric in which the subproblem is solved."""
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = [c for c in torch.arange(len(x)).chunk(groups) if len(c)]
    grads = []
    for c in chunks:
        loss = objective(model(x[c]), target[c])
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    grads = torch.stack(grads)
    mean = grads.mean(0)
    k = len(grads)
    var_of_mean = float((grads - mean).pow(2).sum()) / (k - 1) / k  # E||g_B - grad L||^2
    g2 = float(mean.pow(2).sum())
    inner = grads @ mean
    var_inner = float(inner.var()) / k if k > 1 else math.nan  # Var(g_B^T grad L), approx.
    w = 1.0 / ellipsoid if ellipsoid is not None else torch.ones_like(mean)
    noise_a = float(((grads - mean).pow(2) * w).sum()) / (k - 1) / k / float((mean.pow(2) * w).sum())
    return dict(noise=var_of_mean / g2 if g2 > 0 else math.inf, noise_A=noise_a,
                inner_noise=var_inner / g2**2 if g2 > 0 else math.inf,
                grad_sq=g2, true_grad_sq=max(g2 - var_of_mean, 0.0))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="fashion_mnist_mlp")
    p.add_argument("--method", default="tr_rms", choices=sorted(trlib.experiments.TR_METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--data", default="real", choices=("auto", "real", "stand-in"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--preset", default=None, choices=sorted(trlib.experiments.PRESETS),
                   help="a preset of the runner's configuration (paper: the authors' settings)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="runner configuration overrides")
    p.add_argument("--opt", nargs="*", default=[], metavar="KEY=VALUE", help="extra TrustRegion keywords")
    p.add_argument("--accept", default=None, choices=("own", "independent"),
                   help="ratio test on the step's batch (the paper) or on an independent batch of the same "
                        "size (default: the configuration's acceptance)")
    p.add_argument("--hessian-batch", type=float, default=None,
                   help="Hessian-vector products on this fraction of the batch (default: the configuration's "
                        "hessian_batch)")
    p.add_argument("--probe", type=int, default=10000, help="probe subset of the training set (forward only)")
    p.add_argument("--groups", type=int, default=16, help="micro-batches for the gradient-noise estimate")
    p.add_argument("--noise-every", type=int, default=5, help="estimate the noise every this many steps (0: never)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jsonl", default=None, help="write every step's record here")
    args = p.parse_args(argv)

    _common.set_threads(args.threads)
    overrides = parse_overrides(args.set)
    extra = parse_overrides(args.opt)
    tr_keys = {k: v for k, v in overrides.items() if k in ("beta", "eps")}  # TrustRegion-only keys
    cfg = get_config(args.task, args.method, preset=args.preset,
                     **{k: v for k, v in overrides.items() if k not in tr_keys})
    args.accept = args.accept or cfg["acceptance"]
    if args.hessian_batch is None:
        args.hessian_batch = cfg["hessian_batch"]
    if cfg.get("warmup_epochs", 0):
        raise SystemExit("this script diagnoses the TR phase only: pass --set warmup_epochs=0 "
                         "(or extend it with the warm-up)")
    train, test = load_data(args.task, args.data, root=args.data_root, verbose=True)
    n = len(train)
    torch.manual_seed(args.seed)
    model = build_model(args.task, dataset=train)
    model.train()
    objective = Objective(get_task(args.task).loss, model, cfg["l2"])
    params = [q for q in model.parameters() if q.requires_grad]
    kwargs = {kw: cfg[key] for key, kw in _CONFIG_KWARGS.items() if key in cfg}
    kwargs.update(tr_keys)
    kwargs.update(extra)
    opt = trlib.TrustRegion(params, module=model, seed=args.seed, **kwargs)

    env = _common.environment(torch.device("cpu"))
    settings = dict(task=args.task, tr=args.method, seed=args.seed, epochs=args.epochs, preset=args.preset,
                    hessian_batch=args.hessian_batch, accept=args.accept,
                    dataset=train.display_name, **{k: kwargs[k] for k in sorted(kwargs)},
                    batch=cfg["batch_size"], growth=cfg["batch_growth"], cap=cfg["batch_cap"])
    _common.print_environment("Stochastic TR diagnostics", env, settings)

    gen = torch.Generator().manual_seed(args.seed)       # data order, as the runner's
    side = torch.Generator().manual_seed(10_000 + args.seed)  # independent batches and probe
    probe_idx = torch.randperm(n, generator=side)[:min(args.probe, n)]
    px, pt = train.x[probe_idx], objective.target(train.x[probe_idx], train.y[probe_idx])

    def loss_at(x, t):
        with torch.no_grad():
            return float(objective(model(x), t))

    batch = min(cfg["batch_size"], n)
    check_loss = evaluate(model, objective, train)[0]
    records, samples, steps, spent_seconds, passes = [], 0, 0, 0.0, 0.0
    out = open(args.jsonl, "w") if args.jsonl else None
    header = ("epoch", "steps", "backprops", "passes", "seconds", "full loss", "acc", "batch", "accept", "rho own", "rho ind",
              "rho probe", "acc.&probe up", "|s|/radius", "on bdry", "neg curv", "Krylov", "noise", "noise_A", "radius")
    rows = []
    target_samples = math.ceil(args.epochs * n - 1e-9)
    epoch = 0
    while samples < target_samples:
        order = torch.randperm(n, generator=gen)
        position = 0
        while position < n and samples < target_samples:
            idx = order[position:position + batch]
            xb = train.x[idx]
            tb = objective.target(xb, train.y[idx])
            ind = torch.randint(0, n, (len(idx),), generator=side)
            xi, ti = train.x[ind], objective.target(train.x[ind], train.y[ind])
            step_kwargs = {}
            h = args.hessian_batch  # a fraction, or (an int from the configuration) a number of samples
            m = min(int(h), len(idx)) if h > 1 else max(1, round(h * len(idx)))
            if m < len(idx):  # the batch is in random order: its head is a random sub-batch
                xh, th = xb[:m], tb[:m]
                step_kwargs.update(hessian_closure=lambda: objective(model(xh), th), hessian_fraction=m / len(idx))
            if args.accept == "independent":  # its own batch: rho_ind stays an unselected measurement
                acc = torch.randint(0, n, (len(idx),), generator=side)
                xa, ta = train.x[acc], objective.target(train.x[acc], train.y[acc])
                step_kwargs["test_closure"] = lambda: (trial_point(), objective(model(xa), ta))[1]
            rec = dict(step=steps, epoch=samples / n, batch=len(idx))
            if args.noise_every and steps % args.noise_every == 0:
                rec.update(gradient_noise(model, objective, xb, tb, args.groups, opt.ellipsoid))
            seen = {}

            def trial_point():
                seen["calls"] = seen.get("calls", 0) + 1
                if seen["calls"] == 2 and "trial" not in seen:  # the test closure's second call: at w_t + s_t
                    seen["trial"] = True
                    seen["s"] = _flat(params) - seen["w"]
                    seen["ind_after"], seen["probe_after"] = loss_at(xi, ti), loss_at(px, pt)

            def closure():
                if torch.is_grad_enabled() and "w" not in seen:  # the evaluation at w_t
                    seen["w"] = _flat(params)
                    seen["ind"], seen["probe"] = loss_at(xi, ti), loss_at(px, pt)
                elif not torch.is_grad_enabled() and "w" in seen and "trial" not in seen:  # at w_t + s_t
                    seen["trial"] = True
                    seen["s"] = _flat(params) - seen["w"]
                    seen["ind_after"], seen["probe_after"] = loss_at(xi, ti), loss_at(px, pt)
                return objective(model(xb), tb)

            before = opt.backprops
            t0 = time.perf_counter()
            opt.step(closure, **step_kwargs)
            spent_seconds += time.perf_counter() - t0
            passes += len(idx) * (opt.backprops - before) / n  # samples through gradient and product passes
            last = opt.last
            dm = last["model_decrease"]
            a = opt.ellipsoid
            s = seen.get("s")
            rec.update(data_passes=passes, seconds=spent_seconds, backprops=opt.backprops, step_backprops=opt.backprops - before, radius=last["radius"],
                       rho=last["rho"], accepted=last["accepted"], model_decrease=dm, krylov=last["iterations"],
                       on_boundary=last["on_boundary"], negative_curvature=last["negative_curvature"],
                       loss=last["loss"], trial_loss=last["trial_loss"], grad_norm=last["grad_norm"],
                       est_noise=last.get("noise"))
            if s is not None:
                ind_dec, probe_dec = seen["ind"] - seen["ind_after"], seen["probe"] - seen["probe_after"]
                rec.update(ind_decrease=ind_dec, probe_decrease=probe_dec,
                           rho_ind=ind_dec / dm if dm > 0 else math.nan,
                           rho_probe=probe_dec / dm if dm > 0 else math.nan,
                           step_norm=float(trlib.ellipsoid_norm(s, a)), step_norm2=float(s.norm()),
                           step_max=float(s.abs().max()))
                if a is not None:
                    rec.update(ellipsoid_min=float(a.min()), ellipsoid_median=float(a.median()),
                               ellipsoid_max=float(a.max()), mu=trlib.equivalence_constant(a))
            records.append(rec)
            if out:
                out.write(json.dumps(rec) + "\n")
            steps += 1
            samples += len(idx)
            position += len(idx)
        # the end of an epoch (or of the budget): full loss and the runner's batch rule
        epoch += 1
        full_loss, full_acc = evaluate(model, objective, train)
        if position >= n:
            if not full_loss < check_loss:
                cap = max(batch, int(cfg["batch_cap"] * n))
                batch = min(math.ceil(batch * cfg["batch_growth"]), cap, n)
            check_loss = full_loss
        ep = [r for r in records if r["epoch"] >= epoch - 1 and r["epoch"] < epoch]
        rows.append(_summary_row(samples / n, steps, opt.backprops, passes, spent_seconds, full_loss, full_acc, batch, ep, opt.radius))
        print(_common.format_table(header, rows[-1:]) if len(rows) == 1 else
              _common.format_table(header, rows[-1:]).splitlines()[-1], flush=True)
    if out:
        out.close()
    print()
    print(_common.format_table(header, rows))
    everything = _summary_row(samples / n, steps, opt.backprops, passes, spent_seconds, *evaluate(model, objective, train), batch, records,
                              opt.radius)
    print(f"\nall steps: accepted {everything[8]}, accepted steps that raised the probe loss "
          f"{everything[12]}, median |s|/radius {everything[13]}, Krylov products per step {everything[16]}, "
          f"TR time {spent_seconds:.1f} s (diagnostics excluded)")
    _correlations(records)


def _median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def _summary_row(epoch, steps, backprops, passes, seconds, loss, acc, batch, recs, radius):
    stepped = [r for r in recs if "rho_probe" in r]
    accepted = [r for r in stepped if r["accepted"]]
    up = sum(1 for r in accepted if r["probe_decrease"] < 0)
    return (f"{epoch:.2f}", steps, f"{backprops:.0f}", f"{passes:.1f}", f"{seconds:.0f}", f"{loss:.4f}", "-" if acc is None else f"{acc:.3f}", batch,
            f"{len(accepted) / max(len(recs), 1):.2f}",
            f"{_median(r['rho'] for r in stepped):.2f}", f"{_median(r['rho_ind'] for r in stepped):.2f}",
            f"{_median(r['rho_probe'] for r in stepped):.2f}", f"{up / max(len(accepted), 1):.2f}",
            f"{_median(r['step_norm'] / r['radius'] for r in stepped):.2f}",
            f"{sum(r['on_boundary'] for r in recs) / max(len(recs), 1):.2f}",
            f"{sum(r['negative_curvature'] for r in recs) / max(len(recs), 1):.2f}",
            f"{sum(r['krylov'] for r in recs) / max(len(recs), 1):.1f}",
            f"{_median(r.get('noise') for r in recs):.2f}", f"{_median(r.get('noise_A') for r in recs):.2f}",
            f"{radius:.3g}")


def _correlations(records):
    """What predicts a step that raises the probe loss? Rank correlations, printed."""
    stepped = [r for r in records if "rho_probe" in r and math.isfinite(r["rho_probe"])]
    if len(stepped) < 10:
        return
    from scipy.stats import spearmanr

    probe = [r["probe_decrease"] for r in stepped]
    for key in ("rho", "rho_ind", "step_norm", "step_norm2", "radius", "krylov", "model_decrease"):
        xs = [r[key] for r in stepped]
        if all(math.isfinite(x) for x in xs):
            print(f"  Spearman(probe decrease, {key}) = {spearmanr(xs, probe)[0]:+.2f}")
    acc = [r for r in stepped if r["accepted"]]
    rej_ind = [r for r in acc if r["ind_decrease"] < 0]
    both = [r for r in rej_ind if r["probe_decrease"] < 0]
    print(f"  accepted steps: {len(acc)}; of these the independent batch's loss rose in {len(rej_ind)} "
          f"({len(both)} of which also raised the probe loss); the probe loss rose in "
          f"{sum(r['probe_decrease'] < 0 for r in acc)}; summed probe change of accepted steps: "
          f"{-sum(r['probe_decrease'] for r in acc):+.3f}, of those with rho_ind < eta1-ish (0): "
          f"{-sum(r['probe_decrease'] for r in rej_ind):+.3f}")


if __name__ == "__main__":
    main()
