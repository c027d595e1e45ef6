"""An API request -> the engine requests it fans out to, validated: prompt ids, and per choice a
SamplingParams (n > 1 gives each choice its own seed, derived from the request's).

    job = completion_job(request, tokenizer, limits)    # raises APIError(400, ...) naming the field
    for choice in job.choices: bridge.submit(job.prompts[choice.prompt_index], choice.params, ...)

Choice `index` is prompt_index * n + j, as the OpenAI API numbers the choices of several prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from polar_dist.engine.sampling import SamplingParams
from polar_dist.errors import UserError
from polar_dist.models.tokenizer import Tokenizer
from polar_dist.server.errors import APIError
from polar_dist.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

_U64 = (1 << 64) - 1
INT32_MAX = (1 << 31) - 1  # the sampler packs top_k as int32


@dataclass(frozen=True)
class Limits:
    """What a request may ask, from the config and the engine."""

    model_name: str
    max_n: int
    max_logprobs: int
    max_stop: int
    max_choices: int  # engine requests one API request may fan out to (server.max_queued_requests)
    max_seq_len: int  # prompt + generated tokens
    default_max_tokens: int  # engine.max_new_tokens
    vocab_size: int


@dataclass(frozen=True)
class Choice:
    index: int
    prompt_index: int
    params: SamplingParams


@dataclass(frozen=True)
class Job:
    prompts: list[list[int]]
    choices: list[Choice]
    stop: list[str]
    logprobs: int | None  # top N per token (None: no logprobs)
    echo: bool
    stream: bool
    include_usage: bool
    return_token_ids: bool


def derive_seed(seed: int, j: int) -> int:
    """Choice j's seed: the request's own for j = 0 (n = 1 samples as a seeded single request);
    for j > 0 a splitmix64 mix, so choices differ and no two (seed, j) pairs collide simply."""
    if j == 0:
        return seed
    z = ((seed & _U64) + j * 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def check_model(name: str, limits: Limits) -> None:
    if name != limits.model_name:
        raise APIError(404, f"model {name!r} is not served here; this server serves {limits.model_name!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")


def completion_job(req: CompletionRequest, tokenizer: Tokenizer, limits: Limits) -> Job:
    check_model(req.model, limits)
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported; leave it out", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of = {req.best_of} is not supported (only best_of = n); leave it out",
                       param="best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= limits.max_logprobs:
        raise APIError(400, f"logprobs = {req.logprobs} must be in [0, {limits.max_logprobs}] "
                            "(server.max_logprobs)", param="logprobs")
    prompts = _completion_prompts(req.prompt, tokenizer)
    return _job(req, prompts, "prompt", req.max_tokens, "max_tokens", req.logprobs, req.echo, limits)


def chat_job(req: ChatCompletionRequest, tokenizer: Tokenizer, limits: Limits) -> Job:
    check_model(req.model, limits)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs = true", param="top_logprobs")
    top = (req.top_logprobs or 0) if req.logprobs else None
    if top is not None and not 0 <= top <= limits.max_logprobs:
        raise APIError(400, f"top_logprobs = {top} must be in [0, {limits.max_logprobs}] (server.max_logprobs)",
                       param="top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give max_completion_tokens or max_tokens, not both", param="max_tokens")
    messages = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": _utf8(content, "messages")})
    try:
        prompt = tokenizer.chat_prompt(messages)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    return _job(req, [prompt], "messages", max_tokens, name, top, False, limits)


def _utf8(text: str, param: str) -> str:
    """JSON may escape lone surrogates ("\\ud800"), which no UTF-8 tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode (a lone surrogate U+{ord(text[e.start]):04X} at character "
                            f"{e.start}); send UTF-8 text", param=param) from None
    return text


def _completion_prompts(prompt: str | list, tokenizer: Tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(_utf8(prompt, "prompt"))]
    if not prompt:
        raise APIError(400, "the prompt is empty; give text or at least one token id", param="prompt")
    if isinstance(prompt[0], str):
        return [tokenizer.encode(_utf8(p, "prompt")) for p in prompt]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [list(p) for p in prompt]


def _job(req: SamplingFields, prompts: list[list[int]], prompt_name: str, max_tokens: int | None,
         max_tokens_name: str, logprobs: int | None, echo: bool, limits: Limits) -> Job:
    """prompt_name: the field the prompts came from ("prompt", or "messages" for a chat), which
    errors about them name."""
    if not 1 <= req.n <= limits.max_n:
        raise APIError(400, f"n = {req.n} must be in [1, {limits.max_n}] (server.max_n)", param="n")
    if len(prompts) * req.n > limits.max_choices:
        raise APIError(400, f"{len(prompts)} prompts x n = {req.n} is more than the {limits.max_choices} requests "
                            "the server queues (server.max_queued_requests); send fewer at once", param=prompt_name)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported; leave it out", param="logit_bias")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{max_tokens_name} = {max_tokens} must be >= 1", param=max_tokens_name)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stop_ids = list(req.stop_token_ids or [])
    if len(stop) + len(stop_ids) > limits.max_stop:
        raise APIError(400, f"stop has {len(stop)} strings and stop_token_ids {len(stop_ids)} ids: more than "
                            f"{limits.max_stop} in all (server.max_stop)", param="stop" if stop else "stop_token_ids")
    outside = [t for t in stop_ids if not 0 <= t < limits.vocab_size]
    if outside:
        raise APIError(400, f"stop_token_ids: token id {outside[0]} is outside the vocabulary [0, {limits.vocab_size})",
                       param="stop_token_ids")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options needs stream = true", param="stream_options")
    if not -1 <= req.top_k <= INT32_MAX:
        raise APIError(400, f"top_k = {req.top_k} must be in [-1, 2**31 - 1] (0 or -1: no limit)", param="top_k")
    # -1 (vLLM's "no limit") and top_k >= the vocabulary keep every token: the same as 0
    top_k = 0 if req.top_k == -1 or req.top_k >= limits.vocab_size else req.top_k
    choices = []
    for i, ids in enumerate(prompts):
        try:
            _check_prompt(ids, limits)
        except UserError as e:
            where = prompt_name if len(prompts) == 1 else f"{prompt_name} {i}"
            raise APIError(400, f"{where}: {e}", param=prompt_name) from None
        n_new = max_tokens if max_tokens is not None else min(limits.default_max_tokens, limits.max_seq_len - len(ids))
        if len(ids) + n_new > limits.max_seq_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens and {max_tokens_name} is {n_new}: more than the "
                                f"model's {limits.max_seq_len} tokens; shorten the prompt or lower {max_tokens_name}",
                           param=max_tokens_name)
        for j in range(req.n):
            seed = None if req.seed is None else derive_seed(req.seed, j)
            try:
                params = SamplingParams(
                    max_new_tokens=n_new, temperature=req.temperature, top_p=req.top_p, top_k=top_k,
                    min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                    frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty, seed=seed,
                    ignore_eos=req.ignore_eos, logprobs=logprobs,
                    prompt_logprobs=logprobs if echo and logprobs is not None else None,
                    stop_token_ids=tuple(stop_ids))
            except UserError as e:
                field = str(e).split(" ", 1)[0]
                raise APIError(400, str(e), param=field if field in type(req).model_fields else None) from None
            choices.append(Choice(i * req.n + j, i, params))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Job(prompts, choices, stop, logprobs, echo, req.stream, include_usage, req.return_token_ids)


def _check_prompt(ids: list[int], limits: Limits) -> None:
    if not ids:
        raise UserError("the prompt is empty; give at least one token")
    outside = [t for t in ids if not 0 <= t < limits.vocab_size]
    if outside:
        raise UserError(f"token id {outside[0]} is outside the vocabulary [0, {limits.vocab_size})")
    if len(ids) >= limits.max_seq_len:
        raise UserError(f"the prompt has {len(ids)} tokens but the model takes at most {limits.max_seq_len} "
                        "(prompt + at least one new token); shorten the prompt")
