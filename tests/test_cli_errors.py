"""At the launch boundary a UserError prints one line and exits 2; any other exception is a bug
and keeps its traceback (exit 1)."""

from __future__ import annotations

import signal
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


def _start(body: str) -> subprocess.Popen:
    code = "import sys, time\nfrom polar_dist.cli import run_main\ndef main():\n" + body + "run_main(main)\n"
    # SIGINT back to its default in the child: a shell that starts a job in the background ignores
    # it, and Python then never installs its KeyboardInterrupt handler.
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_exits_130_with_one_line() -> None:
    proc = _start("    print('started', flush=True)\n    time.sleep(60)\n")
    assert proc.stdout.readline() == "started\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.strip() == "interrupted"


def test_closed_stdout_ends_quietly() -> None:
    proc = _start("    for i in range(1_000_000):\n        print(i, flush=True)\n")
    assert proc.stdout.readline() == "0\n"
    proc.stdout.close()  # the reader goes away, as with `| head -1`
    err = proc.stderr.read()
    proc.wait(timeout=30)
    assert proc.returncode == 1
    assert err == ""


def test_broken_pipe_elsewhere_keeps_its_traceback() -> None:
    proc = _start("    raise BrokenPipeError(32, 'Broken pipe')\n")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in err and "BrokenPipeError" in err
