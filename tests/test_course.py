"""trlib.course: the run modes, pick, glue without myst-nb, progress bars, the banner."""

import sys
import types

import pytest
import torch

from trlib import course


@pytest.fixture
def env(monkeypatch):
    for name in ("TRLIB_MODE", "TRLIB_PROGRESS", "TRLIB_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("cuda,expected", [(False, "quick"), (True, "medium")])
def test_mode_defaults_to_quick_on_cpu_and_medium_on_gpu(env, cuda, expected):
    env.setattr(torch.cuda, "is_available", lambda: cuda)
    assert course.mode() == expected
    assert not course.is_full()  # full mode never starts by itself, GPU or not


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("forced", ["quick", "medium", "full", " Full "])
def test_trlib_mode_overrides(env, cuda, forced):
    env.setattr(torch.cuda, "is_available", lambda: cuda)
    env.setenv("TRLIB_MODE", forced)
    assert course.mode() == forced.strip().lower()
    assert course.is_full() == (forced.strip().lower() == "full")


def test_invalid_mode_is_a_clear_error(env):
    env.setenv("TRLIB_MODE", "fast")
    with pytest.raises(ValueError, match="TRLIB_MODE.*quick, medium, full"):
        course.mode()


@pytest.mark.parametrize("forced,expected", [("quick", (1, 1)), ("medium", (2, 1)), ("full", (3, 3))])
def test_pick(env, forced, expected):
    env.setenv("TRLIB_MODE", forced)
    assert course.pick(quick=1, medium=2, full=3) == expected[0]
    assert course.pick(1, 3) == expected[1]  # no medium value: medium keeps the quick one
    assert course.pick(quick="a", full="b", medium=None) == {"quick": "a", "medium": None, "full": "b"}[forced]


def test_banner_names_the_mode_and_every_preset(env):
    env.setenv("TRLIB_MODE", "medium")
    text = course.banner(dict(seeds=3), dict(seeds=10), medium=dict(seeds=5))
    assert "produced in medium mode" in text and "torch" in text
    for line in ("quick  mode", "medium mode", "full   mode"):
        assert line in text
    assert "seeds=3" in text and "seeds=5" in text and "seeds=10" in text
    assert "TRLIB_MODE=full" in text
    assert "medium" not in course.banner(dict(a=1), dict(a=2)).split("\n", 1)[1]
    same = course.banner(dict(a=1), dict(a=2), medium=dict(a=2))
    assert "medium mode (the default on a GPU, e.g. on Colab) runs: the full settings" in same


@pytest.fixture
def no_myst_nb(monkeypatch):
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # `import myst_nb` now raises ImportError


def test_glue_without_myst_nb_displays_or_keeps(no_myst_nb, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    course.glue("test_hidden", 1.5, display=False)
    course.glue("test_shown", "text")
    assert shown == ["text"]
    assert course.glued["test_hidden"] == 1.5 and course.glued["test_shown"] == "text"


def test_glue_uses_myst_nb_when_present(monkeypatch):
    calls = []
    fake = types.ModuleType("myst_nb")
    fake.glue = lambda name, value, display=True: calls.append((name, value, display))
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    course.glue("test_value", 3, display=False)
    assert calls == [("test_value", 3, False)] and course.glued["test_value"] == 3


@pytest.mark.parametrize("forced,setting,shown", [
    ("quick", None, False), ("medium", None, True), ("full", None, True),
    ("quick", "1", True), ("full", "0", False)])
def test_progress_bars_follow_the_mode(env, forced, setting, shown):
    env.setenv("TRLIB_MODE", forced)
    if setting is not None:
        env.setenv("TRLIB_PROGRESS", setting)
    assert course.show_progress() == shown
    bar = course.progress(range(4), desc="test", file=sys.stderr)
    assert bar.disable == (not shown)  # (tqdm disables a bar once it is closed)
    assert list(bar) == [0, 1, 2, 3]
    env.setenv("TRLIB_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="TRLIB_PROGRESS"):
        course.show_progress()


def test_quick_mode_on_the_cpu_uses_one_thread(env):
    env.setattr(torch.cuda, "is_available", lambda: False)
    before = torch.get_num_threads()
    try:
        assert course.device() == torch.device("cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    env.setenv("TRLIB_DEVICE", "meta")
    assert course.device() == torch.device("meta")


def test_seed_everything_repeats_draws():
    course.seed_everything(3)
    a = torch.rand(3)
    course.seed_everything(3)
    assert torch.equal(a, torch.rand(3))
