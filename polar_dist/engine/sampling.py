"""Sampling on the device for a whole step in one pass; one device-to-host copy per step.

    sampler = Sampler(vocab_size, device, use_kernel=device.type == "cuda")
    out = sampler.sample(logits, rows, prompt_rows)   # logits (R + P, V) float32 on the device
    pending = sampler.launch(logits, rows)            # the same, without waiting: pending.tokens is
    out = pending.result()                            # on the device at once, result() waits for the host

Per row, in order: repetition / frequency / presence penalties on the raw logits (repetition
over prompt + output, the other two over the output, as in the OpenAI API and vLLM), then
temperature, min-p, top-k, top-p and a seeded Gumbel-max draw (kernels/sample_tokens.py).
Randomness comes from a hash of (seed, draw index, token id), the draw index being the number
of tokens the sequence has generated: a seeded request gets the same tokens alone or in any
batch, and after a preemption. A request without a seed gets a random one when it is added.
Log-probabilities are those of the model's distribution (log_softmax of the raw logits, before
penalties, temperature and filters), for the sampled token and the top n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from kernels.dispatch import Backend, KernelOps
from polar_dist.errors import UserError

MAX_LOGPROBS = 20  # the OpenAI API's limit for top logprobs
_U64 = 1 << 64
_I32_MAX = (1 << 31) - 1  # top_k travels to the device as int32
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0  # 0: off; else keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in prompt or output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    presence_penalty: float = 0.0  # subtracted once if the token is in the output
    seed: int | None = None  # 64 bits (signed or unsigned); None: drawn when the request is added
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; n: the sampled token's logprob and the top n
    prompt_logprobs: int | None = None  # None: off; n: each prompt token's logprob (from the 2nd) and the top n
    stop_token_ids: tuple[int, ...] = ()  # finish with "stop" after sampling one of these (besides EOS)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{name} = {value!r} must be a finite number")
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} = {value!r} must be an integer")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens = {self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise UserError(f"temperature = {self.temperature} must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p = {self.top_p} must be in (0, 1]")
        if not 0 <= self.top_k <= _I32_MAX:
            raise UserError(f"top_k = {self.top_k} must be in [0, {_I32_MAX}] (0 disables it; a k at or past the "
                            "vocabulary size keeps every token)")
        for name in ("temperature", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if abs(value) > _F32_MAX:  # the device computes in float32: it would become infinite
                raise UserError(f"{name} = {value!r} is past float32's range (|x| <= {_F32_MAX:.3g})")
        if not 0.0 <= self.min_p <= 1.0:
            raise UserError(f"min_p = {self.min_p} must be in [0, 1] (0 disables it)")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty = {self.repetition_penalty} must be > 0 (1 disables it)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(1 << 63) <= self.seed < _U64):
            raise UserError(f"seed = {self.seed!r} must be an integer that fits 64 bits, in [-2**63, 2**64)")
        if not isinstance(self.stop_token_ids, tuple) or any(
                isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids):
            raise UserError(f"stop_token_ids = {self.stop_token_ids!r} must be a tuple of integer token ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise UserError(f"{name} = {value!r} must be an integer in [0, {MAX_LOGPROBS}], or None for none")

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def as_signed64(seed: int) -> int:
    """The int64 with the same 64 bits as `seed` in [-2**63, 2**64)."""
    return seed - _U64 if seed >= 1 << 63 else seed


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model and the top n (id, logprob) of that position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class SampleRow:
    """One row to sample: the request's parameters, its seed and draw index, and (for penalties)
    its token history."""

    params: SamplingParams
    seed: int
    counter: int
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()


@dataclass(frozen=True)
class PromptRows:
    """Rows of prompt positions after the sampled rows: `targets[i]` is the prompt token that
    row i predicts; the top `n` logprobs of each are returned too."""

    targets: list[int]
    n: int


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]  # (R,) -1 where the row's logits were NaN or all -inf
    logprobs: list[TokenLogprobs | None]  # (R,) None where the row did not ask
    prompt_logprobs: list[TokenLogprobs]  # (P,)


class PendingSample:
    """A step's sampling, launched: `tokens` (R,) int64 on the device (valid until the sampler's
    next launch), and the copy of everything the host needs already queued behind it into
    pinned memory; `result()` waits for that copy alone (one device-to-host copy per step)."""

    def __init__(self, tokens: torch.Tensor, packed: torch.Tensor,
                 unpack: Callable[[np.ndarray], SampleOutput]) -> None:
        self.tokens = tokens
        self._unpack = unpack
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._copied: torch.cuda.Event | None = torch.cuda.Event()
            self._copied.record()
        else:
            self._host, self._copied = packed, None

    def result(self) -> SampleOutput:
        if self._copied is not None:
            self._copied.synchronize()
        return self._unpack(self._host.numpy())


class Sampler:
    """`graph_rows`: on CUDA with the Triton draw, batches of up to this many rows replay the
    draw from a CUDA graph (see _DrawGraphs); 0 turns that off."""

    def __init__(self, vocab_size: int, device: torch.device, use_kernel: bool, graph_rows: int = 256) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.ops = KernelOps(Backend.TRITON if use_kernel else Backend.TORCH)
        self.graphs = _DrawGraphs(self.ops, device, graph_rows) \
            if use_kernel and device.type == "cuda" and graph_rows > 0 else None

    def sample(self, logits: torch.Tensor, rows: Sequence[SampleRow], prompt: PromptRows | None = None) -> SampleOutput:
        """logits: (R + P, V) float32 on the device, the R sampled rows first."""
        return self.launch(logits, rows, prompt).result()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, rows: Sequence[SampleRow],
               prompt: PromptRows | None = None) -> PendingSample:
        """sample() without waiting for the host copy. Bad parameters raise here."""
        R, dev = len(rows), self.device
        P = len(prompt.targets) if prompt else 0
        assert logits.shape[0] == R + P, (logits.shape, R, P)
        raw = logits[:R]
        ps = [r.params for r in rows]
        distinct = list({id(p): p for p in ps}.values())  # requests share their params: usually a few
        hot = [p for p in distinct if p.temperature > 0]
        hints = {"any_hot": bool(hot), "any_top_k": any(0 < p.top_k < logits.shape[1] for p in hot),
                 "any_top_p": any(p.top_p < 1.0 for p in hot)}
        graphs = self.graphs
        n = graphs.bucket(R) if graphs is not None and R else None
        buf = _pack(rows, ps, distinct, n or R)
        penalized = self._penalize(raw, rows) if any(p.has_penalties for p in distinct) else raw
        if not R:
            tokens = torch.empty(0, dtype=torch.int64, device=dev)
        elif n is not None:
            assert graphs is not None
            tokens = graphs.draw(penalized, buf, n, hints)  # (R,) a view of the graph's output
        else:
            d = _host_to_device(buf, dev)
            tokens = self.ops.sample_tokens(penalized, *_param_views(d, R), **hints)  # (R,)
        n_lp = max((p.logprobs for p in distinct if p.logprobs is not None), default=-1)
        if n_lp < 0 and not P:  # tokens only: no packing
            return PendingSample(tokens, tokens, lambda host: SampleOutput(host.tolist(), [None] * R, []))
        parts = [tokens.to(torch.int32)]
        if n_lp >= 0:
            lp = torch.log_softmax(raw, dim=-1)  # (R, V)
            parts += _logprob_parts(lp, tokens.clamp(min=0), n_lp)
        if P:
            assert prompt is not None
            lp = torch.log_softmax(logits[R:], dim=-1)  # (P, V)
            targets = torch.tensor(prompt.targets, dtype=torch.int64).to(dev, non_blocking=True)
            parts += _logprob_parts(lp, targets, prompt.n)
        packed = torch.cat([p.reshape(-1) for p in parts])

        def unpack(host: np.ndarray) -> SampleOutput:
            token_ids = host[:R].astype(np.int64).tolist()
            off = R
            logprobs: list[TokenLogprobs | None] = [None] * R
            if n_lp >= 0:
                chosen, off = _unpack(host, off, R, n_lp)
                logprobs = [None if p.logprobs is None else _trim(c, p.logprobs) for p, c in zip(ps, chosen)]
            prompt_lps: list[TokenLogprobs] = []
            if P:
                assert prompt is not None
                prompt_lps, off = _unpack(host, off, P, prompt.n)
            return SampleOutput(token_ids, logprobs, prompt_lps)

        return PendingSample(tokens, packed, unpack)

    def _penalize(self, raw: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        which = [i for i, r in enumerate(rows) if r.params.has_penalties]
        if not which:
            return raw
        V, dev = self.vocab_size, self.device
        out = raw.clone()
        sub = out[which]  # (Rp, V)
        idx = torch.tensor(which, dtype=torch.int64, device=dev)

        def counts(histories: list[Sequence[int]]) -> torch.Tensor:
            width = max(1, max(len(h) for h in histories))
            padded = torch.full((len(histories), width), V, dtype=torch.int64)  # V: a dump column
            for i, h in enumerate(histories):
                padded[i, :len(h)] = torch.as_tensor(list(h), dtype=torch.int64)
            c = torch.zeros(len(histories), V + 1, dtype=torch.float32, device=dev)
            c.scatter_add_(1, padded.to(dev), torch.ones(padded.shape, dtype=torch.float32, device=dev))
            return c[:, :V]

        ps = [rows[i].params for i in which]
        out_counts = counts([rows[i].output_ids for i in which])  # (Rp, V)
        rep = torch.tensor([p.repetition_penalty for p in ps], dtype=torch.float32, device=dev)[:, None]
        freq = torch.tensor([p.frequency_penalty for p in ps], dtype=torch.float32, device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in ps], dtype=torch.float32, device=dev)[:, None]
        if any(p.repetition_penalty != 1.0 for p in ps):
            seen = (counts([rows[i].prompt_ids for i in which]) + out_counts) > 0
            sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * out_counts - pres * (out_counts > 0).float()
        out[idx] = sub
        return out



def _pack(rows: Sequence[SampleRow], ps: list[SamplingParams], distinct: list[SamplingParams], n: int) -> np.ndarray:
    """The draw's parameters for n >= R rows in one int32 buffer (one H2D copy): seeds, counters
    (int64), temperature, top_p, min_p (float32), top_k (int32), each a contiguous run of n. Rows
    past R are greedy (temperature 0, no filter): a graph's padding, whose tokens are ignored."""
    R = len(rows)
    buf = np.zeros(8 * n, dtype=np.int32)
    i64 = buf[:4 * n].view(np.int64)
    i64[:R] = [as_signed64(r.seed) for r in rows]
    i64[n:n + R] = [r.counter for r in rows]
    f = buf[4 * n:7 * n].view(np.float32).reshape(3, n)
    f[1, R:] = 1.0  # top_p of padding rows
    if len(distinct) == 1:
        (p,) = distinct
        f[0, :R], f[1, :R], f[2, :R], buf[7 * n:7 * n + R] = p.temperature, p.top_p, p.min_p, p.top_k
    elif R:
        f[0, :R] = [p.temperature for p in ps]
        f[1, :R] = [p.top_p for p in ps]
        f[2, :R] = [p.min_p for p in ps]
        buf[7 * n:7 * n + R] = [p.top_k for p in ps]
    return buf


def _pinned(buf: np.ndarray) -> torch.Tensor:
    """buf in page-locked memory (a block of PyTorch's caching host allocator, kept until the copy
    out of it is done): a copy from pageable memory waits on the host for the work queued ahead of
    it on the stream (the step's forward), which would stall the next step's launch."""
    t = torch.from_numpy(buf)
    return t.pin_memory() if torch.cuda.is_available() else t


def _host_to_device(buf: np.ndarray, device: torch.device) -> torch.Tensor:
    return (_pinned(buf) if device.type == "cuda" else torch.from_numpy(buf)).to(device, non_blocking=True)


def _param_views(d: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """sample_tokens' (temperature, top_k, top_p, min_p, seeds, counters) in _pack's device buffer."""
    return (d[4 * n:5 * n].view(torch.float32), d[7 * n:], d[5 * n:6 * n].view(torch.float32),
            d[6 * n:7 * n].view(torch.float32), d[:2 * n].view(torch.int64), d[2 * n:4 * n].view(torch.int64))


class _DrawGraphs:
    """The Triton draw's fixed launch sequence (2-31 launches, each costing more on the host
    than on the GPU) replayed from a CUDA graph: one per (row bucket, vocab, hints), captured on
    first use. R rows run in the smallest power-of-two bucket >= R (the last bucket is
    max_rows): their logits and parameters are copied into the bucket's static buffers, and
    the padding rows are greedy, so they only cost the max pass. Tokens do not depend on the
    bucket: the chunked draw's thresholds do not depend on the chunking (kernels/sample_tokens.py)."""

    def __init__(self, ops: KernelOps, device: torch.device, max_rows: int) -> None:
        self.ops = ops
        self.device = device
        self.buckets = [b for b in (1 << i for i in range(max_rows.bit_length())) if b < max_rows] + [max_rows]
        self._inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (n, V) -> logits, params
        self._graphs: dict[tuple[int, int, bool, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def draw(self, logits: torch.Tensor, buf: np.ndarray, n: int, hints: dict[str, bool]) -> torch.Tensor:
        """logits (R, V), buf: _pack's buffer for n rows; (R,) int64 tokens, a view of the graph's
        output that stays valid until the next draw."""
        R, V = logits.shape
        static = self._inputs.get((n, V))
        if static is None:
            static = self._inputs[(n, V)] = (torch.zeros(n, V, dtype=torch.float32, device=self.device),
                                             torch.empty(8 * n, dtype=torch.int32, device=self.device))
        static_logits, static_params = static
        static_params.copy_(_pinned(buf), non_blocking=True)
        static_logits[:R].copy_(logits)
        key = (n, V, hints["any_hot"], hints["any_top_k"], hints["any_top_p"])
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(static_logits, static_params, hints)
        graph, out = entry
        graph.replay()
        return out[:R]

    def _capture(self, logits: torch.Tensor, params: torch.Tensor,
                 hints: dict[str, bool]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        views = _param_views(params, logits.shape[0])
        # A warm-up on a side stream first: Triton compiles and loads its kernels outside the capture.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.ops.sample_tokens(logits, *views, **hints)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.ops.sample_tokens(logits, *views, **hints)
        return graph, out

def _logprob_parts(lp: torch.Tensor, chosen: torch.Tensor, n: int) -> list[torch.Tensor]:
    """int32 parts to pack: chosen ids' logprobs (as bits), top-n ids, top-n logprobs (as bits)."""
    sel = lp.gather(1, chosen[:, None])[:, 0].contiguous()  # (N,)
    parts = [chosen.to(torch.int32), sel.view(torch.int32)]
    if n > 0:
        top = torch.topk(lp, n, dim=-1)
        parts += [top.indices.to(torch.int32), top.values.contiguous().view(torch.int32)]
    return parts


def _unpack(host: np.ndarray, off: int, rows: int, n: int) -> tuple[list[TokenLogprobs], int]:
    ids = host[off:off + rows]
    off += rows
    vals = host[off:off + rows].view(np.float32)
    off += rows
    top_ids = np.zeros((rows, 0), dtype=np.int32)
    top_vals = np.zeros((rows, 0), dtype=np.float32)
    if n > 0:
        top_ids = host[off:off + rows * n].reshape(rows, n)
        off += rows * n
        top_vals = host[off:off + rows * n].view(np.float32).reshape(rows, n)
        off += rows * n
    out = [TokenLogprobs(int(i), float(v), tuple(zip(ti.tolist(), tv.tolist())))
           for i, v, ti, tv in zip(ids.tolist(), vals.tolist(), top_ids, top_vals)]
    return out, off


def _trim(lp: TokenLogprobs, n: int) -> TokenLogprobs:
    return lp if len(lp.top) == n else TokenLogprobs(lp.token_id, lp.logprob, lp.top[:n])
