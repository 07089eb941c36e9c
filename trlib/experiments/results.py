"""Results on disk, loading, and the summary table.

Format: one JSON-lines file per run, ``<task>__<method>__<dataset>__seed<k>.jsonl``. Its first
line is ``{"provenance": {...}}`` (task, method, seed, the full configuration, budget and
budget spent, status ``running``/``interrupted``/``complete``/``diverged``, dataset name,
display name and whether it is a stand-in, device, torch/trlib/Python versions, git commit,
dates, one entry per session); every other line is one log record (see
:func:`trlib.experiments.run`). Non-finite numbers are written as Python's json writes them
(``NaN``, ``Infinity``). Files are rewritten atomically, so a reader never sees half a file.

The provenance ends with ``integrity``: the number of records and the SHA-256 of the file's
text (the provenance without ``integrity``, then the record lines). :func:`read_run` checks
both, so a file that lost a record, was cut, or was edited is refused, not read as if it were
whole. Files written before this check existed (no ``integrity``) are read with
``Run.verified`` False.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
>>> records = [dict(task="t", method="sgd", seed=0, dataset="d", step=k, train_loss=1 / (k + 1)) for k in range(3)]
>>> write_run(path, {"task": "t", "method": "sgd", "seed": 0, "status": "complete"}, records)
>>> [r["train_loss"] for r in load_results(path)]
[1.0, 0.5, 0.3333333333333333]
>>> lines = open(path).readlines(); _ = open(path, "w").writelines(lines[:-1])   # drop the last record
>>> load_results(path)   # doctest: +ELLIPSIS
Traceback (most recent call last):
...
trlib.experiments.results.RunFileError: .../run.jsonl: 2 records, but its provenance says the run wrote 3 ...
>>> mean_ci([1.0, 2.0, 3.0])   # 2 +- t(0.975, 2) * 1 / sqrt(3)  # doctest: +ELLIPSIS
(2.0, 2.484...)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..plotting import group_runs  # one definition, in the library (plotting may not import experiments)
from .configs import METHODS
from .storage import atomic_write

__all__ = ["Run", "RunFileError", "write_run", "read_run", "load_runs", "load_results", "mean_ci", "first_reach",
           "group_runs", "summarize", "format_table"]

PathLike = Union[str, os.PathLike]
#: What every record holds (a line without them is not a record of a run).
RECORD_KEYS = ("task", "method", "seed", "dataset", "step")
_REWRITE = "rerun the run's command to rewrite it from its checkpoint"


class RunFileError(ValueError):
    """A results file that is not a run, or that disagrees with its own provenance."""


@dataclass
class Run:
    """One run read from disk: its provenance header and its log records. ``verified``: the
    file matched the record count and checksum of its provenance (False for files written
    before those were recorded)."""

    path: Path
    provenance: Dict[str, Any]
    records: List[Dict[str, Any]] = field(default_factory=list)
    verified: bool = False


def _checksum(provenance: Dict[str, Any], body: bytes) -> str:
    head = json.dumps({k: v for k, v in provenance.items() if k != "integrity"}).encode("utf-8")
    return hashlib.sha256(head + b"\n" + body).hexdigest()


def write_run(path: PathLike, provenance: Dict[str, Any], records: Iterable[Dict[str, Any]]) -> None:
    """Write one run (atomically), with its record count and checksum in ``provenance["integrity"]``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(rec) for rec in records]
    body = "".join(line + "\n" for line in lines).encode("utf-8")
    provenance = {k: v for k, v in provenance.items() if k != "integrity"}
    provenance["integrity"] = {"records": len(lines), "sha256": _checksum(provenance, body)}
    atomic_write(path, json.dumps({"provenance": provenance}).encode("utf-8") + b"\n" + body)


def read_run(path: PathLike) -> Run:
    """One run file, checked against its provenance. :class:`RunFileError` (a ValueError) naming
    the file, and the line where there is one, when it is not a run or disagrees with it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise RunFileError(f"{path}: a folder, not a run file") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunFileError(f"{path}: not a run file: not UTF-8 text ({err.reason} at byte {err.start})") from None
    head, _, body = data.partition(b"\n")
    if not data.strip():
        raise RunFileError(f"{path}: empty file, not a run")
    try:
        first = json.loads(head)
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path}:1: not JSON ({err})") from None
    if not (isinstance(first, dict) and set(first) == {"provenance"} and isinstance(first["provenance"], dict)):
        raise RunFileError(f"{path}:1: a run file starts with a provenance line")
    run = Run(path, first["provenance"])
    for number, line in enumerate(body.split(b"\n"), 2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunFileError(f"{path}:{number}: not JSON ({err}); {_REWRITE}") from None
        missing = [k for k in RECORD_KEYS if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise RunFileError(f"{path}:{number}: not a record of a run (no {missing[0]!r})")
        other = [k for k in ("task", "method", "seed") if k in run.provenance and rec[k] != run.provenance[k]]
        if other:
            raise RunFileError(f"{path}:{number}: a record of another run ({other[0]} {rec[other[0]]!r}, the "
                               f"provenance says {run.provenance[other[0]]!r})")
        run.records.append(rec)
    integrity = run.provenance.get("integrity")
    if integrity is not None:
        if not (isinstance(integrity, dict) and isinstance(integrity.get("records"), int)):
            raise RunFileError(f"{path}:1: its provenance's integrity entry is unreadable")
        if len(run.records) != integrity["records"]:
            raise RunFileError(f"{path}: {len(run.records)} records, but its provenance says the run wrote "
                               f"{integrity['records']} (a record was removed or added, or the file was cut); "
                               f"{_REWRITE}")
        if _checksum(run.provenance, body) != integrity.get("sha256"):
            raise RunFileError(f"{path}: its contents do not match the checksum in its provenance (the file was "
                               f"edited or damaged); {_REWRITE}")
        run.verified = True
    return run


def load_runs(path: PathLike) -> List[Run]:
    """Every run in ``path``: one ``.jsonl`` file, or a folder searched recursively.
    :class:`RunFileError` listing every file that is not a whole run (one line each)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no results at {path}")
    runs, problems = [], []
    for p in files:
        try:
            runs.append(read_run(p))
        except RunFileError as err:
            problems.append(str(err))
    if problems:
        raise RunFileError("\n".join(problems))
    return runs


def load_results(path: PathLike) -> List[Dict[str, Any]]:
    """The log records of every run in ``path`` (a file or a folder), run after run."""
    return [rec for run in load_runs(path) for rec in run.records]


# --- statistics ---------------------------------------------------------------------------

def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float]:
    """Mean and half-width of the ``confidence`` interval of the mean (Student's t with
    n - 1 degrees of freedom). The half-width is NaN for fewer than two values."""
    from scipy import stats

    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(xs) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def first_reach(records: Sequence[Dict[str, Any]], metric: str = "train_acc",
                threshold: float = 0.99) -> Optional[Dict[str, Any]]:
    """The first record (of one run, in step order) whose ``metric`` is at least
    ``threshold``, or None. Its backprops/epoch/time are an upper bound on the true
    crossing point (evaluations are ``eval_every`` apart)."""
    for rec in records:
        value = rec.get(metric)
        if value is not None and value >= threshold:
            return rec
    return None


#: The costs to a threshold: (row key, record key). Data passes: samples through gradient and
#: Hessian-vector passes / training-set size (fair across batch sizes; not in files written
#: before they were recorded, where the column says so).
_COSTS = (("backprops", "backprops"), ("data_passes", "data_passes"), ("epochs", "epoch"), ("seconds", "time"))


def summarize(records: Iterable[Dict[str, Any]], threshold: float = 0.99,
              confidence: float = 0.95) -> List[Dict[str, Any]]:
    """One row per (task, dataset, method): how many seeds, how many reached ``threshold``
    training accuracy, the mean and CI half-width over those of the work to get there
    (backprops, data passes, epochs, seconds), and over all seeds of the final training loss
    and test accuracy.

    Row keys: ``task, dataset, method, seeds, reached`` (seeds that reached it),
    ``backprops, data_passes, epochs, seconds, final_train_loss, final_train_acc,
    final_test_acc`` (each ``(mean, half_width)``; None where not applicable, e.g. accuracy of
    an autoencoder, a cost that no seed reached, or data passes of runs that did not record them).
    """
    rows = []
    for (task, dataset, method), runs in group_runs(records).items():
        finals = [recs[-1] for recs in runs.values()]
        classifier = finals[0].get("train_acc") is not None
        hits = {seed: first_reach(recs, "train_acc", threshold) for seed, recs in runs.items()} if classifier else {}
        reached = [seed for seed, hit in hits.items() if hit is not None]
        row = dict(task=task, dataset=dataset, method=method, seeds=list(runs), reached=reached if classifier else None)
        for name, key in _COSTS:
            values = [hits[s].get(key) for s in reached]
            row[name] = mean_ci(values, confidence) if reached and None not in values else None
        for name in ("train_loss", "train_acc", "test_acc"):
            values = [r[name] for r in finals if r.get(name) is not None]
            row[f"final_{name}"] = mean_ci(values, confidence) if values else None
        rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}  # TR methods first, then the baselines
    return sorted(rows, key=lambda r: (r["task"], r["dataset"], order.get(r["method"], len(order)), r["method"]))


# --- the table ------------------------------------------------------------------------------

def _pm(ci, fmt) -> str:
    mean, hw = ci
    return fmt(mean) if math.isnan(hw) else f"{fmt(mean)} ± {fmt(hw)}"


def _percent(threshold: float) -> str:
    """``0.99`` -> ``"99%"``, ``0.995`` -> ``"99.5%"``."""
    return f"{100 * threshold:.10g}%"


def _sig(v: float) -> str:
    # 4 significant digits of the mean; the half-width is printed to the same decimals
    return f"{v:.4g}"


def _pm_loss(ci) -> str:
    mean, hw = ci
    if math.isnan(hw) or not math.isfinite(mean) or mean == 0:
        return _pm(ci, _sig)
    decimals = max(0, 3 - int(math.floor(math.log10(abs(mean)))))
    return f"{mean:.{decimals}f} ± {hw:.{decimals}f}"


def _cells(row: Dict[str, Any], threshold: float) -> List[str]:
    n = len(row["seeds"])
    out = [row["method"], str(n)]
    if row["reached"] is None:
        out.append("n/a")
        out += ["n/a (no accuracy)"] * len(_COSTS)
    else:
        k = len(row["reached"])
        out.append(f"{k}/{n}")
        formats = (lambda v: f"{v:,.0f}", lambda v: f"{v:.3g}", lambda v: f"{v:.2f}", lambda v: f"{v:.2f}")
        for (name, _), fmt in zip(_COSTS, formats):
            if not k:
                out.append(f"never reached {_percent(threshold)}")
            elif row[name] is None:
                out.append("not recorded")
            else:
                out.append(_pm(row[name], fmt) + ("" if k == n else f" ({k}/{n} seeds)"))
    out.append(_pm_loss(row["final_train_loss"]))
    out.append("n/a" if row["final_test_acc"] is None else _pm(row["final_test_acc"], lambda v: f"{100 * v:.1f}%"))
    return out


def format_table(rows: Sequence[Dict[str, Any]], fmt: str = "text", threshold: float = 0.99,
                 confidence: float = 0.95) -> str:
    """Render :func:`summarize`'s rows as ``"text"``, ``"markdown"`` or ``"csv"`` (raw numbers).

    Text and markdown print one table per (task, dataset), titled with the dataset's display
    name, cells as ``mean ± half-width`` of the ``confidence`` interval over seeds."""
    if fmt not in ("text", "markdown", "csv"):
        raise ValueError(f"invalid table format {fmt!r}; expected 'text', 'markdown' or 'csv'")
    if fmt == "csv":
        return _csv(rows)
    pct = _percent(threshold)
    head = ["method", "seeds", f"reached {pct}", f"backprops to {pct}", f"data passes to {pct}",
            f"epochs to {pct}", f"seconds to {pct}", "final train loss", "final test acc"]
    blocks = []
    by_task: Dict[tuple, list] = defaultdict(list)
    for row in rows:
        by_task[(row["task"], row["dataset"])].append(row)
    for (task, dataset), group in by_task.items():
        body = [_cells(r, threshold) for r in group]
        title = f"{task} on {dataset}: mean ± {confidence:.0%} CI over seeds (Student t)"
        if fmt == "markdown":
            lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in body]
        else:
            widths = [max(len(c) for c in col) for col in zip(head, *body)]
            lines = [title, "  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
            lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
        blocks.append("\n".join(lines))
    note = (f"Costs to {pct} training accuracy are measured at the first evaluation at or above it; "
            "'(k/n seeds)': mean over the k seeds that reached it.")
    return "\n\n".join(blocks + [note]) + "\n"


def _csv(rows) -> str:
    buf = io.StringIO()
    fields = ["task", "dataset", "method", "seeds", "reached"]
    stats = [name for name, _ in _COSTS] + ["final_train_loss", "final_train_acc", "final_test_acc"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields + [f"{s}_{part}" for s in stats for part in ("mean", "ci")])
    for row in rows:
        line = [row["task"], row["dataset"], row["method"], len(row["seeds"]),
                "" if row["reached"] is None else len(row["reached"])]
        for s in stats:
            line += ["", ""] if row[s] is None else [repr(row[s][0]), repr(row[s][1])]
        writer.writerow(line)
    return buf.getvalue()
