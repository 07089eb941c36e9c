"""Start-up of trlib's command line: a Ctrl-C while torch is still loading ends in one line.

``python -m trlib.experiments`` imports :mod:`trlib` (and so torch, a few seconds) before its
own code can run, so only ``trlib/__init__`` can catch an interrupt that early.
"""

import sys

_COMMANDS = ("trlib.experiments",)


def started_as_command() -> bool:
    """Whether this interpreter was started as ``python [options] -m trlib.experiments ...``.

    >>> started_as_command()
    False
    """
    argv = list(getattr(sys, "orig_argv", ()))
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] in _COMMANDS


def quiet_interrupts() -> None:
    """When started as trlib's command line: an uncaught KeyboardInterrupt prints one line
    (``interrupted``) instead of a traceback; other exceptions go to the previous hook."""
    if not started_as_command():
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print("\ninterrupted", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    sys.excepthook = hook
