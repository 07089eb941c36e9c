"""Shared helpers of the benchmark scripts: device banner, timing, tables, JSON.

Not a benchmark itself. Each script in this folder imports it as ``_common`` (running
``python benchmarks/<name>.py`` puts this folder first on ``sys.path``). The timing helpers
are the library's own (:mod:`trlib.timing`, which chapter 7 of the course uses too), so the
benchmarks and the book measure the same way.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Dict, Optional, Sequence

import torch

from trlib.timing import synchronize, time_interleaved, time_median  # noqa: F401 (used by the scripts)


def resolve_device(name: str) -> torch.device:
    """``"cpu"`` or ``"cuda"``; asking for CUDA without a GPU is an error, not a silent fallback."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


_LIMITS = []  # keeps the threadpoolctl limiter alive


def set_threads(n: Optional[int]) -> None:
    """Use ``n`` CPU threads in torch (OpenMP) and in NumPy/SciPy's BLAS; None keeps the defaults.

    Small dense operations (a 200 x 200 eigendecomposition, a matrix-vector product) run
    far slower with several threads on a machine whose cores are busy: on the shared
    2-core machine of the published figures, a 150 x 150 ``numpy.linalg.eigh`` took ~50-140 ms
    with 2 BLAS threads and ~3-4 ms with one. Benchmarks of small problems default to 1.
    """
    if not n:
        return
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        _LIMITS.append(threadpool_limits(limits=n))
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(n))


def _blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info

        counts = sorted({i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"})
        return "/".join(str(c) for c in counts) or "?"
    except ImportError:  # pragma: no cover
        return "?"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores; threads: torch {torch.get_num_threads()}, BLAS {_blas_threads()})"


def environment(device: torch.device) -> Dict[str, str]:
    """What produced the numbers: device, library versions, date."""
    import numpy
    import scipy

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def print_environment(title: str, env: Dict[str, str], settings: Dict) -> None:
    print(title)
    print("=" * len(title))
    print(f"device: {env['device']}")
    print(f"torch {env['torch']} | numpy {env['numpy']} | scipy {env['scipy']} | python {env['python']} | {env['date']}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print()


def format_table(headers: Sequence[str], rows: Sequence[Sequence], align: Optional[str] = None) -> str:
    """A plain-text table; ``align`` is one character per column, ``l`` or ``r`` (default: first left)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align))

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def write_json(path: Optional[str], payload: Dict) -> None:
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, default=_json_default)
        fh.write("\n")
    print(f"\nwrote {path}")


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
