"""Fault injection into the runner (issue 14, items 1-8): concurrent writers; truncated,
garbage, bit-flipped and foreign results files and checkpoints; kills (SIGKILL) at several
points of a run and of its writes; bad --out, budgets and reader input. Each case ends in a
correct recovery or in one line naming the problem; no case loses a completed record or
reports success over lost data; resumption after a kill stays bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import trlib.experiments.results as results
import trlib.experiments.storage as storage
from trlib.experiments import load_data, load_runs, read_run, run
from trlib.experiments.__main__ import main
from trlib.experiments.results import RunFileError
from trlib.experiments.runner import BudgetWarning
from trlib.experiments.storage import CheckpointError, RunLock, RunLockedError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RID = "mnist_mlp__tr_rms__digits__seed0"
SETTINGS = {"radius": 0.05, "eval_every": 0.5, "batch_size": 512}  # 3 TR steps per epoch on the 1,437 digits
fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child process (POSIX only)")


@pytest.fixture(scope="module")
def digits():
    return load_data("mnist_mlp", "stand-in", verbose=False)


def go(budget, digits, method="tr_rms", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("verbose", False)
    kw.setdefault("overrides", SETTINGS)
    return run("mnist_mlp", method, 0, budget, datasets=digits, **kw)


def without_time(log):
    return [{k: v for k, v in r.items() if k != "time"} for r in log]


@pytest.fixture(scope="module")
def reference(digits):
    """The uninterrupted 4-epoch run every recovery must reproduce."""
    return without_time(go("4epochs", digits))


def cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def in_child(body, timeout=120):
    """Run ``body()`` in a forked process; return its exit status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            body()
        except BaseException:  # noqa: BLE001 - reported through the exit status
            code = 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the child process hung")
        time.sleep(0.02)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def temporaries(folder):
    return sorted(p.name for p in Path(folder).rglob("*.tmp"))


# --- kills at several points --------------------------------------------------------------

@fork_only
def test_kills_at_every_point_of_a_write_then_resume_is_bit_for_bit(tmp_path, digits, reference, monkeypatch):
    out = tmp_path / "runs"
    real_replace, real_write = os.replace, results.atomic_write

    def killed(point, at):
        """A child that trains toward 4 epochs and is SIGKILLed at ``point`` of its ``at``-th save."""
        def body():
            saves = {"pt": 0, "jsonl": 0}

            def replace(src, dst):
                if str(dst).endswith(".pt"):
                    saves["pt"] += 1
                    if point == "checkpoint not renamed" and saves["pt"] == at:
                        die()  # the checkpoint's temporary file is complete, the rename never happens
                return real_replace(src, dst)

            def write(path, data):
                saves["jsonl"] += 1
                if saves["jsonl"] == at and point == "results half written":
                    with open(storage.temporary_path(Path(path)), "wb") as f:
                        f.write(data[: len(data) // 2])
                    die()
                if saves["jsonl"] == at and point == "between the two files":
                    die()  # the checkpoint is new, the results file still the previous epoch's
                return real_write(path, data)

            monkeypatch.setattr(os, "replace", replace)
            monkeypatch.setattr(results, "atomic_write", write)
            hook = (lambda info: die() if info["steps"] == at else None) if point == "step" else None
            go("4epochs", digits, out=out, on_step=hook)
        return in_child(body)

    def epochs_in(name):
        return (load_checkpoint(out / "checkpoints" / f"{RID}.pt")["state"]["epochs_done"] if name == "checkpoint"
                else read_run(out / f"{RID}.jsonl").provenance["budget_spent"]["epochs"])

    # epoch 2's checkpoint is complete in its temporary file when the kill comes
    assert killed("checkpoint not renamed", 2) == -signal.SIGKILL
    (stray,) = temporaries(out)
    assert stray.startswith(f".{RID}.pt.") and (epochs_in("checkpoint"), epochs_in("results")) == (1, 1.0)
    # resumed; epoch 2's results file is half written when the kill comes
    assert killed("results half written", 1) == -signal.SIGKILL
    (stray,) = temporaries(out)  # the old stray went (under the run's lock), a new one came
    assert stray.startswith(f".{RID}.jsonl.") and (epochs_in("checkpoint"), epochs_in("results")) == (2, 1.0)
    # resumed; killed after epoch 3's checkpoint, before its results file
    assert killed("between the two files", 1) == -signal.SIGKILL
    assert temporaries(out) == [] and (epochs_in("checkpoint"), epochs_in("results")) == (3, 1.0)
    # resumed; killed in the middle of epoch 4: nothing written since epoch 3
    assert killed("step", 11) == -signal.SIGKILL
    assert (epochs_in("checkpoint"), epochs_in("results")) == (3, 1.0)
    resumed = go("4epochs", digits, out=out)
    assert without_time(resumed) == reference
    (r,) = load_runs(out)
    assert r.verified and without_time(r.records) == reference and r.provenance["status"] == "complete"
    assert len(r.provenance["sessions"]) == 4 and temporaries(out) == []


# --- concurrent writers ------------------------------------------------------------------------

@fork_only
def test_concurrent_writers_never_both_report_success(tmp_path, digits, capsys):
    out, flag = tmp_path / "runs", tmp_path / "locked"

    def first():  # trains with lr 0.05 and holds the run until the test lets it go
        def hook(info):
            if info["steps"] == 2:
                flag.touch()
                deadline = time.monotonic() + 60
                while flag.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
        run("mnist_mlp", "sgd", 0, "3epochs", out=out, datasets=digits, progress=False, verbose=False,
            overrides={"lr": 0.05}, on_step=hook)

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            first()
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    try:
        for _ in range(3000):
            if flag.exists():
                break
            time.sleep(0.02)
        assert flag.exists(), "the first writer never started"
        # the second writer, other settings, same run: skipped with the holder's name, exit status 1
        argv = ["run", "--task", "mnist_mlp", "--method", "sgd", "--budget", "3epochs", "--out", str(out),
                "--data", "stand-in", "--set", "lr=0.1", "--no-progress", "--threads", "1"]
        code, stdout, err = cli(argv, capsys)
        assert code == 1 and stdout == "" and f"skipped: the run mnist_mlp__sgd__digits__seed0 in {out} is being " \
            f"written by process {pid}" in err and "not run here" in err
        with pytest.raises(RunLockedError, match=f"process {pid}"):  # the same settings: also refused
            run("mnist_mlp", "sgd", 0, "3epochs", out=out, datasets=digits, progress=False, verbose=False,
                overrides={"lr": 0.05})
    finally:
        flag.unlink(missing_ok=True)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    (r,) = load_runs(out)
    assert r.verified and r.provenance["status"] == "complete" and r.provenance["config"]["lr"] == 0.05
    # started apart: the second is refused by the settings check, and the first's results stay
    code, _, err = cli(argv, capsys)
    assert code == 1 and "other settings (differing: lr)" in err
    assert load_runs(out)[0].records == r.records


def test_the_lock_is_released_on_exit_and_names_its_holder(tmp_path):
    path = tmp_path / "x.lock"
    with RunLock(path, "the run x"):
        with pytest.raises(RunLockedError, match=f"the run x is being written by process {os.getpid()} on "):
            RunLock(path, "the run x").__enter__()
    with RunLock(path, "the run x"):  # free again
        pass


# --- damaged results files -----------------------------------------------------------------------

def _drop_last_record(path):
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_digit(path):  # one bit of one number of the last record: still valid JSON
    data = bytearray(path.read_bytes())
    at = data.rindex(b'"train_loss": ') + len(b'"train_loss": ') + 3
    data[at] ^= 1
    path.write_bytes(bytes(data))


def _garbage(path):
    path.write_bytes(path.read_bytes().splitlines(keepends=True)[0] + os.urandom(300))


def _not_utf8(path):
    path.write_bytes(path.read_bytes() + b"\xff\xfe\x00 latin-1 \xe9\n")


def _foreign_records(path):
    head = path.read_bytes().splitlines(keepends=True)[0]
    path.write_bytes(head + b'{"epoch": 1, "loss": 0.5}\n')


def _another_runs_records(path):
    lines = path.read_text().splitlines(keepends=True)
    lines[-1] = lines[-1].replace('"seed": 0', '"seed": 7')
    path.write_text("".join(lines))


@pytest.mark.parametrize("damage,message", [
    (_drop_last_record, r"6 records, but its provenance says the run wrote 7 \(a record was removed"),
    (_cut_in_half, r"(not JSON|records, but its provenance says)"),
    (_flip_a_digit, "do not match the checksum in its provenance"),
    (_garbage, r"(not JSON|not UTF-8)"),
    (_not_utf8, r"not a run file: not UTF-8 text \(invalid start byte at byte \d+\)"),
    (_foreign_records, r":2: not a record of a run \(no 'task'\)"),
    (_another_runs_records, r":8: a record of another run \(seed 7, the provenance says 0\)"),
])
def test_a_damaged_results_file_is_refused_by_name_and_rebuilt_by_a_rerun(tmp_path, digits, capsys, damage,
                                                                          message):
    log = go("3epochs", digits, method="sgd", out=tmp_path, overrides={"eval_every": 0.5})
    path = tmp_path / "mnist_mlp__sgd__digits__seed0.jsonl"
    good = read_run(path).records
    assert len(good) == 7 and good == log  # JSON keeps every number exactly
    damage(path)
    with pytest.raises(RunFileError, match=message) as err:
        read_run(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    for argv in (["table", "--in", str(tmp_path)], ["plot", "--in", str(tmp_path), "--out", str(tmp_path / "f.png")]):
        code, stdout, stderr = cli(argv, capsys)  # refused, not summarised from a stale file
        assert code == 1 and stdout == "" and stderr.startswith(f"error: {path}") and not (tmp_path / "f.png").exists()
    assert go("3epochs", digits, method="sgd", out=tmp_path, overrides={"eval_every": 0.5}) == log  # rerun it
    (r,) = load_runs(tmp_path)
    assert r.verified and r.records == good and len(r.provenance["sessions"]) == 2


# --- damaged checkpoints ---------------------------------------------------------------------------

def _flip_a_bit(path, where):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


CHECKPOINT_DAMAGE = {
    "bit flipped in the weights": (lambda p: _flip_a_bit(p, 0.5), "do not match their SHA-256 checksum"),
    "bit flipped near the end": (lambda p: _flip_a_bit(p, 0.97), "do not match their SHA-256 checksum"),
    "cut in half": (_cut_in_half, "was cut short"),
    "random bytes": (lambda p: p.write_bytes(os.urandom(4096)), "not a trlib checkpoint"),
    "empty": (lambda p: p.write_bytes(b""), ": empty"),
    "foreign torch.save": (lambda p: torch.save({"model": {}, "step": 3}, p), "not a trlib checkpoint"),
    "foreign dict, checksummed": (lambda p: save_checkpoint(p, {"model": {}}), "not a checkpoint of a run"),
    "a folder": (lambda p: (p.unlink(), p.mkdir()), "is a folder, where the run's file belongs; move it away"),
}


def interrupt_at(step):
    def hook(info):
        if info["steps"] == step:
            raise KeyboardInterrupt
    return hook


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_ends_in_one_line_offering_fresh(tmp_path, digits, reference, capsys, case):
    damage, message = CHECKPOINT_DAMAGE[case]
    with pytest.raises(KeyboardInterrupt):  # an unfinished run: Ctrl-C in epoch 2 of 4
        go("4epochs", digits, out=tmp_path, on_step=interrupt_at(4))
    path, results_file = tmp_path / "checkpoints" / f"{RID}.pt", tmp_path / f"{RID}.jsonl"
    before = results_file.read_bytes()
    damage(path)
    with pytest.raises(ValueError) as err:
        go("4epochs", digits, out=tmp_path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text
    assert ("--fresh" in text) != (case == "a folder")  # --fresh cannot remove a folder: move it away
    argv = ["run", "--task", "mnist_mlp", "--method", "tr_rms", "--budget", "4epochs", "--out", str(tmp_path),
            "--data", "stand-in", "--no-progress", "--set", "radius=0.05", "eval_every=0.5", "batch_size=512"]
    code, stdout, stderr = cli(argv, capsys)
    assert code == 1 and stdout == "" and len(stderr.strip().splitlines()) == 2  # the data note and the error
    assert stderr.strip().splitlines()[-1].startswith("error: ") and message in stderr
    assert results_file.read_bytes() == before  # the completed records are untouched
    if case != "a folder":
        assert without_time(go("4epochs", digits, out=tmp_path, fresh=True)) == reference


def test_a_finished_run_without_a_usable_checkpoint_is_returned_from_its_results(tmp_path, digits, capsys):
    log = go("2epochs", digits, out=tmp_path)
    path = tmp_path / "checkpoints" / f"{RID}.pt"
    _flip_a_bit(path, 0.5)
    assert go("2epochs", digits, out=tmp_path, verbose=True) == log  # nothing to train: the results are the run
    assert "do not match their SHA-256 checksum" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="cannot be continued.*--fresh.*which holds 5 records"):
        go("3epochs", digits, out=tmp_path)  # a larger budget needs the weights
    path.unlink()  # e.g. checkpoints/ deleted to save space
    assert go("1epochs", digits, out=tmp_path) == log
    with pytest.raises(CheckpointError, match="missing"):
        go("3epochs", digits, out=tmp_path)
    with pytest.raises(ValueError, match="other settings .differing: radius"):
        go("2epochs", digits, out=tmp_path, overrides=dict(SETTINGS, radius=0.1))
    assert load_runs(tmp_path)[0].records == log


def test_results_ahead_of_their_checkpoint_are_not_overwritten(tmp_path, digits):
    go("1epochs", digits, out=tmp_path)
    old = (tmp_path / "checkpoints" / f"{RID}.pt").read_bytes()
    go("3epochs", digits, out=tmp_path)
    (tmp_path / "checkpoints" / f"{RID}.pt").write_bytes(old)  # an older checkpoint put back
    before = (tmp_path / f"{RID}.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match="holds records that its checkpoint .* does not"):
        go("4epochs", digits, out=tmp_path)
    assert (tmp_path / f"{RID}.jsonl").read_bytes() == before


# --- provenance of reruns -------------------------------------------------------------------------

def test_a_smaller_rerun_warns_and_leaves_the_run_and_its_budget_alone(tmp_path, digits, capsys):
    log = go("3epochs", digits, out=tmp_path)
    with pytest.warns(BudgetWarning, match=r"already spent 3 epochs, more than the budget 1epochs.*\(3epochs\)"):
        assert go("1epochs", digits, out=tmp_path) == log
    (r,) = load_runs(tmp_path)
    p = r.provenance
    assert r.records == log and p["budget"] == "3epochs" and p["status"] == "complete"
    assert [s["budget"] for s in p["sessions"]] == ["3epochs", "1epochs"]
    code, _, err = cli(["run", "--task", "mnist_mlp", "--method", "tr_rms", "--budget", "5backprops", "--out",
                        str(tmp_path), "--data", "stand-in", "--set", "radius=0.05", "eval_every=0.5", "batch_size=512",
                        "--no-progress"], capsys)
    assert code == 0 and "warning: mnist_mlp__tr_rms__digits__seed0 has already spent" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        assert go("3epochs", digits, out=tmp_path) == log  # the same budget again: no warning
    # an interrupted run keeps its status and budget when a rerun asks for less than it spent
    with pytest.raises(KeyboardInterrupt):
        go("5epochs", digits, out=tmp_path / "b", on_step=interrupt_at(7))
    with pytest.warns(BudgetWarning):
        go("1epochs", digits, out=tmp_path / "b")
    p = load_runs(tmp_path / "b")[0].provenance
    assert (p["status"], p["budget"]) == ("interrupted", "5epochs")
    larger = go("4epochs", digits, out=tmp_path)  # a larger budget continues, and is then the run's
    assert larger[: len(log)] == log and read_run(tmp_path / f"{RID}.jsonl").provenance["budget"] == "4epochs"


# --- bad input: --out, budgets, the reader, plot --out, start-up ------------------------------------

def test_bad_out_is_refused_before_any_training(tmp_path, digits, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["run", "--task", "mnist_mlp", "--method", "sgd", "--budget", "1epochs", "--data", "stand-in"]
    for out, message in ((afile, "is a file, not a folder"), (afile / "sub", "cannot create the output folder"),
                         (Path("/proc/trlib-cannot-be-here"), "cannot create the output folder")):
        with pytest.raises(SystemExit) as exc:
            main(base + ["--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--out: " in err and message in err and "Traceback" not in err
    (tmp_path / "runs" / "mnist_mlp__sgd__digits__seed0.jsonl").mkdir(parents=True)  # the results path is a folder
    steps = []
    with pytest.raises(ValueError, match="mnist_mlp__sgd__digits__seed0.jsonl is a folder"):
        run("mnist_mlp", "sgd", 0, "1epochs", out=tmp_path / "runs", datasets=digits, progress=False,
            verbose=False, on_step=steps.append)
    assert steps == []  # refused before the first step, not after an epoch
    code, _, err = cli(base + ["--out", str(tmp_path / "runs")], capsys)
    assert code == 1 and "is a folder" in err


@pytest.mark.parametrize("budget,message", [("1e400epochs", "too large"), ("1e400backprops", "too large"),
                                            ("inf epochs", "invalid budget"), ("nanepochs", "invalid budget")])
def test_budgets_that_cannot_be_spent_are_refused(budget, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--task", "mnist_mlp", "--method", "sgd", "--budget", budget, "--out", "unused"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    with pytest.raises(ValueError, match="invalid budget"):
        run("mnist_mlp", "sgd", 0, budget)


def test_plot_out_must_name_an_image_file(tmp_path, digits, capsys):
    go("1epochs", digits, method="sgd", out=tmp_path / "runs", overrides={})
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "fig", "give the image's file name")):
        with pytest.raises(SystemExit) as exc:
            main(["plot", "--in", str(tmp_path / "runs"), "--out", str(out)])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "fig.png").exists()
    code, stdout, _ = cli(["plot", "--in", str(tmp_path / "runs"), "--out", str(tmp_path / "fig.svg")], capsys)
    assert code == 0 and stdout == f"wrote {tmp_path / 'fig.svg'}\n" and (tmp_path / "fig.svg").is_file()


def test_ctrl_c_during_start_up_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "trlib.experiments", "run", "--task", "mnist_mlp", "--method",
                             "sgd", "--quick", "--budget", "1000epochs", "--out", str(tmp_path)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
    if not maps.exists():  # no /proc: torch takes seconds to import
        time.sleep(1.0)
    while time.monotonic() < deadline:  # wait until it imports torch (in trlib/__init__), however loaded the CPU
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            break
        time.sleep(0.01)
    # A signal that lands inside a third-party import can be swallowed by its bare ``except``
    # (seen under load): the user presses Ctrl-C again, so does the test, a few times.
    for _ in range(6):
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode in (-signal.SIGINT, 130) and "Traceback" not in err and "interrupted" in err
    # a starved test process may signal after start-up: then the runner's own message, which
    # keeps the run (the long budget guarantees the run is still going); at start-up, no file
    if err.strip() == "interrupted":
        assert not list(tmp_path.glob("*.jsonl"))
    else:
        assert "Run the same command again to resume" in err


def test_missing_extras_are_named_with_the_install_command(tmp_path):
    # the library-only install: no scikit-learn, no matplotlib (blocked in a fresh interpreter)
    script = f"""
import sys
sys.modules["sklearn"] = None
sys.modules["matplotlib"] = None
from trlib.experiments.__main__ import main
print("run", main(["run", "--task", "mnist_mlp", "--method", "sgd", "--quick", "--out", {str(tmp_path / 'r')!r}]))
print("plot", main(["plot", "--in", {str(ROOT / 'tests')!r}, "--out", {str(tmp_path / 'f.png')!r}]))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["run", "1", "plot", "1"], done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == ['error: the offline stand-in datasets need the package scikit-learn, which is not installed: '
                     'pip install "trlib-torch[data]"',
                     'error: figures need the package matplotlib, which is not installed: '
                     'pip install "trlib-torch[plot]"']


def test_checkpoint_header_and_lock_file_contents(tmp_path, digits):
    go("1epochs", digits, out=tmp_path)
    data = (tmp_path / "checkpoints" / f"{RID}.pt").read_bytes()
    header = json.loads(data.split(b"\n")[1])
    assert data.startswith(b"TRLIB-CHECKPOINT\n") and header["bytes"] == len(data.split(b"\n", 2)[2])
    assert (tmp_path / "checkpoints" / f"{RID}.lock").read_text() == ""  # released: no holder named
