"""Helpers only the course needs: the run mode, device, seeds, progress bars, glue, the Colab install.

Every chapter starts with::

    from trlib import course
    from trlib.course import glue   # myst-nb's glue in the book, plain display elsewhere (Colab)
    MODE = course.mode()            # "quick" on a CPU, "medium" on a GPU, "full" only when asked
    DEVICE = course.device()
    course.seed_everything(0)

and reads its sizes through :func:`pick`, so one notebook serves the rendered book (quick mode
on 2 CPU cores, each chapter in about a minute), a Colab GPU session (medium mode, about 10-15
minutes per chapter on a T4-class GPU, on the real dataset where it can be loaded) and the
paper-size experiment (full mode, opt-in with ``TRLIB_MODE=full``).

Prose that cannot drift from output: every sentence of a chapter that states an outcome of
its runs either carries the outcome as a glued value (``{glue:text}`name```, from
:func:`glue`), or ends with a marker ``<!-- check: name -->`` whose :func:`check` in the
code cell right before or after it fails the build when the outcome changes.
``tests/test_outcomes.py`` finds the outcome sentences (CONTRIBUTING.md lists the vocabulary)
and fails on any that is neither.

Nothing here is needed by the library itself, and nothing here needs more than the
``trlib-torch[data,plot]`` install: myst-nb, ipywidgets and threadpoolctl are used when present.
"""

from __future__ import annotations

import os
import random
import sys
import warnings
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["REPOSITORY_URL", "INSTALL_SPEC", "MODES", "mode", "is_full", "pick", "device", "seed_everything",
           "banner", "glue", "glued", "progress", "show_progress", "on_colab", "check", "checked",
           "OutcomeError"]

#: The repository (also in _config.yml and each notebook's install cell; a test checks they agree).
REPOSITORY_URL = "https://github.com/trlib-course/trlib"
#: What a notebook on Colab installs (Colab's preinstalled torch satisfies ``torch>=2.4`` and is kept).
INSTALL_SPEC = f"trlib-torch[data,plot] @ git+{REPOSITORY_URL}@main"

#: The run modes, smallest first: ``quick`` (the book build on a CPU), ``medium`` (a GPU session
#: such as Colab's), ``full`` (the paper's sizes; opt-in).
MODES = ("quick", "medium", "full")

#: Every value passed to :func:`glue`, by name (also where myst-nb is missing, e.g. on Colab).
glued: Dict[str, Any] = {}

_UNSET = object()


def _env(name: str, choices, expected: str) -> str:
    # a setting from the environment, lower case ("" when unset), or a clear error
    value = os.environ.get(name, "").strip().lower()
    if value and value not in choices:
        raise ValueError(f"invalid {name} {value!r}: expected {expected}")
    return value


def on_colab() -> bool:
    """True inside a Google Colab kernel."""
    return "google.colab" in sys.modules


def mode() -> str:
    """The run mode: ``TRLIB_MODE`` (``quick``, ``medium`` or ``full``) when set, else ``"medium"``
    with a CUDA GPU and ``"quick"`` without one. Full mode never starts by itself.

    >>> from unittest import mock
    >>> with mock.patch.dict("os.environ", TRLIB_MODE="full"):
    ...     mode()
    'full'
    """
    forced = _env("TRLIB_MODE", MODES, f"one of {', '.join(MODES)}")
    return forced or ("medium" if torch.cuda.is_available() else "quick")


def is_full() -> bool:
    """True in full mode (``TRLIB_MODE=full``)."""
    return mode() == "full"


def pick(quick: Any, full: Any, medium: Any = _UNSET) -> Any:
    """The value for the current mode: ``quick``, ``medium`` or ``full``.

    A value given without a ``medium`` variant keeps its quick value in medium mode, so that
    nothing grows on a GPU unless the chapter says how.

    >>> from unittest import mock
    >>> with mock.patch.dict("os.environ", TRLIB_MODE="medium"):
    ...     pick(quick=10, medium=100, full=1000), pick(quick=10, full=1000)
    (100, 10)
    """
    current = mode()
    if current == "full":
        return full
    if current == "medium" and medium is not _UNSET:
        return medium
    return quick


def _limit_threads() -> None:
    # The chapters' problems are small, the book build runs notebooks side by side, and on
    # oversubscribed cores small tensor and BLAS operations become orders of magnitude slower.
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an optional dependency (it comes with scikit-learn)
        return
    threadpool_limits(1)


def device() -> torch.device:
    """CUDA when present (``TRLIB_DEVICE`` overrides), else the CPU.

    In quick mode on the CPU this also limits torch and BLAS to one thread each.
    """
    forced = os.environ.get("TRLIB_DEVICE")
    dev = torch.device(forced) if forced else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and mode() == "quick":
        _limit_threads()
    return dev


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def banner(quick: Optional[Dict[str, Any]] = None, full: Optional[Dict[str, Any]] = None,
           medium: Optional[Dict[str, Any]] = None) -> str:
    """A few lines for the top of a chapter: which mode produced the page, on what, and what
    each mode runs (``quick``, ``medium`` and ``full`` describe the chapter's settings)."""
    current = mode()
    dev = device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [f"This page was produced in {current} mode on {name} with torch {torch.__version__}."]
    notes = {"quick": "the default on a CPU", "medium": "the default on a GPU, e.g. on Colab",
             "full": "the paper's sizes: set TRLIB_MODE=full"}
    settings = {"quick": quick, "medium": medium, "full": full}
    for key in MODES:
        if settings[key] is not None:
            shown = ", ".join(f"{k}={v}" for k, v in settings[key].items())
            if key == "medium" and medium == full:
                shown = "the full settings (they fit the medium time on a GPU)"
            lines.append(f"  {key:6s} mode ({notes[key]}) runs: {shown}")
    return "\n".join(lines)


def glue(name: str, value: Any, display: bool = True) -> None:
    """myst-nb's ``glue`` where myst-nb is installed (the book build): the value can then be
    used in the page's text as ``{glue:text}`name```. Without myst-nb (Colab, a plain Jupyter)
    the value is shown when ``display`` is true and otherwise only kept, like every glued value,
    in :data:`glued`.
    """
    glued[name] = value
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            try:
                from IPython.display import display as show
            except ImportError:
                show = print
            show(value)
        return
    myst_glue(name, value, display=display)


def show_progress() -> bool:
    """Whether the chapters show progress bars: ``TRLIB_PROGRESS`` (``1``/``0``) when set, else
    in medium and full mode only (quick cells are short, and bars do not belong in the book)."""
    forced = _env("TRLIB_PROGRESS", ("0", "1", "true", "false", "yes", "no"), "1 or 0")
    return forced in ("1", "true", "yes") if forced else mode() != "quick"


def progress(iterable=None, **kwargs):
    """A tqdm progress bar (a widget in Jupyter when ipywidgets is installed, text otherwise)
    around ``iterable``, shown when :func:`show_progress` says so. ``kwargs`` go to tqdm.

    >>> [i for i in progress(range(3), desc="runs", disable=True)]
    [0, 1, 2]
    """
    kwargs.setdefault("disable", not show_progress())
    with warnings.catch_warnings():  # tqdm.auto warns about its own notebook mode on import
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


#: Every :func:`check` that ran, by name: True when its outcome held (False only in warn mode).
checked: Dict[str, bool] = {}


class OutcomeError(AssertionError):
    """An outcome the page's text states does not hold in this run (see :func:`check`)."""


def check(name: str, holds: Any, says: str) -> None:
    """Guard a sentence of the page: ``holds`` is the outcome the sentence ``says``, computed
    from this run. The sentence ends with ``<!-- check: name -->`` and this call sits in the
    code cell right before or after it (``tests/test_outcomes.py`` checks both).

    When the outcome does not hold, the book build stops with :class:`OutcomeError` naming
    the sentence, so text and output cannot disagree on a rendered page. On Colab, where a
    reader may run larger presets than the page was written for, it warns instead
    (``TRLIB_CHECKS=raise`` or ``warn`` overrides).

    >>> check("doc_example", 2 < 3, "two is below three")
    >>> check("doc_example", 2 > 3, "two is above three")
    Traceback (most recent call last):
    ...
    trlib.course.OutcomeError: the text says "two is above three" (check 'doc_example'), but this run does not bear it out; change the text or find out what changed in the run
    """
    if not (isinstance(name, str) and name.replace("_", "").isalnum() and name[:1].isalpha()):
        raise ValueError(f"invalid check name {name!r}: use letters, digits and underscores, starting with a letter")
    if not (isinstance(says, str) and says.strip()):
        raise ValueError(f"check {name!r}: say in words what the sentence states (says=...)")
    try:
        ok = bool(holds)
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. a tensor of many elements
        raise ValueError(f"check {name!r}: the outcome must be a single truth value, got {type(holds).__name__}") from err
    checked[name] = ok
    if ok:
        return
    message = (f'the text says "{says}" (check {name!r}), but this run does not bear it out; '
               "change the text or find out what changed in the run")
    action = _env("TRLIB_CHECKS", ("raise", "warn"), "raise or warn") or ("warn" if on_colab() else "raise")
    if action == "raise":
        raise OutcomeError(message)
    warnings.warn("Note for this run: " + message, stacklevel=2)
