"""Rank-aware logging: records are prefixed `[tp r/N]`; only rank 0 logs unless
POLAR_LOG_ALL_RANKS is set."""

from __future__ import annotations

import logging
import sys

from polar_dist import envs


def configure_logging(rank: int, world_size: int, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[tp {rank}/{world_size}] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("polar_dist")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 or envs.LOG_ALL_RANKS.get() else logging.WARNING)
    root.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
