"""Next-token sampling on rank 0: greedy, or temperature with top-k / top-p and a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polar_dist.errors import UserError


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens = {self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise UserError(f"temperature = {self.temperature} must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p = {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise UserError(f"top_k = {self.top_k} must be >= 0 (0 disables it)")


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: (V,) float32 of one sequence -> the next token id."""
    if params.temperature == 0:
        return int(torch.argmax(logits).item())
    # Shift by the max first: the best token's logit becomes 0, so a tiny temperature sends the
    # others to -inf instead of overflowing to inf.
    logits = logits.float().cpu()
    logits = (logits - logits.max()) / params.temperature
    if params.top_k:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[torch.topk(logits, min(params.top_k, logits.numel())).indices] = True  # exactly k, ties or not
        logits = logits.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator).item())
