"""Test harness: run the ``apollo`` CLI and SIGKILL the process at a chosen point.

``python tests/killer.py step N -- ARGS``: die when optimizer step N starts (after any growth at N);
``python tests/killer.py save N -- ARGS``: die in the middle of writing the checkpoint of step N;
``python tests/killer.py term N -- ARGS``: send itself SIGTERM (a real signal) when optimizer step N starts;
``python tests/killer.py again N -- ARGS``: die the second time a step N starts (in a compare's second method);
``python tests/killer.py operator N -- ARGS``: die when LiGO's operator step N starts.
Kills come from the process itself, so they land at exact, reproducible points.
"""

import os
import signal
import sys

import apollo.runtime.checkpoint
import apollo.runtime.train
from apollo.cli import main


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_step(n: int, die=_die, times: int = 1) -> None:
    lr_at = apollo.runtime.train.lr_at
    seen = []

    def patched(step, *args):
        if step == n:
            seen.append(step)
            if len(seen) == times:
                die()
        return lr_at(step, *args)

    apollo.runtime.train.lr_at = patched


def _kill_in_operator(n: int) -> None:
    operator_loss = apollo.runtime.train.operator_loss
    calls = []

    def patched(*args):
        if len(calls) == n:  # the process's (n+1)-th operator step: step n of a run that starts at 0
            _die()
        calls.append(1)
        return operator_loss(*args)

    apollo.runtime.train.operator_loss = patched


def _kill_in_save(n: int) -> None:
    save = apollo.runtime.checkpoint.torch.save

    def patched(obj, path, *args, **kwargs):  # optimizer.pt is written; state.pt is where it dies
        if path.name == "state.pt" and obj["step"] == n:
            path.write_bytes(b"partial")
            _die()
        return save(obj, path, *args, **kwargs)

    apollo.runtime.checkpoint.torch.save = patched


if __name__ == "__main__":
    kind, n, sep, *argv = sys.argv[1:]
    assert sep == "--"
    term = lambda n: _kill_at_step(n, lambda: os.kill(os.getpid(), signal.SIGTERM))  # noqa: E731
    again = lambda n: _kill_at_step(n, times=2)  # noqa: E731
    kinds = {"step": _kill_at_step, "save": _kill_in_save, "term": term, "again": again, "operator": _kill_in_operator}
    kinds[kind](int(n))
    sys.exit(main(argv))
