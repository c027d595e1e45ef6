"""Hostile requests to the server (launch/serve.py, a real process) on the tiny random Llama with a
chat template: bodies past the size limit, JSON nested 100k deep, invalid UTF-8, token ids outside
the vocabulary, negative / huge / NaN / infinite numbers in every numeric field, every limit at
its value and one past it, malformed chat messages, thousands of stop strings. Each gets a 4xx
with an OpenAI error body whose param and message name the field; values at a limit are served;
and the server keeps serving throughout.

NaN and Infinity (Python's json reads them, RFC 8259 does not have them) in a field the server
reads are a 400 naming the field; unknown fields are ignored whatever their value, as OpenAI
clients send fields this server does not know.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (scripts/setup.sh installs it)")  # e.g. the GPU host
import requests

from support.server import ServerProcess
from support.tiny_models import VOCAB
from support.tiny_server import MODEL_NAME, assert_openai_error, ok_completion, post, write_config

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = 64
MAX_N, MAX_LOGPROBS, MAX_STOP = 4, 5, 8
MAX_BODY = 1 << 20
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[ServerProcess]:
    config = write_config(tmp_path_factory.mktemp("hostile") / "run.yaml", tiny_chat_model, tokenizer="auto",
                          engine={"max_seq_len": MAX_SEQ_LEN, "max_batch_size": 4, "kv_cache_blocks": 24,
                                  "max_num_batched_tokens": 64, "max_new_tokens": 4},
                          server={"max_n": MAX_N, "max_logprobs": MAX_LOGPROBS, "max_stop": MAX_STOP,
                                  "max_body_bytes": MAX_BODY})
    with ServerProcess(config) as s:
        yield s


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, **fields}


def _chat(*messages: Any, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": list(messages or [{"role": "user", "content": "hi"}]), "max_tokens": 2,
            **fields}


def _raw(path: str, field: str, literal: str) -> str:
    """A body with `"field": literal` written as JSON text (NaN, Infinity, 2**70 exactly)."""
    base = _completion() if path == COMPLETIONS else _chat()
    base.pop(field, None)
    if field == "max_completion_tokens":
        base.pop("max_tokens")  # not both
    return json.dumps(base)[:-1] + f', "{field}": {literal}}}'


# ---- numbers: every numeric field, negative / past its range / huge / not finite ---------------

HUGE = ["1e308", "-1e308", str(2 ** 70), "NaN", "Infinity", "-Infinity"]
NUMBERS = {  # field -> JSON literals outside what it takes, besides HUGE
    COMPLETIONS: {
        "temperature": ["-0.5", "2.5"], "top_p": ["0", "-1", "1.5"], "min_p": ["-0.1", "1.5"],
        "frequency_penalty": ["-2.5", "2.5"], "presence_penalty": ["-2.5", "2.5"],
        "repetition_penalty": ["0", "-1", "1e-300", "100.5"], "top_k": ["-2", str(2 ** 31)],
        "max_tokens": ["0", "-1", "1000000", "2.0"], "n": ["0", "-1", str(MAX_N + 1)],
        "logprobs": ["-1", str(MAX_LOGPROBS + 1)], "seed": [str(2 ** 64), str(-2 ** 63 - 1), "1.5"],
        "best_of": [str(MAX_N + 1)],
    },
    CHAT: {
        "temperature": ["-0.5"], "top_logprobs": ["-1", str(MAX_LOGPROBS + 1)],
        "max_completion_tokens": ["0", "1000000"], "max_tokens": ["1000000"],
    },
}
NUMBER_CASES = [(path, field, literal) for path, fields in NUMBERS.items() for field, bad in fields.items()
                for literal in bad + HUGE]


@pytest.mark.parametrize("path, field, literal", NUMBER_CASES,
                         ids=[f"{p.rsplit('/', 1)[1]}-{f}={v}" for p, f, v in NUMBER_CASES])
def test_a_number_out_of_range_is_a_400_naming_the_field(server: ServerProcess, path: str, field: str,
                                                         literal: str) -> None:
    body = _raw(path, field, literal)
    if field == "top_logprobs":
        body = body[:-1] + ', "logprobs": true}'
    assert_openai_error(post(server, path, body), 400, field, param=field)
    assert ok_completion(server)


AT_LIMITS = [  # (case, path, body): each value at the edge of what its field takes
    ("n = max_n", COMPLETIONS, _completion(n=MAX_N)),
    ("logprobs = max_logprobs", COMPLETIONS, _completion(logprobs=MAX_LOGPROBS, echo=True)),
    ("top_logprobs = max_logprobs", CHAT, _chat(logprobs=True, top_logprobs=MAX_LOGPROBS)),
    ("stop strings = max_stop", COMPLETIONS, _completion(stop=[f"s{i}" for i in range(MAX_STOP)])),
    ("temperature 2", COMPLETIONS, _completion(temperature=2.0)),
    ("penalties at +-2", COMPLETIONS, _completion(temperature=1.0, frequency_penalty=2.0, presence_penalty=-2.0)),
    ("repetition_penalty 0.01", COMPLETIONS, _completion(temperature=1.0, repetition_penalty=0.01)),
    ("repetition_penalty 100", COMPLETIONS, _completion(temperature=1.0, repetition_penalty=100)),
    ("top_k past the vocabulary", COMPLETIONS, _completion(temperature=1.0, top_k=VOCAB + 1)),
    ("top_k 2**31 - 1", COMPLETIONS, _completion(temperature=1.0, top_k=2 ** 31 - 1)),
    ("top_k -1 (no limit)", COMPLETIONS, _completion(temperature=1.0, top_k=-1)),
    ("seed 2**64 - 1", COMPLETIONS, _completion(temperature=1.0, seed=2 ** 64 - 1, n=2)),
    ("seed -2**63", COMPLETIONS, _completion(temperature=1.0, seed=-2 ** 63)),
    ("min_p 1", COMPLETIONS, _completion(temperature=1.0, min_p=1.0)),
    ("prompt + max_tokens = max_seq_len", COMPLETIONS, _completion(prompt="x" * (MAX_SEQ_LEN - 2), max_tokens=2)),
    ("longest prompt, default max_tokens", COMPLETIONS,
     {"model": MODEL_NAME, "prompt": [7] * (MAX_SEQ_LEN - 1)}),
    ("token ids 0 and vocab - 1", COMPLETIONS, _completion(prompt=[[0], [VOCAB - 1]])),
    ("chat content as text parts", CHAT, _chat({"role": "user", "content": [{"type": "text", "text": "a"}]})),
    ("NaN in an unknown field (ignored)", COMPLETIONS, _raw(COMPLETIONS, "vendor_extra", "NaN")),
]


@pytest.mark.parametrize("case, path, body", AT_LIMITS, ids=[c[0] for c in AT_LIMITS])
def test_values_at_the_limits_are_served(server: ServerProcess, case: str, path: str, body: Any) -> None:
    r = post(server, path, body)
    assert r.status_code == 200, (case, r.text)
    assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"]), r.text


# ---- everything else ---------------------------------------------------------------------------

def _nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return '{"model": "tiny", "prompt": ' + open_ * depth + close * depth + "}"


BAD = [
    # (case, path, body, status, words the message must contain, param: named by the message too)
    ("nested 100k lists", COMPLETIONS, _nested(100_000), 400, "nests too deeply", None),
    ("nested 100k objects", COMPLETIONS, _nested(100_000, '{"a": ', "}"), 400, "nests too deeply", None),
    ("nested 900 lists in prompt", COMPLETIONS, _nested(900), 400, "expected text", "prompt"),
    ("invalid UTF-8", COMPLETIONS, b'{"model": "tiny", "prompt": "\xff\xfe\xc3"}', 400, "not UTF-8", None),
    ("invalid UTF-8 in a chat", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xc3("}]}',
     400, "not UTF-8", None),
    ("lone surrogate", COMPLETIONS, '{"model": "tiny", "prompt": "a\\udc00b"}', 400, "lone surrogate", "prompt"),
    ("lone surrogate in a chat", CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
     400, "lone surrogate", "messages"),
    ("a 5000-digit number", COMPLETIONS, _raw(COMPLETIONS, "max_tokens", "9" * 5000), 400, "5000 digits", None),
    ("malformed JSON", COMPLETIONS, '{"model": "tiny", "prompt": ', 400, "not valid JSON", None),
    ("not an object", COMPLETIONS, "[1, 2]", 400, "JSON object", None),
    ("empty body", COMPLETIONS, b"", 400, "JSON object", None),
    ("missing prompt", COMPLETIONS, {"model": MODEL_NAME}, 400, "'prompt' is required", "prompt"),
    ("unknown model", COMPLETIONS, _completion(model="gpt-4"), 404, "gpt-4", "model"),
    ("no such endpoint", "/v1/embeddings", _completion(), 404, "no such endpoint", None),
    ("a string for a number", COMPLETIONS, _completion(temperature="hot"), 400, "'hot'", "temperature"),
    ("logit_bias", COMPLETIONS, _completion(logit_bias={"5": 1.0}), 400, "not supported", "logit_bias"),
    ("stream and n past max_n", COMPLETIONS, _completion(stream=True, n=99), 400, "server.max_n", "n"),
    # prompts
    ("empty prompt", COMPLETIONS, _completion(prompt=""), 400, "empty", "prompt"),
    ("empty prompt list", COMPLETIONS, _completion(prompt=[]), 400, "empty", "prompt"),
    ("prompt of one empty list", COMPLETIONS, _completion(prompt=[[]]), 400, "empty", "prompt"),
    ("prompt of empty lists", COMPLETIONS, _completion(prompt=[[5], []]), 400, "prompt 1", "prompt"),
    ("prompt of an empty text", COMPLETIONS, _completion(prompt=["a", ""]), 400, "prompt 1", "prompt"),
    ("token id = vocabulary size", COMPLETIONS, _completion(prompt=[5, VOCAB]), 400, str(VOCAB), "prompt"),
    ("negative token id", COMPLETIONS, _completion(prompt=[[5], [-1]]), 400, "-1", "prompt"),
    ("token id 2**70", COMPLETIONS, _completion(prompt=[2 ** 70]), 400, str(2 ** 70), "prompt"),
    ("token id 2**63", COMPLETIONS, _completion(prompt=[[2 ** 63, 1]]), 400, str(2 ** 63), "prompt"),
    ("float token id", COMPLETIONS, _completion(prompt=[1.0]), 400, "prompt", "prompt"),
    ("prompt one past max_seq_len with max_tokens", COMPLETIONS,
     _completion(prompt="x" * (MAX_SEQ_LEN - 2), max_tokens=3), 400, f"{MAX_SEQ_LEN}", "max_tokens"),
    ("prompt of max_seq_len tokens", COMPLETIONS, _completion(prompt=[7] * MAX_SEQ_LEN), 400,
     f"at most {MAX_SEQ_LEN}", "prompt"),
    ("huge max_tokens", COMPLETIONS, _completion(max_tokens=2 ** 62), 400, str(2 ** 62), "max_tokens"),
    # stop
    ("stop strings past max_stop", COMPLETIONS, _completion(stop=[f"s{i}" for i in range(MAX_STOP + 1)]), 400,
     "server.max_stop", "stop"),
    ("thousands of stop strings", COMPLETIONS, _completion(stop=[f"s{i}" for i in range(5000)]), 400,
     "server.max_stop", "stop"),
    ("thousands of stop token ids", COMPLETIONS, _completion(stop_token_ids=list(range(5000))), 400,
     "server.max_stop", "stop_token_ids"),
    ("stop token id outside the vocabulary", COMPLETIONS, _completion(stop_token_ids=[VOCAB]), 400, str(VOCAB),
     "stop_token_ids"),
    ("stop as a number", COMPLETIONS, _completion(stop=5), 400, "stop", "stop"),
    ("logit_bias with NaN", COMPLETIONS, _raw(COMPLETIONS, "logit_bias", '{"5": NaN}'), 400, "logit_bias",
     "logit_bias"),
    # chat messages
    ("odd role", CHAT, _chat({"role": "wizard", "content": "hi"}), 400, "messages.0.role", "messages"),
    ("missing role", CHAT, _chat({"content": "hi"}), 400, "messages.0.role", "messages"),
    ("missing content", CHAT, _chat({"role": "user"}), 400, "'messages.0.content' is required", "messages"),
    ("null content", CHAT, _chat({"role": "assistant", "content": None}), 400, "messages.0.content", "messages"),
    ("numeric content", CHAT, _chat({"role": "user", "content": "a"}, {"role": "user", "content": 5}), 400,
     "messages.1.content", "messages"),
    ("object content", CHAT, _chat({"role": "user", "content": {"text": "hi"}}), 400, "messages.0.content",
     "messages"),
    ("image content part", CHAT, _chat({"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}),
     400, "messages.0.content", "messages"),
    ("a message that is a string", CHAT, _chat("hello"), 400, "messages.0", "messages"),
    ("messages not a list", CHAT, {"model": MODEL_NAME, "messages": "hi"}, 400, "messages", "messages"),
    ("no messages", CHAT, {"model": MODEL_NAME, "messages": []}, 400, "messages", "messages"),
    ("chat past max_seq_len", CHAT, _chat({"role": "user", "content": "x" * MAX_SEQ_LEN}), 400,
     f"at most {MAX_SEQ_LEN}", "messages"),
    ("chat max_tokens and max_completion_tokens", CHAT, _chat(max_completion_tokens=2), 400, "not both",
     "max_tokens"),
]


@pytest.mark.parametrize("case, path, body, status, words, param", BAD, ids=[b[0] for b in BAD])
def test_a_hostile_request_gets_its_4xx_and_the_server_keeps_serving(server: ServerProcess, case: str, path: str,
                                                                     body: Any, status: int, words: str,
                                                                     param: str | None) -> None:
    error = assert_openai_error(post(server, path, body), status, words, param=param)
    if param is not None:
        assert param in error["message"], error
    assert ok_completion(server)


def test_ten_megabyte_bodies_get_413_and_the_server_keeps_serving(server: ServerProcess) -> None:
    prompt = b'{"model": "tiny", "prompt": "' + b"x" * (10 << 20) + b'"}'
    # with a Content-Length: refused before the body is read
    assert_openai_error(post(server, COMPLETIONS, prompt), 413, "server.max_body_bytes")

    def chunks() -> Iterator[bytes]:  # chunked, no Content-Length: refused once past the limit
        for i in range(0, len(prompt), 1 << 20):
            yield prompt[i:i + (1 << 20)]

    r = requests.post(server.url + COMPLETIONS, data=chunks(), headers={"Content-Type": "application/json"},
                      timeout=120)
    assert_openai_error(r, 413, "server.max_body_bytes")
    # just under the limit: read, and refused for what it says (the prompt), not for its size
    under = _completion(prompt="x" * (MAX_BODY - 200))
    assert_openai_error(post(server, COMPLETIONS, under), 400, f"at most {MAX_SEQ_LEN}", param="prompt")
    assert ok_completion(server)


def test_after_all_of_them_the_server_is_healthy_and_answered_no_5xx(server: ServerProcess) -> None:
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert ok_completion(server)
    chat = post(server, CHAT, _chat(max_tokens=3))
    assert chat.status_code == 200, chat.text
    metrics = requests.get(server.url + "/metrics", timeout=30).text
    assert 'polar_requests_total{status="4' in metrics  # the hostile requests were counted
    assert 'polar_requests_total{status="5' not in metrics, metrics
