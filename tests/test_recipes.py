"""The README's recipes ("trlib in your own training loop") run as written.

Each ```python block after a ``<!-- recipe: NAME -->`` marker is executed with a few names the
README leaves to the reader (a small ``loader``, ``model``, ``device``). Two stand-ins, named as
such: ``lightning.pytorch`` is a minimal imitation of Lightning's manual-optimisation contract
(Lightning is not a dependency), and ``torch.compile`` uses the ``aot_eager`` backend, which runs
the same aot_autograd as the default inductor backend without a minute of C++ compilation.
"""

import functools
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import trlib

README = Path(__file__).resolve().parents[1] / "README.md"


def _recipes():
    text = README.read_text()
    section = text[text.index("## trlib in your own training loop"):]
    section = section[:section.index("\n## ", 1)]
    return dict(re.findall(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", section, flags=re.S))


def _images(batches=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(batches)]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))


def _run(name, **names):
    namespace = {"torch": torch, "trlib": trlib, **names}
    exec(compile(_recipes()[name], f"README recipe {name}", "exec"), namespace)
    return namespace


def test_every_recipe_is_tested():
    assert set(_recipes()) == {"plain", "groups", "lightning", "huggingface", "amp", "compile", "minimize"}


def test_plain_loop_with_a_scheduler_and_gradient_logging_then_groups():
    loader = _images()
    ns = _run("plain", loader=loader)
    opt, model = ns["opt"], ns["model"]
    assert opt.counts["gradient"] == len(loader) and float(ns["grad_norm"]) == pytest.approx(opt.last["grad_norm"])
    exec(compile(_recipes()["groups"], "README recipe groups", "exec"), ns)
    frozen_then = [p.detach().clone() for p in model[3].parameters()]
    assert ns["opt"].param_groups[1]["lr"] == 1.0 and ns["opt"].last["status"] != "lr is 0"
    ns["opt"].step(lambda: nn.functional.cross_entropy(model(ns["x"]), ns["y"]))
    assert not torch.equal(next(model[3].parameters()), frozen_then[0])


# ---------------------------------------------------------------------------- Lightning, imitated
class _LightningOptimizer:
    """Lightning's wrapper: step(closure) calls the optimizer's step with the closure wrapped so
    that the module's on_before_optimizer_step hook runs after each call (its precision plugin)."""

    def __init__(self, optimizer, module):
        self._optimizer, self._module = optimizer, module

    def step(self, closure=None, **kwargs):
        if closure is None:
            closure = lambda: None  # noqa: E731  (Lightning's do-nothing closure)

        def wrapped():
            result = closure()
            self._module.on_before_optimizer_step(self._optimizer)
            return result

        return self._optimizer.step(closure=wrapped, **kwargs)

    def zero_grad(self, set_to_none=True):
        self._optimizer.zero_grad(set_to_none=set_to_none)


class _LightningModule(nn.Module):
    automatic_optimization = True

    def __init__(self):
        super().__init__()
        self.logged, self.hook_calls = {}, 0

    def optimizers(self):
        return self._lightning_optimizer

    def log(self, name, value, **kwargs):
        self.logged.setdefault(name, []).append(float(value))

    def on_before_optimizer_step(self, optimizer):
        self.hook_calls += 1


class _Trainer:
    def __init__(self, max_epochs=1, precision="32-true", **kwargs):
        assert precision == "32-true"
        self.max_epochs = max_epochs

    def fit(self, module, train_dataloaders):
        optimizer = module.configure_optimizers()
        module._lightning_optimizer = _LightningOptimizer(optimizer, module)
        module.train()
        for _ in range(self.max_epochs):
            for i, batch in enumerate(train_dataloaders):
                if module.automatic_optimization:  # training_step, zero_grad and backward inside the closure
                    def closure():
                        loss = module.training_step(batch, i)
                        optimizer.zero_grad()
                        loss.backward()
                        return loss

                    module._lightning_optimizer.step(closure=closure)
                else:
                    module.training_step(batch, i)
        self.module = module


@pytest.fixture
def lightning(monkeypatch):
    package, submodule = types.ModuleType("lightning"), types.ModuleType("lightning.pytorch")
    submodule.LightningModule, submodule.Trainer = _LightningModule, _Trainer
    package.pytorch = submodule
    monkeypatch.setitem(sys.modules, "lightning", package)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", submodule)
    return submodule


def test_lightning_manual_optimisation(lightning):
    loader = _images()
    trainers = []
    real_fit = _Trainer.fit

    def fit(self, module, train_dataloaders):
        trainers.append(self)
        return real_fit(self, module, train_dataloaders)

    _Trainer.fit = fit
    try:
        _run("lightning", loader=loader)
    finally:
        _Trainer.fit = real_fit
    module = trainers[0].module
    opt = module.optimizers()._optimizer
    assert opt.counts["gradient"] == len(loader) and len(module.logged["train_loss"]) == len(loader)
    assert module.hook_calls == opt.counts["gradient"] + opt.counts["forward"]  # the hook ran after every call
    assert module.logged["train_loss"][-1] == opt.last["loss"]  # what step returned


def test_lightning_automatic_optimisation_is_refused_with_the_way_out(lightning):
    class Automatic(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(784, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x.flatten(1)), y)

        def configure_optimizers(self):
            return trlib.TrustRegion(self.parameters())

    with pytest.raises(ValueError, match="called backward.*manual optimisation"):
        lightning.Trainer().fit(Automatic(), _images(1))


# ---------------------------------------------------------------------------- Hugging Face-style
class _TokenClassifier(nn.Module):
    """A model with the Hugging Face calling convention: keyword tensors in, an output with
    ``.loss`` (given ``labels``) and ``.logits`` out; dropout as in transformers' models."""

    def __init__(self, vocab=50, width=16, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask, labels=None):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        logits = self.head(self.dropout(pooled))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def test_hugging_face_style_loop():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (64, 12), generator=g)
    labels = ids[:, 0] % 3  # learnable from the tokens
    loader = [{"input_ids": ids[i:i + 32], "attention_mask": torch.ones(32, 12, dtype=torch.long),
               "labels": labels[i:i + 32]} for i in (0, 32)] * 6
    torch.manual_seed(0)
    model = _TokenClassifier()

    def loss():
        model.eval()
        with torch.no_grad():
            return sum(float(model(**batch).loss) for batch in loader[:2]) / 2

    start = loss()
    ns = _run("huggingface", loader=loader, model=model, device=torch.device("cpu"))
    opt = ns["opt"]
    assert opt.counts["gradient"] == len(loader) and opt.param_groups[0]["lr"] == 1.0
    assert loss() < 0.5 * start


# ---------------------------------------------------------------------------- mixed precision
def test_autocast_forward_with_a_float32_loss():
    loader = _images(1)
    model = _mlp()
    x, y = loader[0]
    opt = trlib.TrustRegion(model.parameters(), norm="rms")
    losses = []
    for _ in range(5):
        ns = _run("amp", model=model, opt=opt, x=x, y=y)
        losses.append(float(ns["loss"]))
        assert ns["loss"].dtype == torch.float32
    assert losses[-1] < losses[0] and opt.counts["gradient"] == 5


# ---------------------------------------------------------------------------- torch.compile
def test_compiled_model_with_forward_over_reverse(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    loader = _images(3)
    model = _mlp()
    ns = _run("compile", model=model, loader=loader)
    assert ns["opt"].counts["gradient"] == 3 and ns["opt"].counts["hvp"] > 0
    assert isinstance(ns["model"], torch._dynamo.eval_frame.OptimizedModule)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- minimize
def test_minimize_on_a_module():
    torch.manual_seed(0)
    ns = _run("minimize")
    X, Y, regression, res = ns["X"], ns["Y"], ns["regression"], ns["res"]
    A = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(A, Y).solution
    assert res.success and res.x["weight"].shape == (1, 3) and res.x["bias"].shape == (1,)
    torch.testing.assert_close(regression.weight.detach(), solution[:3].T, rtol=1e-5, atol=1e-6)
