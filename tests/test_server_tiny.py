"""The server (launch/serve.py, a real process on a real socket) on a tiny random Llama with the
byte tokenizer, driven by the official openai client: 64 concurrent mixed requests in a KV cache
too small for them all (streaming, n = 2, seeded sampling) each answered once and equal to the same
request alone; a chat without a template is a 400 (hostile input: test_server_hostile.py); the API
key; a client that goes away frees its blocks; the published OpenAPI spec. At tp = 2 (torchrun): an idle
server still serves after 3 x parallel.timeout_s; past its batch and queue it answers 429; SIGTERM
drains (503 to new requests, the ones in flight finish) and every rank exits 0.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (scripts/setup.sh installs it)")  # e.g. the GPU host
import requests

from support.server import ServerProcess
from support.tiny_server import assert_openai_error, ok_completion, post, write_config

pytestmark = pytest.mark.slow

MODEL = "llama-gqa"
API_KEY = "test-key-1234"
MAX_SEQ_LEN = 128
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> Path:
    # 12 blocks of 16 = 192 tokens for a batch of 8 sequences of up to 128: the cache runs out,
    # so the engine must queue and preempt.
    return write_config(tmp_path_factory.mktemp("serve") / "run.yaml", tiny_model(MODEL),
                        engine={"max_seq_len": MAX_SEQ_LEN, "max_batch_size": 8, "kv_cache_blocks": 12,
                                "max_num_batched_tokens": 64, "max_new_tokens": 16},
                        server={"max_n": 4, "max_logprobs": 5, "max_stop": 8, "max_body_bytes": 100_000})


@pytest.fixture(scope="module")
def server(config: Path) -> Iterator[ServerProcess]:
    with ServerProcess(config, env={"POLAR_API_KEY": API_KEY}, api_key=API_KEY) as s:
        yield s


# ---- many requests at once ---------------------------------------------------------------

def _requests(count: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    out = []
    for i in range(count):
        prompt = "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(1, 70)))
        req: dict[str, Any] = {"prompt": prompt, "max_tokens": rng.randint(1, 40), "stream": i % 3 == 0,
                               "n": 2 if i % 5 == 0 else 1}
        if i % 4 == 1:
            req.update(temperature=1.0, top_p=0.9, seed=1000 + i)
        else:
            req.update(temperature=0.0)
        out.append(req)
    return out


async def _run(client: Any, req: dict[str, Any]) -> dict[int, tuple[list[int], str]]:
    """choice index -> (token ids, finish reason); a stream must give each choice one finish."""
    extra = {"return_token_ids": True, "ignore_eos": True}
    args = {k: v for k, v in req.items() if k != "stream"}
    if not req["stream"]:
        r = await client.completions.create(model="tiny", extra_body=extra, **args)
        return {c.index: (c.token_ids, c.finish_reason) for c in r.choices}
    tokens: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    stream = await client.completions.create(model="tiny", stream=True, extra_body=extra, **args)
    async for chunk in stream:
        for c in chunk.choices:
            assert c.index not in finish, f"choice {c.index} got a chunk after it finished"
            tokens.setdefault(c.index, []).extend(c.token_ids)
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    return {i: (tokens[i], finish.get(i, "")) for i in tokens}


def test_64_concurrent_mixed_requests_each_complete_once_and_equal_alone(server: ServerProcess) -> None:
    reqs = _requests(64)

    async def together() -> list[dict[int, tuple[list[int], str]]]:
        client = server.async_client()
        try:
            return await asyncio.gather(*(_run(client, r) for r in reqs))
        finally:
            await client.close()

    async def alone() -> list[dict[int, tuple[list[int], str]]]:
        client = server.async_client()
        try:
            return [await _run(client, {**r, "stream": False}) for r in reqs]
        finally:
            await client.close()

    finished_before = server.metric("polar_engine_requests_total")
    batch = asyncio.run(together())
    for req, got in zip(reqs, batch):
        assert sorted(got) == list(range(req["n"]))  # every choice exactly once
        for tokens, finish in got.values():
            assert finish == "length" and len(tokens) == req["max_tokens"], (req, tokens, finish)
    choices = sum(r["n"] for r in reqs)
    assert server.metric("polar_engine_requests_total") - finished_before == choices
    assert server.metric("polar_kv_blocks_in_use") == 0
    assert server.metric("polar_preemptions_total") > 0  # the cache ran out: sequences were preempted
    # greedy and seeded requests give the same tokens alone as inside the busy batch
    single = asyncio.run(alone())
    for req, got, ref in zip(reqs, batch, single):
        assert got == ref, req
    # the n = 2 choices of a seeded request differ (each has its own seed)
    seeded_pairs = [got for req, got in zip(reqs, batch) if req["n"] == 2 and "seed" in req]
    assert seeded_pairs and all(g[0][0] != g[1][0] for g in seeded_pairs)


def test_stop_token_ids_end_a_choice_after_the_token(server: ServerProcess) -> None:
    args = {"model": "tiny", "prompt": "stop here", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    full = post(server, "/v1/completions", args).json()["choices"][0]["token_ids"]
    k = 5
    stop_id = full[k]
    first = full.index(stop_id)
    r = post(server, "/v1/completions", {**args, "stop_token_ids": [stop_id]}).json()["choices"][0]
    assert (r["token_ids"], r["finish_reason"]) == (full[:first + 1], "stop")


def test_echo_logprobs_stream_like_the_whole_answer(server: ServerProcess) -> None:
    args = {"model": "tiny", "prompt": "echo me", "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 2,
            "ignore_eos": True}
    whole = post(server, "/v1/completions", args).json()["choices"][0]
    lp = whole["logprobs"]
    assert whole["text"].startswith("echo me")
    assert len(lp["tokens"]) == len("echo me") + 6 and lp["token_logprobs"][0] is None
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])
    r = requests.post(server.url + "/v1/completions", json={**args, "stream": True}, headers=HEADERS, stream=True,
                      timeout=60)
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert sum((c["choices"][0]["logprobs"]["token_logprobs"] for c in chunks), []) == lp["token_logprobs"]


SOAK_REQUESTS = 1000  # per round


def test_soak_two_rounds_lose_nothing_and_do_not_grow(server: ServerProcess) -> None:
    """2 x 1,000 requests from 64 concurrent clients: a third streaming, a tenth hanging up after
    their first chunk, some n = 2, some seeded. Every request not hung up gets exactly one complete
    answer; a sample equals the same requests alone; KV blocks return to zero after each round; the
    server's resident memory does not grow from the first round to the second."""
    import psutil

    rng = random.Random(1)
    rss = []

    def make(i: int) -> dict[str, Any]:
        req: dict[str, Any] = {"prompt": "".join(rng.choice("qrstuvwxyz .") for _ in range(rng.randint(1, 40))),
                               "max_tokens": rng.randint(1, 24), "stream": i % 3 == 0, "n": 2 if i % 7 == 0 else 1,
                               "hang_up": i % 10 == 3}
        req.update(temperature=1.0, seed=i) if i % 4 == 0 else req.update(temperature=0.0)
        return req

    latencies: list[float] = []  # seconds per answered request, from its send to its last byte

    async def one(client: Any, req: dict[str, Any], gate: asyncio.Semaphore) -> Any:
        async with gate:
            if not req["hang_up"]:
                t0 = time.perf_counter()
                got = await _run(client, {k: v for k, v in req.items() if k != "hang_up"})
                latencies.append(time.perf_counter() - t0)
                return got
            args = {k: v for k, v in req.items() if k not in ("hang_up", "stream")}
            stream = await client.completions.create(model="tiny", stream=True, **{**args, "max_tokens": 80},
                                                     extra_body={"ignore_eos": True})
            async for _ in stream:
                break
            await stream.close()
            return None

    async def soak(reqs: list[dict[str, Any]]) -> tuple[list[Any], float]:
        client = server.async_client()
        gate = asyncio.Semaphore(64)
        t0 = time.perf_counter()
        try:
            return await asyncio.gather(*(one(client, r, gate) for r in reqs)), time.perf_counter() - t0
        finally:
            await client.close()

    for round_ in range(2):
        latencies.clear()
        reqs = [make(i) for i in range(SOAK_REQUESTS)]
        answers, elapsed = asyncio.run(soak(reqs))
        for req, got in zip(reqs, answers):
            if req["hang_up"]:
                continue
            assert sorted(got) == list(range(req["n"])), req
            assert all(f == "length" and len(t) == req["max_tokens"] for t, f in got.values()), (req, got)
        deadline = time.monotonic() + 30
        while server.metric("polar_kv_blocks_in_use") > 0 or server.metric("polar_running_batch_size") > 0:
            assert time.monotonic() < deadline, "blocks still in use after the round"
            time.sleep(0.1)
        rss.append(psutil.Process(server.rank0_pid()).memory_info().rss)
        lat = sorted(latencies)
        print(f"soak round {round_}: {SOAK_REQUESTS} requests ({len(lat)} answered, the rest hung up) in "
              f"{elapsed:.1f} s ({SOAK_REQUESTS / elapsed:.1f} req/s), latency p50 {lat[len(lat) // 2]:.2f} s "
              f"p99 {lat[int(len(lat) * 0.99)]:.2f} s, errors 0, rank 0 RSS {rss[-1] / 2**20:.0f} MiB")
        sample = [(r, a) for r, a in zip(reqs, answers) if not r["hang_up"]][::25]

        async def alone() -> list[Any]:
            client = server.async_client()
            try:
                return [await _run(client, {k: v for k, v in r.items() if k not in ("hang_up", "stream")}
                                   | {"stream": False}) for r, _ in sample]
            finally:
                await client.close()

        assert [a for _, a in sample] == asyncio.run(alone())
    assert rss[1] <= rss[0] * 1.05 + (32 << 20), f"rank 0 grew from {rss[0] >> 20} to {rss[1] >> 20} MiB"


# ---- the API ----------------------------------------------------------------------------------

BASE = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


def test_a_chat_without_a_template_is_a_400(server: ServerProcess) -> None:
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(r, 400, "chat template", param="messages")
    assert ok_completion(server)


def test_api_key_guards_everything_but_health_and_metrics(server: ServerProcess) -> None:
    for path in ("/v1/models", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = requests.get(server.url + path, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    r = requests.post(server.url + "/v1/completions", json=BASE, timeout=30)
    assert r.status_code == 401
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert requests.get(server.url + "/metrics", timeout=30).status_code == 200
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_openapi_spec_is_published(server: ServerProcess) -> None:
    spec = requests.get(server.url + "/openapi.json", headers=HEADERS, timeout=30).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
    schema = spec["components"]["schemas"]["CompletionRequest"]
    assert {"prompt", "max_tokens", "n", "stop", "echo", "logprobs"} <= set(schema["properties"])
    for path in ("/v1/completions", "/v1/chat/completions"):
        answers = spec["paths"][path]["post"]["responses"]
        assert "422" not in answers and "400" in answers  # an invalid body is OpenAI's 400, not FastAPI's 422
        assert {"application/json", "text/event-stream"} <= set(answers["200"]["content"])


def test_a_client_that_goes_away_frees_its_blocks(server: ServerProcess) -> None:
    long = {"model": "tiny", "prompt": "abc", "max_tokens": MAX_SEQ_LEN - 4, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    before = _abort_count(server)
    # streaming: read one chunk, then close the connection
    stream = server.client().completions.create(stream=True, **long)
    next(iter(stream))
    stream.close()
    _wait_for(lambda: server.metric("polar_kv_blocks_in_use") == 0)
    # not streaming: the client hangs up while its request runs (blocks in use), whatever the
    # machine's speed; a request that finished first is sent again
    body = {k: v for k, v in long.items() if k != "extra_body"} | long["extra_body"]
    assert any(_post_then_hang_up(server, body) for _ in range(3)), "every request finished before the hang-up"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (_abort_count(server) < before + 2
                                           or server.metric("polar_kv_blocks_in_use") > 0):
        time.sleep(0.1)
    # Each hang-up aborts its request unless the request finished in the moment between (a fast
    # machine can end the streamed one first): at least one abort, and nothing left holding blocks.
    assert _abort_count(server) >= before + 1, requests.get(server.url + "/metrics").text
    assert server.metric("polar_kv_blocks_in_use") == 0
    assert ok_completion(server)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _post_then_hang_up(server: ServerProcess, body: dict) -> bool:
    """POST /v1/completions on a raw socket and close it once the request holds KV blocks;
    False if no blocks were seen in use (the request finished, or never ran, first)."""
    import socket

    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n")
    if server.api_key:
        head += f"Authorization: Bearer {server.api_key}\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + data)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if server.metric("polar_kv_blocks_in_use") > 0:
                return True  # closing the socket here is the hang-up
            time.sleep(0.002)
    return False


def _abort_count(server: ServerProcess) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('polar_engine_requests_total{finish_reason="abort"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- tp = 2 under torchrun: idle, drain --------------------------------------------------

def test_tp2_idle_past_the_timeout_then_sigterm_drains(config: Path) -> None:
    timeout_s = 2.0
    with ServerProcess(config, tp=2, overrides=[f"parallel.timeout_s={timeout_s}", "server.drain_timeout_s=60",
                                                "server.max_queued_requests=4"],
                       env={"POLAR_API_KEY": API_KEY}, api_key=API_KEY) as server:
        time.sleep(3 * timeout_s + 0.5)  # idle: only heartbeats keep the worker waiting
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        first = ok_completion(server)
        assert first == ok_completion(server)

        # overload: beyond the 8 batch slots and 4 queued, requests get 429 with Retry-After, and
        # every request admitted gets its whole answer
        load = {"model": "tiny", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda i: post(server, "/v1/completions", {**load, "prompt": f"load {i}"}),
                                    range(20)))
        rejected = [r for r in answers if r.status_code == 429]
        served = [r for r in answers if r.status_code == 200]
        assert len(rejected) + len(served) == 20 and len(rejected) >= 1 and len(served) >= 4, \
            [r.status_code for r in answers]
        assert all(r.headers.get("Retry-After") == "1" and r.json()["error"]["type"] == "rate_limit_error"
                   for r in rejected)
        assert all(len(r.json()["choices"][0]["token_ids"]) == 60 for r in served)
        assert ok_completion(server) == first

        # requests in flight, then SIGTERM: they finish; new ones get 503; every rank exits 0
        results: dict[int, dict[int, tuple[list[int], str]]] = {}
        started = threading.Event()

        def stream(i: int) -> None:
            client = server.client()
            tokens: list[int] = []
            finish = ""
            for chunk in client.completions.create(model="tiny", prompt=f"drain {i}", max_tokens=100, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True,
                                                                            "return_token_ids": True}):
                started.set()
                for c in chunk.choices:
                    tokens += c.token_ids
                    finish = c.finish_reason or finish
            results[i] = {0: (tokens, finish)}

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        assert started.wait(60)
        deadline = time.monotonic() + 30
        while server.metric("polar_requests_in_flight") < 4:  # every request reached the server
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)
        code: dict[str, int] = {}
        stopper = threading.Thread(target=lambda: code.setdefault("rc", server.terminate()))
        stopper.start()
        deadline = time.monotonic() + 30
        while requests.get(server.url + "/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "draining never began"
            time.sleep(0.02)
        refused = post(server, "/v1/completions", {**BASE, "model": "tiny"})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        for t in threads:
            t.join(120)
        stopper.join(120)
        assert code.get("rc") == 0, server.log()
        assert sorted(results) == [0, 1, 2, 3]
        for tokens, finish in (r[0] for r in results.values()):
            assert finish == "length" and len(tokens) == 100


MARKER = [70, 65, 73, 76]  # the token-id run by which POLAR_INJECT_FAULT chooses requests


@pytest.mark.parametrize("tp", [1, 2])
def test_a_request_whose_step_fails_fails_alone_and_the_server_keeps_serving(config: Path, tp: int) -> None:
    fault = f"raise:{','.join(map(str, MARKER))}"
    with ServerProcess(config, tp=tp, env={"POLAR_API_KEY": API_KEY, "POLAR_INJECT_FAULT": fault},
                       api_key=API_KEY) as server:
        reqs = [{"prompt": p, "max_tokens": 12, "temperature": 0.0, "stream": i % 2 == 1, "n": 1}
                for i, p in enumerate(["healthy one", "healthy two", "and three", "four"])]
        doomed = {"model": "tiny", "prompt": [5, 6, *MARKER, 7], "max_tokens": 12, "temperature": 0.0}

        async def together() -> list[Any]:
            client = server.async_client()
            try:
                return await asyncio.gather(*(_run(client, r) for r in reqs), asyncio.to_thread(
                    post, server, "/v1/completions", doomed), asyncio.to_thread(
                    post, server, "/v1/completions", {**doomed, "stream": True}))
            finally:
                await client.close()

        *healthy, whole, streamed = asyncio.run(together())
        assert whole.status_code == 500, whole.text
        error = whole.json()["error"]
        assert error["type"] == "server_error" and "injected by POLAR_INJECT_FAULT" in error["message"], error
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        assert "injected" in events[-1]["error"]["message"] and streamed.text.rstrip().endswith("data: [DONE]")
        for req, got in zip(reqs, healthy):  # the others finish, with the tokens they get alone
            assert got == asyncio.run(_alone(server, req)), req
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        assert ok_completion(server)
        assert server.metric("polar_kv_blocks_in_use") == 0
        assert server.terminate() == 0


async def _alone(server: ServerProcess, req: dict[str, Any]) -> dict[int, tuple[list[int], str]]:
    client = server.async_client()
    try:
        return await _run(client, {**req, "stream": False})
    finally:
        await client.close()


def test_tp2_a_lost_rank_fails_the_requests_in_flight_and_every_rank_exits_nonzero(config: Path) -> None:
    timeout_s = 5.0
    with ServerProcess(config, tp=2, overrides=[f"parallel.timeout_s={timeout_s}"],
                       env={"POLAR_API_KEY": API_KEY}, api_key=API_KEY) as server:
        import psutil

        worker = next(c for c in psutil.Process(server.proc.pid).children(recursive=True)
                      if c.environ().get("RANK") == "1")
        outcome: dict[str, Any] = {}
        started = threading.Event()

        def stream() -> None:
            tokens = 0
            try:
                for chunk in server.client().completions.create(
                        model="tiny", prompt="doomed", max_tokens=MAX_SEQ_LEN - 8, temperature=0, stream=True,
                        extra_body={"ignore_eos": True}):
                    started.set()
                    tokens += 1
                outcome["finished"] = tokens
            except Exception as e:  # noqa: BLE001 - the error event of the stream is the expected outcome
                outcome["error"] = str(e)

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        worker.kill()
        saw_503 = False
        deadline = time.monotonic() + 3 * timeout_s
        while time.monotonic() < deadline and not saw_503:
            try:
                saw_503 = requests.get(server.url + "/health", timeout=5).status_code == 503
            except requests.ConnectionError:
                break  # already gone
            time.sleep(0.05)
        t.join(60)
        assert not t.is_alive(), "the request in flight hangs"
        assert "error" in outcome, outcome  # not a complete answer
        assert saw_503
        assert server.proc.wait(120) != 0
        log = server.log(tail=200_000)
        assert f"rank 1 (pid {worker.pid} on" in log and "has ended" in log, log[-4000:]  # the driver names it
