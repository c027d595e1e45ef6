"""Failures injected into chosen requests' steps, for tests of failure isolation
(POLAR_INJECT_FAULT; unset in normal runs, when nothing here runs).

    POLAR_INJECT_FAULT="raise:70,65,73,76"   # sampling a step that holds such a request raises
    POLAR_INJECT_FAULT="nan:70,65,73,76"     # such a request's logits become NaN

A request is chosen when its prompt holds the comma-separated token-id run (with the byte
tokenizer, the bytes of a marker word). "raise" makes the step's sampling raise as long as one
chosen row is in it, as a bug tied to one request's parameters would: the engine then samples
row by row and fails only the chosen requests. "nan" poisons the chosen rows' logits, as a
damaged weight or an overflow would: the sampler's non-finite check fails those requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from polar_dist import envs
from polar_dist.engine.sampling import SampleRow
from polar_dist.errors import UserError


class InjectedFault(RuntimeError):
    """The failure POLAR_INJECT_FAULT asked for."""


@dataclass(frozen=True)
class FaultInjector:
    kind: str  # "raise" | "nan"
    marker: tuple[int, ...]  # the token-id run that chooses a request

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        raw = envs.INJECT_FAULT.get()
        if not raw:
            return None
        kind, _, ids = raw.partition(":")
        try:
            marker = tuple(int(t) for t in ids.split(","))
        except ValueError:
            marker = ()
        if kind not in ("raise", "nan") or not marker:
            raise UserError(f"{envs.INJECT_FAULT.name}={raw!r} must be raise:<ids> or nan:<ids>, <ids> a "
                            "comma-separated token-id run, e.g. raise:70,65,73,76")
        return cls(kind, marker)

    def chosen(self, row: SampleRow) -> bool:
        ids, m = row.prompt_ids, self.marker
        return any(tuple(ids[i:i + len(m)]) == m for i in range(len(ids) - len(m) + 1))

    def before_sampling(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
        """logits (R + P, V), the R sampled rows first: poisons or raises for the chosen rows."""
        hit = [i for i, r in enumerate(rows) if self.chosen(r)]
        if not hit:
            return
        if self.kind == "raise":
            raise InjectedFault(f"injected by {envs.INJECT_FAULT.name} for a request of this step")
        with torch.inference_mode():  # the logits are inference tensors
            logits[hit] = float("nan")
