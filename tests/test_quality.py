"""Static checks as tests, so CI enforces them: ruff on everything, mypy strict on src/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_ruff_lint() -> None:
    proc = run("ruff", "check", "src", "tests", "bench", "fuzz")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format() -> None:
    proc = run("ruff", "format", "--check", "src", "tests", "bench", "fuzz")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict() -> None:
    proc = run("mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
