"""At the launch boundary a UserError prints one line and exits 2; any other exception is a bug
and keeps its traceback (exit 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(raise_stmt: str) -> subprocess.CompletedProcess:
    code = ("from polar_dist.cli import run_main\nfrom polar_dist.errors import UserError\n"
            f"def main():\n    {raise_stmt}\nrun_main(main)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_user_error_is_one_line() -> None:
    out = _run("raise UserError('engine.block_size = 3 must be a power of two; use 16')")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: engine.block_size = 3 must be a power of two; use 16"


@pytest.mark.parametrize("stmt", ["raise ValueError('k_max must be <= Hkv')", "raise KeyError('x')"])
def test_other_errors_keep_their_traceback(stmt: str) -> None:
    out = _run(stmt)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr and stmt.split("(")[0].split()[-1] in out.stderr
