"""TrustRegion in torch training stacks: random layers, p.grad, parameter groups, BatchNorm without
module=, learning-rate schedulers, and the contracts it refuses with a clear error."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import trlib
from trlib import optim as trlib_optim
from reference import tr_reference


def _data(n=128, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g, dtype=dtype)
    y = (x[:, :3] @ torch.randn(3, 3, generator=g, dtype=dtype)).argmax(1)
    return x, y


def _mlp(seed=0, dropout=0.0, bn=False, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [nn.Linear(10, 32)] + ([nn.BatchNorm1d(32)] if bn else []) + [nn.Tanh()]
    layers += ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(32, 3)]
    return nn.Sequential(*layers).to(dtype)


def _loss(model, x, y):
    return lambda: nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def _value(model, x, y) -> float:
    return float(nn.functional.cross_entropy(model(x), y))


# ---------------------------------------------------------------------------- random layers
def _dropout_run(steps=40):
    model, (x, y) = _mlp(dropout=0.2), _data()
    opt = trlib.TrustRegion(model.parameters(), norm="rms")
    accepted = 0
    for _ in range(steps):
        opt.step(_loss(model, x, y))
        accepted += opt.last["accepted"]
    return accepted


def test_a_dropout_mlp_accepts_most_steps_because_the_trial_sees_the_same_masks(monkeypatch):
    accepted = _dropout_run()
    assert accepted >= 0.8 * 40
    # The same run with a fresh mask at the trial point (what a plain second call does): rho
    # compares two different functions and most of the progress is rejected.
    monkeypatch.setattr(trlib_optim._ReplayedRandomness, "again", lambda self, fn: fn())
    assert _dropout_run() < 0.8 * 40


def test_every_call_of_a_step_sees_the_first_calls_random_state_and_the_stream_advances_once():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    draws = []

    def closure():
        noise = torch.rand(3, dtype=torch.float64)
        draws.append(noise)
        return ((w - noise) ** 2).sum()

    opt = trlib.TrustRegion([w], norm="uniform")
    torch.manual_seed(5)
    for _ in range(3):
        opt.step(closure)
    after = torch.get_rng_state()
    assert len(draws) == 6  # a gradient call and a trial call per step
    for k in range(3):
        assert torch.equal(draws[2 * k], draws[2 * k + 1])
    torch.manual_seed(5)
    expected = [torch.rand(3, dtype=torch.float64) for _ in range(3)]  # one draw per step
    assert all(torch.equal(a, b) for a, b in zip(expected, draws[::2]))
    assert torch.equal(after, torch.get_rng_state())


def test_forward_over_reverse_products_see_the_same_masks():
    # With a fresh mask per product the operator would not even be symmetric; with the replay it is
    # the Hessian of the first call's function, the same as double backward's.
    model, (x, y) = _mlp(dropout=0.3, dtype=torch.float64), _data(dtype=torch.float64)
    model2 = copy.deepcopy(model)
    a = trlib.TrustRegion(model.parameters(), module=model)
    b = trlib.TrustRegion(model2.parameters(), module=model2, hvp="forward_over_reverse")
    for opt, m in ((a, model), (b, model2)):
        torch.manual_seed(3)
        for _ in range(4):
            opt.step(_loss(m, x, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)
    assert a.counts == b.counts


def test_a_resumed_dropout_run_continues_bit_for_bit():
    model, (x, y) = _mlp(dropout=0.2), _data()
    opt = trlib.TrustRegion(model.parameters(), norm="rms")
    torch.manual_seed(1)
    for _ in range(3):
        opt.step(_loss(model, x, y))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), torch.get_rng_state()))
    for _ in range(4):
        opt.step(_loss(model, x, y))
    model2 = _mlp(seed=9, dropout=0.2)
    model2.load_state_dict(saved[0])
    opt2 = trlib.TrustRegion(model2.parameters(), norm="rms")
    opt2.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    for _ in range(4):
        opt2.step(_loss(model2, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


# ---------------------------------------------------------------------------- p.grad
def test_p_grad_is_the_gradient_of_the_returned_loss_at_the_starting_point():
    model, (x, y) = _mlp(dtype=torch.float64), _data(dtype=torch.float64)
    opt = trlib.TrustRegion(model.parameters(), norm="rms")
    for _ in range(2):
        before = copy.deepcopy(model)
        loss = opt.step(_loss(model, x, y))
        reference = nn.functional.cross_entropy(before(x), y)
        reference.backward()
        assert float(loss) == float(reference)
        for p, q in zip(model.parameters(), before.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # what gradient logging reads
    assert float(norm) == pytest.approx(opt.last["grad_norm"], rel=1e-10)


def test_p_grad_is_overwritten_not_accumulated_and_frozen_parameters_keep_none():
    model, (x, y) = _mlp(), _data()
    model[0].bias.requires_grad_(False)
    opt = trlib.TrustRegion(model.parameters())
    opt.step(_loss(model, x, y))
    first = model[2].weight.grad.clone()
    model[2].weight.grad.mul_(1000.0)  # stale garbage must not leak into the next value
    before = copy.deepcopy(model)
    opt.step(_loss(model, x, y))
    nn.functional.cross_entropy(before(x), y).backward()
    torch.testing.assert_close(model[2].weight.grad, before[2].weight.grad)
    assert not torch.equal(model[2].weight.grad, first) and model[0].bias.grad is None


# ---------------------------------------------------------------------------- BatchNorm without module=
def test_batchnorm_running_stats_move_once_per_step_without_module():
    model, (x, y) = _mlp(bn=True), _data()
    reference = copy.deepcopy(model)
    opt = trlib.TrustRegion(model.parameters())  # no module=: found by a forward hook
    opt.step(_loss(model, x, y))
    reference(x)  # one forward at the same starting weights
    bn, ref = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1 and bn.track_running_stats
    # the trial point was evaluated with batch statistics, as the gradient was
    assert opt.last["accepted"]
    assert opt.last["trial_loss"] == _value(copy.deepcopy(model), x, y)


# ---------------------------------------------------------------------------- radius cap
def test_lowering_max_radius_caps_the_radius_in_use_and_the_reported_one():
    model, (x, y) = _mlp(), _data()
    opt = trlib.TrustRegion(model.parameters(), norm="uniform", radius=0.5, eta1=0.0, eta2=0.0, increase=2.0)
    opt.step(_loss(model, x, y))
    assert opt.radius == pytest.approx(1.0)
    opt.param_groups[0]["max_radius"] = 0.25
    assert opt.radius == 0.25
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt.step(_loss(model, x, y))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert opt.last["radius"] == 0.25 and float((after - before).norm()) <= 0.25 * (1 + 1e-6)


# ---------------------------------------------------------------------------- parameter groups
def _quadratic(seed=7, n=6):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    H = (q * np.linspace(-1.0, 3.0, n)) @ q.T
    return H, rng.standard_normal(n)


def test_lr_is_a_multiplier_on_the_region_per_group():
    # ||D^{-1} s|| <= radius with D = diag(lr): in u = D^{-1} s the subproblem of D H D, D c.
    H, c = _quadratic()
    Ht, ct = torch.tensor(H), torch.tensor(c)
    w1 = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    w2 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = trlib.TrustRegion([{"params": [w1], "lr": 1.0}, {"params": [w2], "lr": 0.25}], norm="uniform",
                            radius=0.3, method="exact")
    opt.step(lambda: ct @ torch.cat([w1, w2]) + 0.5 * torch.cat([w1, w2]) @ Ht @ torch.cat([w1, w2]))
    d = np.array([1.0] * 4 + [0.25] * 2)
    u, _ = tr_reference(d[:, None] * H * d[None, :], d * c, 0.3)
    np.testing.assert_allclose(torch.cat([w1, w2]).detach().numpy(), d * u, rtol=1e-8, atol=1e-10)
    assert opt.last["radius"] == 0.3 and opt.last["accepted"]


def test_one_lr_for_all_groups_scales_the_step_and_the_cap():
    H, c = _quadratic(n=4)
    Ht, ct = torch.tensor(H), torch.tensor(c)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = trlib.TrustRegion([w], norm="uniform", radius=0.4, method="exact", lr=0.5)
    opt.step(lambda: ct @ w + 0.5 * w @ Ht @ w)
    s_ref, _ = tr_reference(H, c, 0.5 * 0.4)
    np.testing.assert_allclose(w.detach().numpy(), s_ref, rtol=1e-8, atol=1e-10)


def test_a_group_with_lr_zero_is_frozen_and_the_rest_trains_as_alone():
    x, y = _data(dtype=torch.float64)
    alone, grouped = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)
    frozen_before = [p.detach().clone() for p in grouped[0].parameters()]
    a = trlib.TrustRegion(alone[2].parameters(), norm="rms")
    alone[0].requires_grad_(False)
    b = trlib.TrustRegion([{"params": grouped[0].parameters(), "lr": 0.0},
                           {"params": grouped[2].parameters()}], norm="rms")
    for _ in range(5):
        a.step(_loss(alone, x, y))
        b.step(_loss(grouped, x, y))
    assert all(torch.equal(p, q) for p, q in zip(grouped[0].parameters(), frozen_before))
    for p, q in zip(alone[2].parameters(), grouped[2].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert a.counts == b.counts
    assert grouped[0].weight.grad is not None  # the gradient is still reported


def test_every_lr_zero_moves_nothing():
    model, (x, y) = _mlp(), _data()
    opt = trlib.TrustRegion(model.parameters(), lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(_loss(model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert float(loss) == pytest.approx(_value(model, x, y)) and opt.last["status"] == "lr is 0"


def test_weight_decay_per_group_is_the_l2_term_in_the_objective():
    x, y = _data(dtype=torch.float64)
    m1, m2 = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)
    a = trlib.TrustRegion([{"params": m1[0].parameters(), "weight_decay": 0.1}, {"params": m1[2].parameters()}])
    b = trlib.TrustRegion(m2.parameters())

    def explicit():
        return nn.functional.cross_entropy(m2(x), y) + 0.05 * sum((p * p).sum() for p in m2[0].parameters())

    for _ in range(5):
        before = copy.deepcopy(m1)
        returned = a.step(_loss(m1, x, y))
        b.step(explicit)
        assert float(returned) == pytest.approx(_value(before, x, y), rel=1e-12)  # the closure's loss
        assert a.last["loss"] == pytest.approx(b.last["loss"], rel=1e-12)  # the objective's
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    # p.grad is the closure's gradient (torch's convention), without the decay term
    reference = copy.deepcopy(before)
    nn.functional.cross_entropy(reference(x), y).backward()
    torch.testing.assert_close(m1[0].weight.grad, reference[0].weight.grad)


def test_add_param_group_after_steps_trains_the_new_group():
    # Sphere (no per-coordinate state): a group added after 3 steps trains exactly as one that was
    # there from the start with lr 0 until then.
    x, y = _data(dtype=torch.float64)
    m1, m2 = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)
    a = trlib.TrustRegion(m1[2].parameters(), norm="uniform")
    b = trlib.TrustRegion([{"params": m2[2].parameters()}, {"params": m2[0].parameters(), "lr": 0.0}],
                          norm="uniform")
    for _ in range(3):
        a.step(_loss(m1, x, y))
        b.step(_loss(m2, x, y))
    start = m1[0].weight.detach().clone()
    a.add_param_group({"params": m1[0].parameters()})
    b.param_groups[1]["lr"] = 1.0
    for _ in range(3):
        a.step(_loss(m1, x, y))
        b.step(_loss(m2, x, y))
    assert not torch.equal(m1[0].weight, start)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_add_param_group_extends_the_norms_state_and_round_trips():
    model, (x, y) = _mlp(), _data()
    opt = trlib.TrustRegion(model[2].parameters(), norm="adam")
    opt.step(_loss(model, x, y))
    kept = opt.state_dict()["state"][0]["norm_state"]["square_avg"].clone()
    opt.add_param_group({"params": model[0].parameters(), "weight_decay": 1e-3})
    start = model[0].weight.detach().clone()
    before = copy.deepcopy(model[0])
    opt.step(_loss(model, x, y))
    assert opt.ellipsoid.shape == (sum(p.numel() for p in model.parameters()),)
    assert not torch.equal(model[0].weight, start)
    state = opt.state_dict()
    square = state["state"][0]["norm_state"]["square_avg"]
    # the old coordinates continue their average; the new ones start from zero (beta = 0.8)
    old = torch.cat([p.grad.reshape(-1) for p in model[2].parameters()])
    new = torch.cat([(q.grad + 1e-3 * p).reshape(-1) for p, q in zip(before.parameters(), model[0].parameters())])
    torch.testing.assert_close(square, torch.cat([0.8 * kept + 0.2 * old * old, 0.2 * new * new]))
    again = trlib.TrustRegion([{"params": model[2].parameters()}, {"params": model[0].parameters(),
                                                                    "weight_decay": 1e-3}], norm="adam")
    again.load_state_dict(state)
    assert again.param_groups[1]["weight_decay"] == 1e-3


@pytest.mark.parametrize("group, match", [
    (lambda m: {"params": m[2].parameters(), "eta1": 0.5}, "eta1=0.5 differs"),
    (lambda m: {"params": m[2].parameters(), "lr": -1.0}, "lr"),
    (lambda m: {"params": m[2].parameters(), "weight_decay": math.nan}, "weight_decay"),
    (lambda m: {"params": [m[2].weight, m[2].weight]}, "more than once"),
    (lambda m: {"params": [m[0].weight]}, "more than one parameter group"),
    (lambda m: {"params": [m[2].weight.detach().half().requires_grad_()]}, "float16"),
    (lambda m: {"params": []}, "no parameters"),
])
def test_add_param_group_refuses_what_one_trust_region_cannot_do(group, match):
    model = _mlp()
    opt = trlib.TrustRegion(model[0].parameters())
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(group(model))
    assert len(opt.param_groups) == 1  # nothing half-added


# ---------------------------------------------------------------------------- what it refuses, clearly
def test_a_closure_that_calls_backward_is_refused_before_anything_moves():
    model, (x, y) = _mlp(), _data()
    opt = trlib.TrustRegion(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]

    def lbfgs_style():
        opt.zero_grad()
        loss = _loss(model, x, y)()
        loss.backward()
        return loss

    def lightning_automatic():  # backward inside, the loss handed back detached
        loss = _loss(model, x, y)()
        loss.backward()
        return loss.detach()

    for closure in (lbfgs_style, lightning_automatic):
        with pytest.raises(ValueError, match=r"called backward\(\).*manual optimisation"):
            opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and opt.counts["gradient"] == 0


def test_meta_parameters_are_refused_at_construction():
    with torch.device("meta"):
        model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        trlib.TrustRegion(model.parameters())


def test_parameters_changed_after_construction_are_refused_at_the_step():
    model, (x, y) = _mlp(), _data()
    opt = trlib.TrustRegion(model.parameters())
    model[2].double()
    with pytest.raises(ValueError, match=r"mix \['torch.float32 on cpu', 'torch.float64 on cpu'\]"):
        opt.step(_loss(model, x, y))
    model.half()
    with pytest.raises(ValueError, match="float16 at this step"):
        opt.step(lambda: nn.functional.cross_entropy(model(x.half()), y))


def test_a_half_precision_loss_is_refused():
    w = torch.ones(3, requires_grad=True)
    opt = trlib.TrustRegion([w])
    with pytest.raises(ValueError, match="the loss is torch.bfloat16; compute it in float32"):
        opt.step(lambda: (w.bfloat16() ** 2).sum())


def test_grad_scaler_is_refused_with_what_to_do_instead():
    model, (x, y) = _mlp(), _data()
    opt = trlib.TrustRegion(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model, x, y)()).backward()  # the first-order AMP pattern
    with pytest.raises(ValueError, match="GradScaler.*opt.step\\(closure\\) directly.*autocast"):
        scaler.step(opt)
    with pytest.raises(ValueError, match="GradScaler"):
        scaler.step(opt, _loss(model, x, y))
    opt.step(_loss(model, x, y))  # the optimizer itself is unharmed
    assert opt.counts["gradient"] == 1


def test_double_backward_through_torch_compile_points_to_forward_over_reverse():
    # aot_eager runs the same aot_autograd as the default inductor backend (that fails the same way,
    # after a minute of compilation on a CPU), and the advised mode works.
    torch._dynamo.reset()
    model, (x, y) = _mlp(), _data()
    compiled = torch.compile(model, backend="aot_eager")
    before = [p.detach().clone() for p in model.parameters()]
    opt = trlib.TrustRegion(compiled.parameters())
    with pytest.raises(ValueError, match="torch.compile.*hvp='forward_over_reverse'"):
        opt.step(_loss(compiled, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt = trlib.TrustRegion(compiled.parameters(), module=compiled, hvp="forward_over_reverse")
    start = _value(model, x, y)
    for _ in range(5):
        opt.step(_loss(compiled, x, y))
    assert _value(model, x, y) < start
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_mixed_devices_are_refused_at_the_step():
    model, (x, y) = _mlp(), _data()
    opt = trlib.TrustRegion(model.parameters())
    model[0].cuda()
    with pytest.raises(ValueError, match="mix .*cpu.*cuda"):
        opt.step(lambda: nn.functional.cross_entropy(model[2](model[1](model[0](x.cuda())).cpu()), y))


@cuda
def test_cuda_dropout_masks_are_replayed_and_a_model_moved_after_the_first_step_keeps_its_state():
    model, (x, y) = _mlp(dropout=0.2), _data()
    opt = trlib.TrustRegion(model.parameters(), norm="rms")
    opt.step(_loss(model, x, y))
    model.cuda()
    x, y = x.cuda(), y.cuda()
    draws = []

    def closure():
        draws.append(torch.rand(2, device="cuda"))
        return _loss(model, x, y)()

    accepted = 0
    for _ in range(20):
        opt.step(closure)
        accepted += opt.last["accepted"]
    assert all(torch.equal(a, b) for a, b in zip(draws[::2], draws[1::2]))
    assert accepted >= 16 and opt.ellipsoid.device.type == "cuda"


# ---------------------------------------------------------------------------- learning-rate schedulers
def _saddle_problem():
    """An indefinite quadratic: the exact step always lies on the boundary, ||s|| = lr * radius."""
    H, c = _quadratic(n=5)
    Ht, ct = torch.tensor(H), torch.tensor(c)
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    return w, lambda: ct @ w + 0.5 * w @ Ht @ w


def _step_length(opt, w, closure):
    before = w.detach().clone()
    opt.step(closure)
    return float((w.detach() - before).norm())


def test_step_lr_schedules_the_region():
    w, f = _saddle_problem()
    opt = trlib.TrustRegion([w], norm="uniform", radius=0.1, method="exact", max_radius=100.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    lrs = []
    for _ in range(9):
        lr = opt.param_groups[0]["lr"]
        assert _step_length(opt, w, f) == pytest.approx(lr * opt.last["radius"], rel=1e-9)
        assert opt.last["accepted"]
        lrs.append(lr)
        scheduler.step()
    assert lrs == [1.0] * 3 + [0.5] * 3 + [0.25] * 3
    # the radius itself keeps its own rule (grown by `increase` after each very successful step)
    assert opt.radius == pytest.approx(0.1 * 1.1 ** 9)
    # the scheduler's and the optimizer's checkpoints round-trip together
    w2, _ = _saddle_problem()
    opt2 = trlib.TrustRegion([w2], norm="uniform", radius=0.1, method="exact", max_radius=100.0)
    scheduler2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
    opt2.load_state_dict(opt.state_dict())
    scheduler2.load_state_dict(scheduler.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.125


def test_reduce_lr_on_plateau_shrinks_the_region():
    w, f = _saddle_problem()
    opt = trlib.TrustRegion([w], norm="uniform", radius=0.1, method="exact", max_radius=100.0, increase=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    lengths = []
    for _ in range(4):
        lengths.append(_step_length(opt, w, f))
        scheduler.step(1.0)  # a metric that never improves after the first
    np.testing.assert_allclose(lengths, [0.1, 0.1, 0.05, 0.025], rtol=1e-9)


def test_a_warm_up_from_zero_starts_with_a_step_that_moves_nothing():
    model, (x, y) = _mlp(), _data()
    opt = trlib.TrustRegion(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, k / 3))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_loss(model, x, y))
    assert opt.last["status"] == "lr is 0" and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for _ in range(4):
        scheduler.step()
        opt.step(_loss(model, x, y))
    assert opt.param_groups[0]["lr"] == 1.0 and _value(model, x, y) < opt.last["loss"]


def test_help_states_the_closure_contract():
    import pydoc

    text = pydoc.render_doc(trlib.TrustRegion.step, renderer=pydoc.plaintext)
    assert "optional for most optimizers" not in text
    for words in ("closure: required", "must **not** call ``backward()``", "the *same*", "random state",
                  "BatchNorm", "``.grad``"):
        assert words in text, words
