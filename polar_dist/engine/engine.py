"""The long-lived engine on a replica's driver (its tp rank 0), and the loop its other ranks run beside it.

    engine = Engine(rt)                     # the driver; the other ranks call worker_loop(rt)
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():           # RequestOutput per request that moved this step
            ...
    engine.shutdown()                       # the workers leave worker_loop

Requests can be added and aborted between any two steps. A step schedules (polar_dist/engine/
scheduler.py), sends the workers its delta (one small int64 message, through shared memory
between ranks of one machine: polar_dist/engine/control.py), runs the forward on every rank of
the replica and samples on the driver's device. While the driver has no work, a heartbeat thread
sends an IDLE message every parallel.timeout_s / 4, so a waiting worker never reaches the
collective timeout; a rank that dies still ends the others of its replica within it (they see
the closed connection or the timeout, the driver through its next message). Other replicas are
not involved: each has its own engine, control group and heartbeat. Engine methods are called
from one thread.

Overlapped steps (engine.overlap_steps): once a decode step is launched, the next one is
scheduled and launched behind it on the device (Scheduler.chain_decode; its inputs are this
step's samples, still on the device) before `step` waits for this step's tokens, so the host's
work between two steps (accepting tokens, scheduling, the next step's inputs) runs while the
device computes. A sequence that finishes at a step still has a row in the step launched behind
it; that row's token is dropped. Where the next step cannot be chained (a request to admit, a
preemption, penalties), `step` waits for the tokens and schedules after them, as without overlap.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from polar_dist.engine.control import ControlChannel, buffer_capacity
from polar_dist.engine.faults import FaultInjector
from polar_dist.engine.kv_cache import BlockAllocator
from polar_dist.engine.sampling import PendingSample, PromptRows, SampleOutput, SampleRow, SamplingParams, TokenLogprobs
from polar_dist.engine.scheduler import Scheduler, Sequence
from polar_dist.engine.step import BatchMirror, MsgKind, Step, StepDelta, control_message, encode
from polar_dist.log import get_logger

if TYPE_CHECKING:
    from polar_dist.runtime import Runtime

log = get_logger(__name__)


@dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request."""

    request_id: int
    new_token_ids: list[int]  # generated this step (one per step while decoding; none for an abort)
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" once finished, else None
    logprobs: list[TokenLogprobs] | None = None  # per new token, when the request asked
    prompt_logprobs: list[TokenLogprobs] | None = None  # once, with the first token: prompt tokens 1..
    error: str | None = None  # why, with finish reason "error" (this request failed alone)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Launched:
    """A step sent to the ranks, run and sampled on the device; its tokens not yet on the host."""

    step: Step
    rows: list[SampleRow]
    prompt: PromptRows | None
    logits: torch.Tensor  # (R + P, V) float32
    pending: PendingSample | None  # None: launching the sampling failed; the rows are sampled one by one


class EngineDeadError(RuntimeError):
    """The engine lost a rank (or failed mid-step) and cannot serve any more."""


class Engine:
    def __init__(self, rt: Runtime) -> None:
        if not rt.ctx.is_driver:
            raise RuntimeError("the Engine runs on each replica's driver (tp rank 0); the other ranks call "
                               "worker_loop(rt)")
        e = rt.cfg.engine
        self.rt = rt
        self.runner = rt.runner
        self.scheduler = Scheduler(BlockAllocator(rt.runner.num_blocks), e.block_size, e.max_batch_size,
                                   rt.max_seq_len, rt.tokenizer.eos_token_ids, rt.spec.vocab_size,
                                   e.max_num_batched_tokens, rt.cache_setting)
        self.mirror = BatchMirror(e.max_batch_size, rt.runner.max_blocks_per_seq, e.block_size)
        self.channel = ControlChannel(rt.ctx, buffer_capacity(e.max_batch_size), rt.cfg.parallel.timeout_s)
        self._pending: list[RequestOutput] = []  # aborts, reported at the next step
        self._faults = FaultInjector.from_env()  # tests only: None unless POLAR_INJECT_FAULT is set
        # Attention actually read by decode rows, in KV group-layers over every rank, and what dense
        # decode would have read: their ratio is the density served (steps of fewer decode rows
        # than sparsity.head_min_batch read every group).
        self.decode_group_reads = 0
        self.decode_group_reads_dense = 0
        self._reads_per_row: dict[int, int] = {}  # rows in the forward -> group-layers per decode row
        self.overlap = e.overlap_steps
        self.chained_steps = 0  # steps launched behind the previous one (overlap_steps), ever
        self._inflight: _Launched | None = None  # launched behind the last step, collected by the next call
        self._lock = threading.Lock()  # held while a message or a step's collectives are in flight
        self._failure: BaseException | None = None
        self._closed = False
        self._last_send = time.monotonic()
        self._heartbeat_s = rt.cfg.parallel.timeout_s / 4
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        if rt.ctx.tp_size > 1:
            self._heartbeat = threading.Thread(target=self._beat, name="polar-heartbeat", daemon=True)
            self._heartbeat.start()

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a request; returns its id. Raises UserError for a prompt the engine cannot take."""
        self._check_alive()
        seed = params.seed if params.seed is not None else random.getrandbits(64)
        return self.scheduler.add(prompt_ids, params, seed).request_id

    def abort(self, request_id: int) -> bool:
        """Finish the request with "abort" (reported at the next step); False if it already finished."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        self._pending.append(RequestOutput(request_id, [], "abort"))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending) or self._inflight is not None

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.allocator.num_free

    @property
    def failure(self) -> BaseException | None:
        """Why the engine cannot serve (a failed step, or a rank lost while idle); None while healthy.
        Safe to read from any thread."""
        return self._failure

    def step(self) -> list[RequestOutput]:
        """Run one step; returns an output for every request that got a token or finished."""
        self._check_alive()
        outputs, self._pending = self._pending, []
        with self._lock:
            launched, self._inflight = self._inflight, None
            try:
                if launched is None:
                    delta = self.scheduler.schedule()
                    if delta is None:
                        return outputs
                    launched = self._launch(delta)
                if self.overlap and launched.pending is not None:
                    chained = self.scheduler.chain_decode(launched.step)
                    if chained is not None:
                        self._inflight = self._launch(chained, launched)
                        self.chained_steps += 1
                if launched.pending is not None:
                    out, errors = launched.pending.result(), {}  # waits for this step's tokens
            except BaseException as e:
                self._failure = failure = self._named_failure(e)
                if failure is e:
                    raise
                raise failure from e
            if launched.pending is None:
                out, errors = self._sample_alone(launched)
            stepped = self.scheduler.accept(launched.step, out, errors)
        self._count_reads(launched.step)
        outputs += [self._output(s) for s in stepped]
        return outputs

    def _launch(self, delta: StepDelta, prev: _Launched | None = None) -> _Launched:
        """Send the step to the workers, run its forward and launch its sampling. prev: the step
        whose samples are a chained step's inputs."""
        msg = encode(delta)
        self.channel.send(msg)
        self._last_send = time.monotonic()
        step = self.mirror.apply(msg)
        rows = self.scheduler.sample_rows(step)
        prompt = None
        if step.prompt_spans:
            n = max(self.scheduler.requests[i].params.prompt_logprobs or 0 for i, _, _ in step.prompt_spans)
            prompt = PromptRows(self.scheduler.prompt_targets(step), n)
        ids = None
        if prev is not None:
            assert prev.pending is not None
            order = self.scheduler.chained_rows(prev.step, step)
            ids = prev.pending.tokens  # (R_prev,)
            if order != list(range(len(ids))):  # rows left since prev (aborted): gather the others'
                ids = ids[torch.tensor(order, device=ids.device)]
        logits = self.runner.logits(step, ids)  # (R + P, V); every rank's part of the step is queued
        return _Launched(step, rows, prompt, logits, self._launch_sampling(logits, rows, prompt))

    def _launch_sampling(self, logits: torch.Tensor, rows: list[SampleRow],
                         prompt: PromptRows | None) -> PendingSample | None:
        """The step's sampling on the driver's device, or None where it failed to launch (bad
        parameters, a row's logits): then `_sample_alone` isolates the rows that fail."""
        try:
            if self._faults is not None:
                self._faults.before_sampling(logits, rows)
            return self.runner.sampler.launch(logits, rows, prompt)
        except Exception as e:  # noqa: BLE001 - isolated by _sample_alone, row by row
            log.warning("sampling a step of %d rows failed (%s: %s); sampling them one by one", len(rows),
                        type(e).__name__, e)
            return None

    def _sample_alone(self, launched: _Launched) -> tuple[SampleOutput, dict[int, str]]:
        """The step's tokens, and {request id: why} for requests that failed alone. Sampling runs
        on the driver only, after the forward: a failure here is one request's (its parameters,
        its logits), so the step is sampled again row by row and only the rows that fail again
        fail their requests; the other ranks never know."""
        step, logits, rows, prompt = launched.step, launched.logits, launched.rows, launched.prompt
        tokens: list[int] = []
        logprobs: list[TokenLogprobs | None] = []
        errors: dict[int, str] = {}
        for i, (seq_id, row) in enumerate(zip(step.sample_ids, rows)):
            try:
                if self._faults is not None:
                    self._faults.before_sampling(logits[i:i + 1], [row])
                alone = self.runner.sampler.sample(logits[i:i + 1], [row])
                tokens.append(alone.token_ids[0])
                logprobs.append(alone.logprobs[0])
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                tokens.append(-1)
                logprobs.append(None)
                errors[seq_id] = f"sampling its next token failed: {type(e).__name__}: {e}"
        prompt_lps: list[TokenLogprobs] = []
        if prompt is not None:
            try:
                prompt_lps = self.runner.sampler.sample(logits[len(rows):], [], prompt).prompt_logprobs
            except Exception as e:  # noqa: BLE001 - the requests that asked for prompt logprobs fail
                for seq_id, _, _ in step.prompt_spans:
                    errors[seq_id] = f"computing its prompt logprobs failed: {type(e).__name__}: {e}"
        for seq_id, why in errors.items():
            log.error("request %d failed alone: %s", seq_id, why)
        return SampleOutput(tokens, logprobs, prompt_lps), errors

    def _named_failure(self, e: BaseException) -> BaseException:
        """A failed forward: with several ranks, the error names the ranks that ended."""
        if self.rt.ctx.tp_size == 1 or isinstance(e, (KeyboardInterrupt, SystemExit)):
            return e
        label = self.rt.ctx.replica_label
        return RuntimeError(f"{label + ': ' if label else ''}a step failed on the driver: "
                            f"{self.rt.ctx.describe_lost_ranks()} ({type(e).__name__}: {e})")

    def _count_reads(self, step: Step) -> None:
        policy, dense = self.rt.policy, len(self.rt.policy.head_k) * self.rt.policy.num_groups
        # the rows the routers see: a decode step's (its graph bucket when replayed), or a mixed
        # step's decode rows
        rows = self.runner.forward_rows(step) if step.is_decode else step.num_decode
        per_row = self._reads_per_row.get(rows)
        if per_row is None:
            per_row = self._reads_per_row[rows] = policy.groups_read(
                rows, self.runner.num_kv_heads_local, self.rt.ctx.tp_size)
        self.decode_group_reads += step.num_decode * per_row
        self.decode_group_reads_dense += step.num_decode * dense

    def _output(self, seq: Sequence) -> RequestOutput:
        new = seq.output_ids[seq.num_reported:]
        logprobs = seq.logprobs[seq.num_reported:] if seq.params.logprobs is not None else None
        prompt_lps = seq.prompt_logprobs if seq.params.prompt_logprobs is not None and seq.num_reported == 0 else None
        seq.num_reported = len(seq.output_ids)
        return RequestOutput(seq.request_id, new, seq.finish_reason, logprobs, prompt_lps, seq.error)

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise EngineDeadError(f"the engine cannot serve: {type(self._failure).__name__}: {self._failure}") \
                from self._failure
        if self._closed:
            raise EngineDeadError("the engine was shut down")

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s / 2):
            if not self._lock.acquire(blocking=False):
                continue  # a step is in flight: its messages keep the workers busy
            try:
                if self._failure is not None or self._stop.is_set():
                    return
                if time.monotonic() - self._last_send >= self._heartbeat_s:
                    self.channel.send(control_message(MsgKind.IDLE))
                    self._last_send = time.monotonic()
            except Exception as e:  # noqa: BLE001 - recorded; every later call raises EngineDeadError
                self._lost_rank(e)
                return
            finally:
                self._lock.release()

    def check_ranks(self) -> bool:
        """Send a heartbeat now (after any step in flight) and say whether every rank of the
        replica answered; a lost rank makes the engine fail as the idle heartbeat would. For a
        driver told to stop: a launcher that lost one rank stops the others (torchrun sends them
        SIGTERM), and the replica must then end on its error, not drain as if asked to."""
        if self.rt.ctx.tp_size == 1:
            return self._failure is None
        with self._lock:
            if self._failure is None and not self._closed:
                try:
                    self.channel.send(control_message(MsgKind.IDLE))
                    self._last_send = time.monotonic()
                except Exception as e:  # noqa: BLE001 - recorded; every later call raises EngineDeadError
                    self._lost_rank(e)
        return self._failure is None

    def _lost_rank(self, e: BaseException) -> None:
        label = self.rt.ctx.replica_label
        self._failure = RuntimeError(f"{label + ': ' if label else ''}a rank stopped answering while the engine "
                                     f"was idle: {self.rt.ctx.describe_lost_ranks()} ({type(e).__name__}: {e})")
        self._failure.__cause__ = e
        log.error("%s; the engine cannot serve", self._failure)

    def shutdown(self, failed: bool = False) -> None:
        """Stop the heartbeat and send the workers STOP. After a failure (or with failed=True, when
        the caller is leaving on an error) nothing is sent: a worker may be inside a collective of
        a failed step, which a STOP would pair with; the workers end on the closed connection or
        the timeout instead."""
        if self._closed:
            return
        self._closed = True
        if failed and self._failure is None:
            self._failure = RuntimeError("shut down after an error")
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._failure is None:
            with self._lock:
                self.channel.send(control_message(MsgKind.STOP))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.shutdown(failed=exc_type is not None)


def worker_loop(rt: Runtime) -> None:
    """A replica's ranks other than its driver: run the driver's steps until it says STOP. Idle
    heartbeats are skipped."""
    e = rt.cfg.engine
    mirror = BatchMirror(e.max_batch_size, rt.runner.max_blocks_per_seq, e.block_size)
    channel = ControlChannel(rt.ctx, buffer_capacity(e.max_batch_size), rt.cfg.parallel.timeout_s)
    while True:
        try:
            msg = channel.recv()
        except RuntimeError as e:
            raise RuntimeError(
                f"rank {rt.ctx.rank}{_replica_label(rt)}: the driver (rank {rt.ctx.replica_ranks[0]}) sent no step "
                f"or heartbeat within parallel.timeout_s = {rt.cfg.parallel.timeout_s} s, or its connection closed "
                f"or its process ended: {rt.ctx.describe_lost_ranks()} ({e})") from e
        kind = MsgKind(int(msg[0]))
        if kind is MsgKind.STOP:
            return
        if kind is MsgKind.IDLE:
            continue
        try:
            rt.runner.execute(mirror.apply(msg))
        except Exception as e:
            raise RuntimeError(f"rank {rt.ctx.rank}{_replica_label(rt)}: a step failed: {rt.ctx.describe_lost_ranks()} "
                               f"({type(e).__name__}: {e})") from e


def _replica_label(rt: Runtime) -> str:
    label = rt.ctx.replica_label
    return f" ({label})" if label else ""
