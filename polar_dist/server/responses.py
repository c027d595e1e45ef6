"""Response bodies from a Generation's deltas: whole (one JSON body) or streamed (server-sent
events, one `data: {chunk}` per delta, a usage chunk when asked, then `data: [DONE]`).

    body = await completion_body(gen, meta)               # /v1/completions, stream = false
    async for event in completion_events(gen, meta): ...  # stream = true
    (chat_body, chat_events: the same for /v1/chat/completions)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

from polar_dist.engine.engine import EngineDeadError
from polar_dist.engine.sampling import TokenLogprobs
from polar_dist.errors import UserError
from polar_dist.models.tokenizer import Tokenizer
from polar_dist.server.errors import error_body
from polar_dist.server.generation import Delta, Generation, RequestFailed


@dataclass(frozen=True)
class Meta:
    """What every body of one request repeats."""

    id: str
    created: int
    model: str


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def usage(gen: Generation) -> dict[str, int]:
    prompt, completion = gen.usage()
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _top_dict(tokenizer: Tokenizer, lp: TokenLogprobs) -> dict[str, float]:
    return {tokenizer.token_text(t): v for t, v in lp.top}


def completion_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprobs], prompt_ids: list[int] | None,
                        prompt_lps: list[TokenLogprobs] | None, offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object; with echo (prompt_ids given) the prompt's tokens
    come first, the first of them with no logprob (nothing predicts it)."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if prompt_ids is not None:
        tokens += [tokenizer.token_text(t) for t in prompt_ids]
        token_lps += [None] + [lp.logprob for lp in prompt_lps or []]
        tops += [None] + [_top_dict(tokenizer, lp) for lp in prompt_lps or []]
    tokens += [tokenizer.token_text(lp.token_id) for lp in lps]
    token_lps += [lp.logprob for lp in lps]
    tops += [_top_dict(tokenizer, lp) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprobs]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


class _Collected:
    """Each choice's deltas joined."""

    def __init__(self, n: int) -> None:
        self.text = [""] * n
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        self.prompt_logprobs: list[list[TokenLogprobs] | None] = [None] * n
        self.finish: list[str | None] = [None] * n

    async def collect(self, gen: Generation) -> _Collected:
        async for d in gen.deltas():
            self.text[d.index] += d.text
            self.token_ids[d.index] += d.token_ids
            self.logprobs[d.index] += d.logprobs or []
            if d.prompt_logprobs is not None:
                self.prompt_logprobs[d.index] = d.prompt_logprobs
            self.finish[d.index] = d.finish_reason or self.finish[d.index]
        return self


async def completion_body(gen: Generation, meta: Meta) -> dict[str, Any]:
    job, tok = gen.job, gen.tokenizer
    got = await _Collected(len(job.choices)).collect(gen)
    choices = []
    for c in job.choices:
        i, prompt = c.index, job.prompts[c.prompt_index]
        echo_text = tok.decode(prompt) if job.echo else ""
        choice: dict[str, Any] = {"index": i, "text": echo_text + got.text[i], "logprobs": None,
                                  "finish_reason": got.finish[i]}
        if job.logprobs is not None:
            choice["logprobs"] = completion_logprobs(tok, got.logprobs[i][:len(got.token_ids[i])],
                                                     prompt if job.echo else None, got.prompt_logprobs[i], 0)
        if job.return_token_ids:
            choice["token_ids"], choice["prompt_token_ids"] = got.token_ids[i], prompt
        choices.append(choice)
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage(gen)}


async def chat_body(gen: Generation, meta: Meta) -> dict[str, Any]:
    job, tok = gen.job, gen.tokenizer
    got = await _Collected(len(job.choices)).collect(gen)
    choices = []
    for c in job.choices:
        i = c.index
        choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": got.text[i]},
                                  "logprobs": None, "finish_reason": got.finish[i]}
        if job.logprobs is not None:
            choice["logprobs"] = chat_logprobs(tok, got.logprobs[i])
        if job.return_token_ids:
            choice["token_ids"] = got.token_ids[i]
        choices.append(choice)
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage(gen)}


async def completion_events(gen: Generation, meta: Meta) -> AsyncIterator[str]:
    job, tok = gen.job, gen.tokenizer
    head = {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model}
    offsets = [0] * len(job.choices)  # text sent per choice (logprobs' text_offset)
    echoed = [False] * len(job.choices)

    def chunk(d: Delta) -> dict[str, Any]:
        prompt = job.prompts[job.choices[d.index].prompt_index]
        echo = job.echo and not echoed[d.index]  # the prompt (and its logprobs) go with the first chunk
        echoed[d.index] = True
        text = (tok.decode(prompt) if echo else "") + d.text
        choice: dict[str, Any] = {"index": d.index, "text": text, "logprobs": None, "finish_reason": d.finish_reason}
        if job.logprobs is not None:
            choice["logprobs"] = completion_logprobs(tok, d.logprobs or [], prompt if echo else None,
                                                     d.prompt_logprobs, offsets[d.index])
        if job.return_token_ids:
            choice["token_ids"] = d.token_ids
            if echo:
                choice["prompt_token_ids"] = prompt
        offsets[d.index] += len(text)
        return {**head, "choices": [choice]}

    async for event in _stream(gen, chunk, head):
        yield event


async def chat_events(gen: Generation, meta: Meta) -> AsyncIterator[str]:
    job, tok = gen.job, gen.tokenizer
    head = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model}
    started = [False] * len(job.choices)

    def chunk(d: Delta) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": d.text}
        if not started[d.index]:
            started[d.index] = True
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": d.index, "delta": delta, "logprobs": None, "finish_reason": d.finish_reason}
        if job.logprobs is not None:
            choice["logprobs"] = chat_logprobs(tok, d.logprobs or [])
        if job.return_token_ids:
            choice["token_ids"] = d.token_ids
        return {**head, "choices": [choice]}

    async for event in _stream(gen, chunk, head):
        yield event


async def _stream(gen: Generation, chunk: Any, head: dict[str, Any]) -> AsyncIterator[str]:
    try:
        async for d in gen.deltas():
            yield sse(chunk(d))
    except UserError as e:  # headers are sent: the error travels as an event
        yield sse(error_body(400, str(e)))
    except RequestFailed as e:
        yield sse(error_body(500, str(e)))
    except EngineDeadError as e:
        yield sse(error_body(503, str(e)))
    else:
        if gen.job.include_usage:
            yield sse({**head, "choices": [], "usage": usage(gen)})
    yield sse("[DONE]")
