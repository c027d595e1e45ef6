"""Sampling on the device for a whole step in one pass; one device-to-host copy per step.

    sampler = Sampler(vocab_size, device, use_kernel=device.type == "cuda")
    out = sampler.sample(logits, rows, prompt_rows)   # logits (R + P, V) float32 on the device

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
from typing import Sequence

import numpy as np
import torch

from kernels.dispatch import Backend, KernelOps
from polar_dist.errors import UserError

MAX_LOGPROBS = 20  # the OpenAI API's limit for top logprobs
_U64 = 1 << 64


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
        if self.top_k < 0:
            raise UserError(f"top_k = {self.top_k} must be >= 0 (0 disables it)")
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


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, use_kernel: bool) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.ops = KernelOps(Backend.TRITON if use_kernel else Backend.TORCH)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Sequence[SampleRow], prompt: PromptRows | None = None) -> SampleOutput:
        """logits: (R + P, V) float32 on the device, the R sampled rows first."""
        R, dev = len(rows), self.device
        P = len(prompt.targets) if prompt else 0
        assert logits.shape[0] == R + P, (logits.shape, R, P)
        raw = logits[:R]
        floats = torch.tensor([[r.params.temperature, r.params.top_p, r.params.min_p] for r in rows],
                              dtype=torch.float32).reshape(R, 3).to(dev, non_blocking=True)
        ints = torch.tensor([[r.params.top_k, as_signed64(r.seed), r.counter] for r in rows],
                            dtype=torch.int64).reshape(R, 3).to(dev, non_blocking=True)
        penalized = self._penalize(raw, rows)
        tokens = self.ops.sample_tokens(penalized, floats[:, 0].contiguous(), ints[:, 0].to(torch.int32),
                                        floats[:, 1].contiguous(), floats[:, 2].contiguous(), ints[:, 1].contiguous(),
                                        ints[:, 2].contiguous())  # (R,)
        parts = [tokens.to(torch.int32)]
        n = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=-1)
        if n >= 0:
            lp = torch.log_softmax(raw, dim=-1)  # (R, V)
            parts += _logprob_parts(lp, tokens.clamp(min=0), n)
        if P:
            assert prompt is not None
            lp = torch.log_softmax(logits[R:], dim=-1)  # (P, V)
            targets = torch.tensor(prompt.targets, dtype=torch.int64).to(dev, non_blocking=True)
            parts += _logprob_parts(lp, targets, prompt.n)
        host = torch.cat([p.reshape(-1) for p in parts]).cpu().numpy()  # the step's one device-to-host copy
        token_ids = host[:R].astype(np.int64).tolist()
        off = R
        logprobs: list[TokenLogprobs | None] = [None] * R
        if n >= 0:
            chosen, off = _unpack(host, off, R, n)
            logprobs = [None if r.params.logprobs is None else _trim(c, r.params.logprobs)
                        for r, c in zip(rows, chosen)]
        prompt_lps: list[TokenLogprobs] = []
        if P:
            assert prompt is not None
            prompt_lps, off = _unpack(host, off, P, prompt.n)
        return SampleOutput(token_ids, logprobs, prompt_lps)

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
