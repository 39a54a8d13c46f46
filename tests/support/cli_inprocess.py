"""Run the ``vllm-fleet`` CLI in this process, as ``main()`` runs it for users: the same error
handling (one line on stderr, exit 2), without paying a Python start-up per case.

An exception ``main()`` does not turn into an exit status propagates out of ``run_cli``: in a
test that is a failure, exactly as a traceback would be for a user.
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.cli.app import main


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


def run_cli(*args: str | Path) -> CliRun:
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["vllm-fleet", *map(str, args)]
    code = 0
    old_argv = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = old_argv
    return CliRun(code, stdout.getvalue(), stderr.getvalue())


def assert_refused(run: CliRun, *needles: str) -> str:
    """Exit 2 with exactly one error line that contains every needle; returns the line."""
    assert run.code == 2, (run.code, run.stdout[-2000:], run.stderr)
    lines = run.error_lines
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("vllm-fleet: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
