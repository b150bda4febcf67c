"""Running the CLI in this process, many cases a second, with the guarantees of a subprocess run
that matter here: a time limit (a hang fails the case instead of the suite), stdout and stderr
captured, and the files a case leaves behind in its folder listed."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import CliResult

#: a case that takes longer has hung (the slowest refusal measured takes well under a second)
TIME_LIMIT_S = 20


class Hung(BaseException):
    """Raised by the alarm; a BaseException so the CLI's own error funnel cannot swallow it."""


@dataclass
class Outcome(CliResult):
    seconds: float
    left: list[str]  # names in the watched folder that were not there before (hidden ones included)


def _alarm(signum, frame):
    raise Hung(f"no answer within {TIME_LIMIT_S} s")


def run_in_process(*args, watch: Path | None = None, env: dict[str, str] | None = None) -> Outcome:
    """``ggraft *args`` through ``ggraft.cli.main.run``; ``watch``: a folder whose new entries are reported."""
    from ggraft.cli.main import run

    before = set(os.listdir(watch)) if watch else set()
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _environ(env or {}):
            code = run([str(a) for a in args])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    left = sorted(set(os.listdir(watch)) - before) if watch else []
    return Outcome(code, out.getvalue(), err.getvalue(), time.monotonic() - started, left)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def assert_refused(result: CliResult, *needles: str, codes: tuple[int, ...] = (2,)) -> None:
    """Exit in ``codes``, one ``Error:`` line first (then only ``Hint:``/``Warning:`` lines), no
    traceback, every needle in what was printed."""
    assert result.code in codes, (result.code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    if result.code == 1 and not errors:  # an incompatible pair: the findings are the data, on stdout
        printed = result.stdout
    else:
        assert len(errors) == 1, result.stderr
        assert all(ln.startswith(("Error: ", "Hint: ", "Warning: ")) for ln in lines), result.stderr
        printed = result.stderr
    for needle in needles:
        assert needle in printed, (needle, result.stdout, result.stderr)


def assert_accepted(result: CliResult) -> None:
    assert result.code == 0, (result.code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
