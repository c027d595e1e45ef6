"""One API request in flight: its engine requests, their text as it arrives, stop strings, and
the abort of whatever is left when the request ends early (client gone, error, server closing).

    gen = Generation(bridge, tokenizer, job, metrics, disconnected=request.is_disconnected)
    gen.start()                                  # EngineDeadError: the engine cannot serve (503)
    async for delta in gen.deltas():             # a Delta per choice and step with something new
        ...
    gen.usage()                                  # (prompt tokens, completion tokens)

Every engine request of the request shares one asyncio.Queue, tagged with its choice index.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from polar_dist.engine.engine import EngineDeadError, RequestOutput
from polar_dist.engine.sampling import TokenLogprobs
from polar_dist.models.tokenizer import Tokenizer
from polar_dist.server.detokenize import IncrementalDetokenizer, StopStrings
from polar_dist.server.engine_loop import EngineLoop, Handle
from polar_dist.server.metrics import ServerMetrics
from polar_dist.server.prepare import Job

WAIT_S = 0.5  # how often a waiting request checks its client and the engine


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


class RequestFailed(Exception):
    """One of the request's choices failed in the engine (finish reason "error"); the engine and
    the other requests go on."""


@dataclass
class Delta:
    index: int  # the choice
    text: str
    token_ids: list[int]  # the tokens this step generated (text may lag them: see detokenize.py)
    logprobs: list[TokenLogprobs] | None  # per token of token_ids, when asked
    finish_reason: str | None
    prompt_logprobs: list[TokenLogprobs] | None = None  # once, with the choice's first delta, when asked


@dataclass
class _ChoiceState:
    handle: Handle
    detok: IncrementalDetokenizer
    stops: StopStrings
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Generation:
    def __init__(self, bridge: EngineLoop, tokenizer: Tokenizer, job: Job, metrics: ServerMetrics,
                 disconnected: Callable[[], Awaitable[bool]], arrived_at: float | None = None) -> None:
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.job = job
        self.metrics = metrics
        self.disconnected = disconnected
        self.arrived_at = time.monotonic() if arrived_at is None else arrived_at
        self.sink: asyncio.Queue = asyncio.Queue()
        self.choices: list[_ChoiceState] = []
        self._first_token = False
        self._next_check = time.monotonic() + WAIT_S

    def start(self) -> None:
        for c in self.job.choices:
            handle = self.bridge.submit(self.job.prompts[c.prompt_index], c.params, self.sink, c.index)
            detok = IncrementalDetokenizer(self.tokenizer)
            self.choices.append(_ChoiceState(handle, detok, StopStrings(self.job.stop)))

    def usage(self) -> tuple[int, int]:
        return sum(len(p) for p in self.job.prompts), sum(len(c.token_ids) for c in self.choices)

    def abort(self) -> None:
        for c in self.choices:
            if c.finish_reason is None:
                self.bridge.abort(c.handle)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Deltas until every choice finished. Raises ClientGone, UserError (the engine refused a
        prompt), RequestFailed or EngineDeadError; whatever ends it early aborts the unfinished
        choices."""
        try:
            while any(c.finish_reason is None for c in self.choices):
                index, item = await self._next()
                if isinstance(item, BaseException):
                    raise item
                delta = self._apply(self.choices[index], index, item)
                if delta is not None:
                    yield delta
        finally:
            self.abort()

    async def _next(self) -> tuple[int, RequestOutput | BaseException]:
        while True:
            now = time.monotonic()
            if now >= self._next_check:  # also while tokens stream in: a busy request must notice too
                self._next_check = now + WAIT_S
                if await self.disconnected():
                    raise ClientGone()
                if not self.bridge.healthy and self.sink.empty():
                    raise EngineDeadError(f"the engine failed: {self.bridge.failure or self.bridge.engine.failure}")
            try:
                return await asyncio.wait_for(self.sink.get(), WAIT_S)
            except asyncio.TimeoutError:
                continue

    def _apply(self, c: _ChoiceState, index: int, out: RequestOutput) -> Delta | None:
        if c.finish_reason is not None:
            return None  # e.g. the abort that follows a stop string
        if out.finish_reason == "error":
            c.finish_reason = "error"
            raise RequestFailed(f"choice {index} failed: {out.error or 'the engine gave no reason'}")
        if out.new_token_ids and not self._first_token:
            self._first_token = True
            self.metrics.ttft_seconds.observe(time.monotonic() - self.arrived_at)
        c.token_ids += out.new_token_ids
        text, stopped = c.stops.push(c.detok.push(out.new_token_ids))
        if stopped:
            c.finish_reason = "stop"
            self.bridge.abort(c.handle)
        elif out.finished:
            tail = c.stops.flush(c.detok.flush())
            text += tail
            c.finish_reason = "stop" if c.stops.stopped else out.finish_reason
        if not (text or out.new_token_ids or c.finish_reason or out.prompt_logprobs):
            return None
        return Delta(index, text, list(out.new_token_ids), out.logprobs, c.finish_reason, out.prompt_logprobs)

