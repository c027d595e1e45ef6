"""schemathesis against the server (launch/serve.py, a real process) on the tiny random Llama with a
chat template: request bodies generated from the server's own /openapi.json for POST
/v1/completions and POST /v1/chat/completions, in three kinds:

- positive: bodies the spec says are valid (most are refused for what the spec cannot say: a
  model that is not served, token ids outside the vocabulary, n past server.max_n);
- negative: bodies the spec says are invalid, which must be refused with a 4xx;
- within limits: positive bodies moved inside the limits this server names (the served model; n,
  max_tokens and logprobs wrapped into their ranges; token ids into the vocabulary; short texts),
  so that most reach the engine with random combinations of n, logprobs, echo, stream, stop and
  the sampling fields. top_k and seed, which the spec leaves unbounded, stay as generated: this
  kind is the one that found a top_k past int32 ending the engine.

Every answer: no 5xx, a status and content type the spec documents, a body (or each server-sent
event) that matches the spec's schema, and every error OpenAI-shaped. Afterwards the server is
healthy, serves a normal request and counted no 5xx. Examples are derandomized: a CI run repeats
the previous one, and a failure reproduces.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (scripts/setup.sh installs it)")  # e.g. the GPU host
schemathesis = pytest.importorskip("schemathesis", reason="scripts/setup.sh installs schemathesis")
import requests
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from support.server import ServerProcess
from support.tiny_models import VOCAB
from support.tiny_server import MODEL_NAME, check_error_body, ok_completion, post, write_config

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = 128
MAX_N, MAX_LOGPROBS, MAX_STOP = 4, 5, 8
MAX_NEW_TOKENS = 6  # generation stays cheap: the within-limits kind wraps max_tokens into [1, 6] too
PATHS = ["/v1/completions", "/v1/chat/completions"]
EXAMPLES = {"positive": 400, "negative": 300, "within limits": 350}  # per path: ~2 min in all on 2 CPU cores
SERVED_AT_LEAST = 0.5  # of the within-limits bodies: the kind must keep reaching the engine


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[ServerProcess]:
    config = write_config(tmp_path_factory.mktemp("fuzz") / "run.yaml", tiny_chat_model, tokenizer="auto",
                          engine={"max_seq_len": MAX_SEQ_LEN, "max_batch_size": 8, "kv_cache_blocks": 64,
                                  "max_num_batched_tokens": 128, "max_new_tokens": MAX_NEW_TOKENS},
                          server={"max_n": MAX_N, "max_logprobs": MAX_LOGPROBS, "max_stop": MAX_STOP})
    with ServerProcess(config) as s:
        yield s


@pytest.fixture(scope="module")
def schema(server: ServerProcess) -> Any:
    return schemathesis.openapi.from_url(server.url + "/openapi.json", timeout=30)


def served_model(case: Case) -> Case:
    """The served model's name in place of a generated one (any other name is a 404, which would
    end nearly every case there); a non-string `model` is left as the negative case made it."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL_NAME
    return case


def _ids(ids: Any, limit: int) -> list[int]:
    return [t % VOCAB for t in ids[:limit]] or [1]


def within_limits(case: Case) -> Case:
    """A positive case moved inside this server's limits (see the module docstring)."""
    body = case.body
    if not isinstance(body, dict):
        return case
    body["model"] = MODEL_NAME
    for name in ("suffix", "best_of", "logit_bias"):  # not supported: always a 400
        body.pop(name, None)
    if not body.get("stream"):
        body.pop("stream_options", None)
    # the limits the server names (top_k and seed, which the spec leaves unbounded, stay as generated)
    ranges = {"n": (1, MAX_N), "max_tokens": (1, MAX_NEW_TOKENS), "max_completion_tokens": (1, MAX_NEW_TOKENS),
              "logprobs": (0, MAX_LOGPROBS), "top_logprobs": (0, MAX_LOGPROBS)}
    for name, (lo, hi) in ranges.items():
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            body[name] = lo + (value - lo) % (hi - lo + 1)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        body["prompt"] = prompt[:40] or "a"
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        body["prompt"] = _ids(prompt, 40)
    elif isinstance(prompt, list):
        body["prompt"] = [p[:40] or "a" if isinstance(p, str) else _ids(p, 40) for p in prompt[:3]] or "a"
    if isinstance(body.get("stop_token_ids"), list):
        body["stop_token_ids"] = _ids(body["stop_token_ids"], 2)
    if isinstance(body.get("stop"), list):
        body["stop"] = body["stop"][:MAX_STOP - len(body.get("stop_token_ids") or [])]
    if isinstance(body.get("messages"), list):
        body["messages"] = body["messages"][:3]
        for m in body["messages"]:
            if isinstance(m.get("content"), str):
                m["content"] = m["content"][:24]
            elif isinstance(m.get("content"), list):
                m["content"] = [{**part, "text": part["text"][:24]} for part in m["content"][:2]]
        if body.get("top_logprobs") is not None:
            body["logprobs"] = True
        if body.get("max_completion_tokens") is not None:
            body.pop("max_tokens", None)
    return case


KINDS: dict[str, tuple[GenerationMode, Callable[[Case], Case]]] = {
    "positive": (GenerationMode.POSITIVE, served_model),
    "negative": (GenerationMode.NEGATIVE, served_model),
    "within limits": (GenerationMode.POSITIVE, within_limits),
}


def _openai_errors(response: schemathesis.Response) -> None:
    """Every error is OpenAI-shaped: an error status's body, and an error event inside a stream."""
    if response.status_code >= 400:
        check_error_body(response.json())
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):  # lowercase keys
        for line in response.text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    check_error_body(event)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("path", PATHS)
def test_schemathesis_finds_no_5xx_and_every_answer_matches_the_spec(server: ServerProcess, schema: Any, path: str,
                                                                    kind: str) -> None:
    mode, adjust = KINDS[kind]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode == GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)
    statuses: dict[int, int] = {}

    @settings(max_examples=EXAMPLES[kind], deadline=None, derandomize=True, database=None,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.data_too_large,
                                                                            HealthCheck.filter_too_much])
    @given(case=schema[path]["POST"].as_strategy(mode).map(adjust))
    def fuzz(case: Case) -> None:
        response = case.call(timeout=120)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        _openai_errors(response)
        case.validate_response(response, checks=checks)

    t0 = time.perf_counter()
    fuzz()
    print(f"{path} {kind}: {sum(statuses.values())} requests in {time.perf_counter() - t0:.1f} s, "
          f"statuses {dict(sorted(statuses.items()))}")
    if kind == "within limits":
        assert statuses.get(200, 0) >= SERVED_AT_LEAST * sum(statuses.values()), statuses
    assert requests.get(server.url + "/health", timeout=30).status_code == 200, server.log()


def test_after_fuzzing_the_server_serves_and_counted_no_5xx(server: ServerProcess) -> None:
    assert ok_completion(server)
    r = post(server, "/v1/chat/completions", {"model": MODEL_NAME, "max_tokens": 3,
                                              "messages": [{"role": "user", "content": "still there?"}]})
    assert r.status_code == 200, r.text
    metrics = requests.get(server.url + "/metrics", timeout=30).text
    assert 'polar_requests_total{status="5' not in metrics, metrics
