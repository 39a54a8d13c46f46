"""Static checks as tests: mypy against pulumi-aws's type hints, and ruff, on the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False)


def test_mypy_is_clean_on_infra() -> None:
    result = run("mypy", "infra/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_ruff_is_clean() -> None:
    result = run("ruff", "check", "infra", "tests", "scripts", "policy", "images", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr
