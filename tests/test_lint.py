"""The code base stays ruff-clean: lint and format are part of the test suite (and so of CI)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    # ruff (part of the test extra) from the interpreter running the tests, whatever PATH says
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    result = ruff("check", "graft", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = ruff("format", "--check", "graft", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr
