"""Shared pieces of the launch/ entry points: config flags, checked argument types, and the
error boundary."""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from typing import Callable

from polar_dist.config import RunConfig, load_config
from polar_dist.errors import UserError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML, e.g. configs/smollm2-135m.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override an existing config field, e.g. --set model.dtype=bfloat16 (repeatable)")
    # The deepspeed launcher passes --local_rank; the rank itself is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


# Argument types: argparse turns an ArgumentTypeError into "argument --flag: <message>" and
# exit 2, so a bad value stops the run before the model loads and the message names the flag.

def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def finite_float(text: str) -> float:
    return _number(text, float)


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def probability(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]; 1 disables it")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts


def seed(text: str) -> int:
    value = int(_number(text, int))
    if not SEED_MIN <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} does not fit in 64 bits; use an integer from 0 to {SEED_MAX}")
    return value


def utf8_text(text: str) -> str:
    """Text that encodes as UTF-8. Python decodes command-line bytes that are not UTF-8 to lone
    surrogates (surrogateescape); they would fail in the tokenizer, after the model loaded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape") if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
        what = f"the byte 0x{bad.hex()}" if bad else f"the code point U+{ord(text[e.start]):04X}"
        raise argparse.ArgumentTypeError(f"the text is not valid UTF-8 ({what} at character {e.start}); "
                                         "pass UTF-8 text (check the terminal's or file's encoding)") from None
    return text


def _rank_label() -> str:
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                               ("PMI_RANK", "PMI_SIZE")):
        if rank_var in os.environ:
            return f"[rank {os.environ[rank_var]}/{os.environ.get(size_var, '?')}] "
    return ""


def run_main(main: Callable[[], None]) -> None:
    """Run `main`; on any error print it (with the rank) and exit non-zero at once.

    On error `os._exit` skips interpreter teardown, where process-group destructors could wait
    on peers that are gone; the launcher then ends the remaining ranks. A normal return exits
    normally (mpi4py finalizes MPI at exit, which mpirun requires). Ctrl-C prints one line
    "interrupted" and exits 130 (128 + SIGINT, as shells do); a reader that closed stdout
    (`| head -1`) ends the run quietly.
    """
    try:
        main()
    except SystemExit:
        raise
    except UserError as e:  # the message says what to change; a traceback would only hide it
        print(f"{_rank_label()}error: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    except KeyboardInterrupt:
        _flush_stdout()
        print(f"{_rank_label()}interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    except BrokenPipeError as e:
        if _stdout_closed():
            # The Python docs' recipe (library/signal.html, "Note on SIGPIPE"): point stdout at
            # devnull so that no later flush raises again, then exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os._exit(1)
        _report_bug(e)  # a socket, not stdout: a real failure
    except BaseException as e:  # noqa: BLE001 - the process ends here; the traceback is printed
        _report_bug(e)


def _report_bug(e: BaseException) -> None:
    traceback.print_exc()
    print(f"{_rank_label()}error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    os._exit(1)


def _stdout_closed() -> bool:
    """True when stdout is a pipe or socket whose reader has gone (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() on this platform, or no stdout
        return False


def _flush_stdout() -> None:
    """Flush what was printed before an early exit (os._exit does not); a closed pipe loses it."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
