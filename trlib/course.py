"""Helpers only the course needs: the quick/full switch, device, seeds, and the Colab install.

Every chapter starts with::

    from trlib import course
    MODE = course.mode()          # "quick" without a GPU, "full" with one; TRLIB_MODE overrides
    DEVICE = course.device()
    course.seed_everything(0)

and reads its sizes through :func:`pick`, so one notebook serves both the rendered book
(quick mode on 2 CPU cores, each chapter within a minute) and a real run on a GPU.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["REPOSITORY_URL", "INSTALL_SPEC", "mode", "is_full", "pick", "device", "seed_everything", "banner",
           "on_colab"]

#: The repository (also in _config.yml and each notebook's install cell; a test checks they agree).
REPOSITORY_URL = "https://github.com/trlib-course/trlib"
#: What a notebook on Colab installs (Colab's preinstalled torch satisfies ``torch>=2.4`` and is kept).
INSTALL_SPEC = f"trlib-torch[data,plot] @ git+{REPOSITORY_URL}@main"

_MODES = ("quick", "full")


def on_colab() -> bool:
    return "google.colab" in sys.modules


def mode() -> str:
    """``"full"`` on a machine with a GPU, else ``"quick"``; the environment variable
    ``TRLIB_MODE`` (``quick`` or ``full``) overrides."""
    forced = os.environ.get("TRLIB_MODE", "").strip().lower()
    if forced:
        if forced not in _MODES:
            raise ValueError(f"Invalid TRLIB_MODE: {forced!r}; expected one of {_MODES}")
        return forced
    return "full" if torch.cuda.is_available() else "quick"


def is_full() -> bool:
    return mode() == "full"


def pick(quick: Any, full: Any) -> Any:
    """The value for the current mode."""
    return full if is_full() else quick


def device() -> torch.device:
    """CUDA when present (``TRLIB_DEVICE`` overrides), else the CPU.

    In quick mode on the CPU this also limits torch to one thread: the chapters' problems
    are tiny, the book build runs notebooks side by side, and oversubscribed cores make
    small tensor operations orders of magnitude slower.
    """
    forced = os.environ.get("TRLIB_DEVICE")
    dev = torch.device(forced) if forced else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and mode() == "quick":
        torch.set_num_threads(1)
    return dev


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def banner(quick: Optional[Dict[str, Any]] = None, full: Optional[Dict[str, Any]] = None) -> str:
    """A line for the top of a chapter: which mode produced the page, on what, and what the
    other mode would run (``quick`` and ``full`` describe the chapter's settings)."""
    current = mode()
    dev = device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [f"This page was produced in {current} mode on {name} with torch {torch.__version__}."]
    if quick is not None and full is not None:
        def fmt(d):
            return ", ".join(f"{k}={v}" for k, v in d.items())

        lines.append(f"  quick mode runs: {fmt(quick)}")
        lines.append(f"  full mode runs:  {fmt(full)}")
        if current == "quick":
            lines.append("  (set TRLIB_MODE=full, or run on a GPU, e.g. on Colab, for the full experiment)")
    return "\n".join(lines)
