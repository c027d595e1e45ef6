"""The Engine's own thread, and the thread-safe bridge the asyncio server talks to it through.

    bridge = EngineLoop(engine, metrics, max_queued=256)
    bridge.start(asyncio.get_running_loop())
    sink = asyncio.Queue()
    handle = bridge.submit(prompt_ids, params, sink, tag=0)   # from the event loop; returns at once
    tag, item = await sink.get()    # a RequestOutput per step that moved it (the last one finished), or an
                                    # exception: UserError (refused), EngineDeadError (the engine failed)
    bridge.abort(handle)            # e.g. the client went away: its blocks are freed at the next step
    bridge.stop(); bridge.join()    # when the server closes: the engine sends the workers STOP

Engine methods are single-threaded: only this thread calls them. The event loop puts commands on
a queue.SimpleQueue (thread-safe, never blocks); this thread hands each step's outputs back with
one call_soon_threadsafe per step. Idle, it blocks on the command queue (the Engine's heartbeat
thread keeps the other ranks waiting), waking every POLL_S to notice a rank lost while idle.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from polar_dist.engine.engine import Engine, EngineDeadError
from polar_dist.engine.sampling import SamplingParams
from polar_dist.errors import UserError
from polar_dist.log import get_logger
from polar_dist.server.metrics import ServerMetrics

log = get_logger(__name__)

POLL_S = 0.25  # how often an idle engine thread checks the engine's health


@dataclass(eq=False)
class Handle:
    """One engine request as the server sees it."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: asyncio.Queue
    tag: int  # the caller's name for it (a choice index)
    submitted_at: float = field(default_factory=time.monotonic)
    request_id: int | None = None  # the engine's id, set by the engine thread
    done: bool = False


class EngineLoop:
    def __init__(self, engine: Engine, metrics: ServerMetrics, max_queued: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queued = max_queued
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._live: dict[int, Handle] = {}  # engine request id -> handle (engine thread only)
        self._counts_lock = threading.Lock()
        self._not_taken = 0  # submitted, not yet added to the engine
        self._unfinished = 0  # submitted, not yet finished
        self._waiting = 0  # in the engine's queue after the last step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="polar-engine", daemon=True)
        self._aio: asyncio.AbstractEventLoop | None = None
        self.failure: BaseException | None = None
        num_blocks = engine.scheduler.allocator.num_blocks
        metrics.kv_blocks_total.set(num_blocks)
        metrics.kv_blocks_used.set(0)
        metrics.attention_density.set(1.0)  # until a decode step says otherwise

    # ---- the event loop's side -----------------------------------------------------------

    def start(self, aio: asyncio.AbstractEventLoop) -> None:
        self._aio = aio
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.failure is None and self.engine.failure is None and self._thread.is_alive()

    @property
    def num_unfinished(self) -> int:
        """Engine requests submitted and not yet finished."""
        return self._unfinished

    def room(self) -> int:
        """How many more engine requests may queue for a batch slot (server.max_queued_requests)."""
        with self._counts_lock:
            return self.max_queued - self._not_taken - self._waiting

    @property
    def max_seq_len(self) -> int:
        return self.engine.scheduler.max_seq_len  # fixed at start: safe from any thread

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: asyncio.Queue, tag: int) -> Handle:
        if not self.healthy or self._stop.is_set():
            raise EngineDeadError("the engine is not serving (failed or shutting down)")
        handle = Handle(prompt_ids, params, sink, tag)
        with self._counts_lock:
            self._not_taken += 1
            self._unfinished += 1
        self._inbox.put(("add", handle))
        return handle

    def abort(self, handle: Handle) -> None:
        if not handle.done:
            self._inbox.put(("abort", handle))

    def stop(self) -> None:
        """Finish: the thread aborts what is left, shuts the engine down (STOP to the workers) and ends."""
        self._stop.set()
        self._inbox.put(("wake", None))

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._take_commands(block=not self.engine.has_unfinished())
                if self.engine.failure is not None:
                    raise EngineDeadError(f"the engine cannot serve: {self.engine.failure}")
                if self._stop.is_set():
                    for h in list(self._live.values()):
                        self.engine.abort(h.request_id)  # type: ignore[arg-type]
                    while self.engine.has_unfinished():
                        self._step()
                    break
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as e:  # noqa: BLE001 - every request is told, then the server reports it
            self.failure = e
            log.error("the engine failed: %s: %s; answering 503 from now on", type(e).__name__, e)
            self._fail_all(e)
        finally:
            self.engine.shutdown(failed=self.failure is not None)

    def _take_commands(self, block: bool) -> None:
        while True:
            try:
                kind, handle = self._inbox.get(timeout=POLL_S) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self._add(handle)
            elif kind == "abort" and handle.request_id is not None and not handle.done:
                self.engine.abort(handle.request_id)

    def _add(self, handle: Handle) -> None:
        with self._counts_lock:
            self._not_taken -= 1
            self._waiting += 1  # in the engine's queue until a step admits it (then recounted)
        try:
            handle.request_id = self.engine.add_request(handle.prompt_ids, handle.params)
        except UserError as e:  # validated before, so only a limit that changed since
            self._finish(handle)
            self._deliver([(handle, e)])
            return
        self._live[handle.request_id] = handle

    def _step(self) -> None:
        t0 = time.perf_counter()
        outputs = self.engine.step()
        self.metrics.step_seconds.observe(time.perf_counter() - t0)
        batch: list[tuple[Handle, Any]] = []
        for out in outputs:
            handle = self._live.get(out.request_id)
            if handle is None:
                continue
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            if out.finished:
                del self._live[out.request_id]
                self._finish(handle)
                self.metrics.engine_requests.inc(finish_reason=out.finish_reason or "")
            batch.append((handle, out))
        sched = self.engine.scheduler
        with self._counts_lock:
            self._waiting = len(sched.waiting)
        self.metrics.queue_depth.set(len(sched.waiting))
        self.metrics.running.set(len(sched.running))
        self.metrics.preemptions.mirror(sched.num_preemptions)
        self.metrics.kv_blocks_used.set(sched.allocator.num_blocks - sched.allocator.num_free)
        reads, dense = self.engine.decode_group_reads, self.engine.decode_group_reads_dense
        self.metrics.attention_group_reads.mirror(reads)
        self.metrics.attention_group_reads_dense.mirror(dense)
        if dense:
            self.metrics.attention_density.set(reads / dense)
        self._deliver(batch)

    def _finish(self, handle: Handle) -> None:
        handle.done = True
        with self._counts_lock:
            self._unfinished -= 1

    def _fail_all(self, error: BaseException) -> None:
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(
            f"the engine failed: {type(error).__name__}: {error}")
        batch = [(h, dead) for h in self._live.values()]
        for h in self._live.values():
            self._finish(h)
        self._live.clear()
        while True:  # requests that never reached the engine
            try:
                kind, handle = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                with self._counts_lock:
                    self._not_taken -= 1
                self._finish(handle)
                batch.append((handle, dead))
        self._deliver(batch)

    def _deliver(self, batch: list[tuple[Handle, Any]]) -> None:
        if not batch or self._aio is None:
            return
        try:
            self._aio.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass


def _put_all(batch: list[tuple[Handle, Any]]) -> None:
    for handle, item in batch:
        handle.sink.put_nowait((handle.tag, item))

