"""Serving a runtime: rank 0 runs the HTTP server (uvicorn) and the engine's thread; the other
ranks run the engine's steps until rank 0 says STOP.

    serve(rt, api_key="")       # every rank calls it; returns when the server has drained

SIGINT/SIGTERM on rank 0: new requests get 503 (so does /health), the requests in flight finish
for up to server.drain_timeout_s, the rest end with finish reason "abort", then the engine sends
the workers STOP and every rank returns (exit 0). A second signal skips the grace period. The
other ranks ignore both signals (Ctrl-C in a terminal reaches every rank; torchrun forwards
SIGTERM): they end on rank 0's STOP, or on its loss within parallel.timeout_s. If the engine fails
(a rank is lost), rank 0 answers 503, lets the requests in flight receive their errors, and
raises: every rank exits non-zero, with a message naming the replica. Before draining, rank 0
checks that its ranks still answer: torchrun stops a job's other ranks with SIGTERM when one
dies, and a replica that lost a rank must end on that error, not as if asked to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import uvicorn

from polar_dist.config import RunConfig, ServerConfig
from polar_dist.engine.engine import Engine, worker_loop
from polar_dist.errors import UserError
from polar_dist.log import get_logger
from polar_dist.runtime import Runtime
from polar_dist.server.app import ServerState, build_app
from polar_dist.server.engine_loop import EngineLoop
from polar_dist.server.metrics import ServerMetrics
from polar_dist.server.prepare import Limits

log = get_logger(__name__)

ANSWER_ERRORS_S = 5.0  # after an abort or a failure: time for the last responses to be sent
LINGER_S = 2.0  # after a failure: /health keeps answering 503 this long before the process ends


def listen_port(server: ServerConfig, replica: int = 0) -> int:
    """The port this server binds: server.port + the replica index (each data-parallel replica
    serves on its own port). The one place it is chosen."""
    return server.port + replica


def served_model_name(cfg: RunConfig) -> str:
    """server.model_name, else a name from model.path: `smollm2-135m` for embedded:smollm2-135m,
    a directory's or file's own name (without .gguf), `random` for a random model without a path."""
    if cfg.server.model_name:
        return cfg.server.model_name
    path = cfg.model.path
    if path.startswith("embedded:"):
        return path.removeprefix("embedded:")
    if not path:
        return "random"
    return Path(path).name.removesuffix(".gguf")


def serve(rt: Runtime, api_key: str = "") -> None:
    ctx = rt.ctx
    sock, failure = None, None
    if ctx.is_driver:
        try:
            sock = _bind(rt.cfg.server, ctx.replica)
        except UserError as e:
            failure = str(e)
    failure = ctx.broadcast_object(failure)  # every rank leaves with the same message
    if failure is not None:
        raise UserError(failure)
    if not ctx.is_driver:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        worker_loop(rt)
        return
    assert sock is not None
    asyncio.run(_Driver(rt, api_key, sock).run())


def _bind(cfg: ServerConfig, replica: int) -> socket.socket:
    port = listen_port(cfg, replica)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {cfg.host}:{port} ({e.strerror}); choose another port with "
                        "--set server.port=N, or set server.host") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Driver:
    def __init__(self, rt: Runtime, api_key: str, sock: socket.socket) -> None:
        self.rt = rt
        self.api_key = api_key
        self.sock = sock
        self.signals = 0
        self.failure: BaseException | None = None

    async def run(self) -> None:
        rt, s = self.rt, self.rt.cfg.server
        metrics = ServerMetrics(replica=rt.ctx.replica, num_replicas=rt.ctx.num_replicas, tp=rt.ctx.tp_size)
        engine = Engine(rt)
        bridge = EngineLoop(engine, metrics, s.max_queued_requests)
        limits = Limits(model_name=served_model_name(rt.cfg), max_n=s.max_n, max_logprobs=s.max_logprobs,
                        max_stop=s.max_stop, max_choices=s.max_queued_requests, max_seq_len=bridge.max_seq_len,
                        default_max_tokens=rt.cfg.engine.max_new_tokens, vocab_size=rt.spec.vocab_size)
        self.state = ServerState(bridge, rt.tokenizer, limits, metrics, api_key=self.api_key,
                                 max_body_bytes=s.max_body_bytes)
        config = uvicorn.Config(build_app(self.state), log_config=None, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=ANSWER_ERRORS_S)
        self.server = _Server(config)
        loop = asyncio.get_running_loop()
        bridge.start(loop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        watcher = asyncio.create_task(self._watch_engine())
        host, port = self.sock.getsockname()[:2]
        label = rt.ctx.replica_label
        log.info("serving %r on http://%s:%d (%s); SIGINT/SIGTERM drains and stops", limits.model_name, host,
                 port, label or f"tp={rt.ctx.tp_size}")
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            watcher.cancel()
            bridge.stop()
            await asyncio.to_thread(bridge.join)
        failure = self.failure or bridge.failure or engine.failure
        if failure is not None:
            raise RuntimeError(f"{label + ': ' if label else ''}the engine failed, so the server on port {port} "
                               f"stopped: {type(failure).__name__}: {failure}")
        log.info("server stopped")

    def _on_signal(self, sig: int) -> None:
        self.signals += 1
        if self.signals == 1:
            self.state.draining = True
            log.warning("%s: draining - new requests get 503; %d requests in flight get up to %.0f s "
                        "(server.drain_timeout_s); signal again to stop now", signal.Signals(sig).name,
                        self.state.in_flight, self.rt.cfg.server.drain_timeout_s)
            asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.rt.cfg.server.drain_timeout_s
        if not await asyncio.to_thread(self.state.bridge.engine.check_ranks):
            return  # a rank is lost: _watch_engine ends the server with the error
        while self._busy() and time.monotonic() < deadline and self.signals < 2:
            await asyncio.sleep(0.05)
        if self._busy():
            log.warning("stopping with %d engine requests unfinished: they end with finish reason 'abort'",
                        self.state.bridge.num_unfinished)
            self.state.bridge.stop()  # aborts what is left; their responses end
            await self._wait(lambda: self.state.in_flight == 0, ANSWER_ERRORS_S)
        self.server.should_exit = True

    def _busy(self) -> bool:
        return self.state.in_flight > 0 or self.state.bridge.num_unfinished > 0

    async def _watch_engine(self) -> None:
        while self.state.bridge.healthy:
            await asyncio.sleep(0.1)
        self.failure = self.state.bridge.failure or self.state.bridge.engine.failure
        log.error("the engine cannot serve (%s); answering 503, then stopping", self.failure)
        await self._wait(lambda: self.state.in_flight == 0, ANSWER_ERRORS_S)
        await asyncio.sleep(LINGER_S)
        self.server.should_exit = True

    @staticmethod
    async def _wait(done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: _Driver drains on SIGINT/SIGTERM instead."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
