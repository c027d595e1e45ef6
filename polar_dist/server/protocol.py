"""The OpenAI API's request and response bodies, as pydantic models (they are also the published
/openapi.json).

Requests are strict: a string where a number belongs, a float where an integer belongs, NaN or
an infinity (Python's json reads the literals `NaN` and `Infinity`) are 400s naming the field, not
coerced. Real numbers have ranges, published in the spec: the OpenAI API's where it gives one
(temperature in [0, 2], penalties in [-2, 2]), for repetition_penalty one that keeps the
sampler's float32 arithmetic finite (1e308 is inf in float32, and a logit of 0 times inf is
NaN). Integers are checked in prepare.py, with the limits that depend on the config or the model
(n, logprobs, max_tokens, top_k, token ids): the spec would publish an integer's bounds as floats
(FastAPI's OpenAPI model types them so), and a client that reads them, as schemathesis does, then
sends 5.0 where this server takes 5 only. Fields of the OpenAI API that this server does not
honour are refused when set to anything but their neutral value (`suffix`, `logit_bias`,
`best_of` != n), rather than silently ignored; other unknown fields are ignored whatever their
value, as OpenAI clients send some (`user`, `metadata`). Extensions beyond the OpenAI API, as
vLLM names them: `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`,
`return_token_ids`.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

# A completion prompt: text, texts, token ids, or lists of token ids (one request, several prompts)
Prompt = Union[str, list[str], list[int], list[list[int]]]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = Field(False, description="send a last chunk with the request's usage")


class SamplingFields(BaseModel):
    """Fields both endpoints share."""

    model_config = _STRICT
    model: str = Field(description="the served model's id, as GET /v1/models lists it")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="in [0, 2]; 0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="in (0, 1]")
    n: int = Field(1, description="choices per prompt, from 1 to server.max_n")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="text that ends a choice (not included in it)")
    seed: int | None = Field(None, description="64-bit seed: the same seed gives the same text, in any batch")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="in [-2, 2]")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="in [-2, 2]")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only null or {}")
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int = Field(0, description="0 or -1: no limit (nor is a value >= the vocabulary size); at most 2**31 - 1")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="in [0, 1]; 0 disables it")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0, description="in [0.01, 100]; 1 disables it")
    stop_token_ids: list[int] | None = Field(None, description="token ids that end a choice (kept in it)")
    ignore_eos: bool = False
    return_token_ids: bool = Field(False, description="add token_ids (and prompt_token_ids) to each choice")


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="text, texts, token ids, or lists of token ids")
    max_tokens: int | None = Field(None, description=">= 1; default engine.max_new_tokens, bounded by the "
                                                     "model's length")
    echo: bool = Field(False, description="return the prompt before the completion (with logprobs: its logprobs)")
    logprobs: int | None = Field(None, description="the sampled token's logprob and the top N, N <= "
                                                   "server.max_logprobs")
    suffix: str | None = Field(None, description="not supported: only null")
    best_of: int | None = Field(None, description="not supported beyond n")


class TextContent(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # required: null content is the OpenAI API's for an assistant turn with tool_calls, which this
    # server does not take
    content: str | list[TextContent] = Field(description="text, or a list of text parts")
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, description="deprecated name of max_completion_tokens")
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description="with logprobs: the top N, N <= server.max_logprobs")


# ---- responses -------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token (nothing predicts it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "error"] | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    """One event of a streamed completion: a choice's new text; with stream_options.include_usage
    a last one with no choices and the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "error"] | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion (the last, with stream_options.include_usage, has
    no choices and the usage)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "error"] | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "polar_dist"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
