"""The server's pieces that need no process: incremental detokenization against whole-sequence
decoding (multi-byte characters split across tokens), stop strings found across arrivals, choice
seeds, the Prometheus text format, request validation messages (and the top_k bound), and the
server config checks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (scripts/setup.sh installs it)")  # e.g. the GPU host
from pydantic import BaseModel

from polar_dist.config import config_from_dict
from polar_dist.errors import UserError
from polar_dist.models.tokenizer import ByteTokenizer
from polar_dist.server.detokenize import IncrementalDetokenizer, StopStrings
from polar_dist.server.errors import APIError, unreadable_body, validation_message
from polar_dist.server.metrics import ServerMetrics
from polar_dist.server.prepare import Limits, completion_job, derive_seed
from polar_dist.server.protocol import ChatCompletionRequest, CompletionRequest


def _pieces(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        k = rng.randint(1, 3)
        out.append(ids[i:i + k])
        i += k
    return out


@pytest.mark.parametrize("text", ["plain ascii text", "héllo wörld — ünïcödé ✓ 日本語 🙂🙂", "a\u0301b"])
def test_incremental_text_equals_decoding_the_whole(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    rng = random.Random(0)
    for _ in range(20):
        detok = IncrementalDetokenizer(tok)
        parts = [detok.push(p) for p in _pieces(ids, rng)]
        assert all("\ufffd" not in p for p in parts)  # an incomplete character waits for its bytes
        assert "".join(parts) + detok.flush() == text


def test_incremental_text_of_a_real_tokenizer() -> None:
    from polar_dist.config import load_config
    from polar_dist.models.loader import resolve_source
    from polar_dist.models.tokenizer import HFTokenizer

    root = Path(__file__).resolve().parents[1]
    source = resolve_source(load_config(root / "configs/smollm2-135m.yaml").model)
    tok = HFTokenizer(source.directory, source.spec.eos_token_ids)
    text = "Grüße aus Köln! 🙂 Ça va? 数学 is  spaced\n\tout."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == tok.decode(ids)


def test_stop_strings_across_arrivals() -> None:
    stops = StopStrings(["STOP", "\n\n"])
    out = []
    for piece in ["hello S", "TO", "P after"]:
        text, stopped = stops.push(piece)
        out.append(text)
    assert "".join(out) == "hello " and stopped
    stops = StopStrings(["xyz"])
    assert stops.push("abxy") == ("ab", False)  # "xy" could begin the stop string: held back
    assert stops.flush("w") == "xyw"  # the end: what was held back is emitted
    stops = StopStrings([])
    assert stops.push("anything") == ("anything", False)
    earliest = StopStrings(["b", "a"])
    assert earliest.push("xxabxx") == ("xx", True)  # the first occurrence of any stop string


def test_choice_seeds() -> None:
    assert derive_seed(7, 0) == 7  # n = 1 samples as the same request with that seed
    seeds = {derive_seed(s, j) for s in range(50) for j in range(1, 5)}
    assert len(seeds) == 200 and all(0 <= s < 1 << 64 for s in seeds)
    assert derive_seed(-1, 1) == derive_seed((1 << 64) - 1, 1)  # a signed seed is its unsigned twin


def test_prometheus_text_format() -> None:
    m = ServerMetrics(replica=1, num_replicas=2, tp=4)
    m.requests.inc(status="200")
    m.requests.inc(status="200")
    m.requests.inc(status="400")
    m.step_seconds.observe(0.003)
    m.step_seconds.observe(7.0)
    m.kv_blocks_used.set(5)
    text = m.render()
    lines = text.splitlines()
    assert 'polar_requests_total{status="200"} 2' in lines and 'polar_requests_total{status="400"} 1' in lines
    assert "# TYPE polar_step_seconds histogram" in lines
    assert 'polar_replica_info{replica="1",replicas="2",tp="4"} 1' in lines  # which replica a scrape came from
    assert 'polar_step_seconds_bucket{le="0.0025"} 0' in lines
    assert 'polar_step_seconds_bucket{le="0.005"} 1' in lines
    assert 'polar_step_seconds_bucket{le="+Inf"} 2' in lines
    assert "polar_step_seconds_count 2" in lines and "polar_kv_blocks_in_use 5" in lines
    for line in lines:  # every sample line is `name{labels} value`
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


LIMITS = Limits(model_name="m", max_n=4, max_logprobs=5, max_stop=4, max_choices=16, max_seq_len=32,
                default_max_tokens=64, vocab_size=300)


def test_requests_become_choices_with_their_own_seeds_and_bounded_lengths() -> None:
    tok = ByteTokenizer()
    req = CompletionRequest(model="m", prompt=["ab", "cdef"], n=2, seed=5, temperature=0.7)
    job = completion_job(req, tok, LIMITS)
    assert [(c.index, c.prompt_index) for c in job.choices] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert [c.params.seed for c in job.choices] == [5, derive_seed(5, 1)] * 2
    # no max_tokens: engine.max_new_tokens, bounded by what the model's length leaves
    assert [c.params.max_new_tokens for c in job.choices] == [30, 30, 28, 28]


def test_validation_messages_name_the_field_and_value() -> None:
    from pydantic import ValidationError

    def message(model: type[BaseModel], body: str, descriptions: dict[str, str]) -> tuple[str, str | None]:
        with pytest.raises(ValidationError) as e:
            model.model_validate_json(body)
        return validation_message(e.value.errors(), descriptions, json.loads(body))

    text, param = message(CompletionRequest, '{"model": "m", "prompt": "x", "top_p": "high"}', {})
    assert param == "top_p" and "'high'" in text
    # a union names the field and what it takes, not pydantic's name of an alternative
    text, param = message(CompletionRequest, '{"model": "m", "prompt": [1.5]}', {"prompt": "text or token ids"})
    assert param == "prompt" and text.startswith("invalid 'prompt' = [1.5]") and "expected text or token ids" in text
    # a nested field: the path into the body, the top-level field as param
    chat = '{"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]}'
    text, param = message(ChatCompletionRequest, chat, {})
    assert param == "messages" and text.startswith("invalid 'messages.1.content' = 5")
    text, param = message(ChatCompletionRequest, '{"model": "m", "messages": [{"role": "user"}]}', {})
    assert (text, param) == ("'messages.0.content' is required", "messages")
    text, param = message(CompletionRequest, '{"model": "m", "prompt": "x", "logit_bias": {"7": NaN}}', {})
    assert param == "logit_bias" and text.startswith("invalid 'logit_bias.7' = nan") and "finite" in text


def test_unreadable_bodies_say_why() -> None:
    assert unreadable_body(RecursionError()) == "its JSON nests too deeply"
    with pytest.raises(UnicodeDecodeError) as not_utf8:
        b"\xff".decode()
    assert unreadable_body(not_utf8.value) == "it is not UTF-8 (invalid start byte at byte 0)"
    with pytest.raises(ValueError) as too_long:
        int("9" * 5000)
    assert unreadable_body(too_long.value).endswith("value has 5000 digits")  # without Python's advice to the server


def test_top_k_is_bounded_by_int32_and_minus_one_or_past_the_vocabulary_means_no_limit() -> None:
    tok = ByteTokenizer()
    with pytest.raises(APIError, match=r"top_k = 2147483648 must be in \[-1, 2\*\*31 - 1\]") as e:
        completion_job(CompletionRequest(model="m", prompt="a", top_k=1 << 31), tok, LIMITS)
    assert e.value.param == "top_k"
    job = completion_job(CompletionRequest(model="m", prompt="a", top_k=(1 << 31) - 1), tok, LIMITS)
    assert job.choices[0].params.top_k == 0  # >= the vocabulary: every token, as 0 says
    assert completion_job(CompletionRequest(model="m", prompt="a", top_k=7), tok, LIMITS).choices[0].params.top_k == 7
    assert completion_job(CompletionRequest(model="m", prompt="a", top_k=-1), tok, LIMITS).choices[0].params.top_k == 0


@pytest.mark.parametrize("field, value, words", [
    ("port", 70000, "server.port = 70000"),
    ("max_n", 0, "server.max_n = 0"),
    ("max_logprobs", 21, "server.max_logprobs = 21"),
    ("drain_timeout_s", -1.0, "server.drain_timeout_s = -1.0"),
    ("host", "", "server.host is empty"),
])
def test_server_config_is_checked_at_load(field: str, value: object, words: str) -> None:
    with pytest.raises(UserError, match=words.replace(".", r"\.")):
        config_from_dict({"model": {"path": "embedded:smollm2-135m"}, "server": {field: value}})
