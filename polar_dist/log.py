"""Rank-aware logging: records are prefixed `[tp r/N]` (`[dp i/R tp r/N]` with several
replicas); only each replica's tp rank 0 logs unless POLAR_LOG_ALL_RANKS is set."""

from __future__ import annotations

import logging
import sys

from polar_dist import envs


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (as logging.lastResort does), so
    a handler made while stderr was redirected (pytest's capture) never writes to a closed stream."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


def configure_logging(rank: int, world_size: int, replica: int = 0, num_replicas: int = 1,
                      level: int = logging.INFO) -> None:
    """`rank` / `world_size`: the tp rank and size (the global ones before the layout is known)."""
    handler = _StderrHandler()
    where = f"dp {replica}/{num_replicas} tp {rank}/{world_size}" if num_replicas > 1 else f"tp {rank}/{world_size}"
    handler.setFormatter(logging.Formatter(f"[{where}] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("polar_dist")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 or envs.LOG_ALL_RANKS.get() else logging.WARNING)
    root.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def is_configured() -> bool:
    """Whether configure_logging has run in this process."""
    return bool(logging.getLogger("polar_dist").handlers)
