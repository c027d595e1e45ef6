"""Shared pieces of the launch/ entry points: config flags and the error boundary."""

from __future__ import annotations

import argparse
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
    normally (mpi4py finalizes MPI at exit, which mpirun requires).
    """
    try:
        main()
    except SystemExit:
        raise
    except UserError as e:  # the message says what to change; a traceback would only hide it
        print(f"{_rank_label()}error: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    except BaseException as e:  # noqa: BLE001 - the process ends here; the traceback is printed
        traceback.print_exc()
        print(f"{_rank_label()}error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
