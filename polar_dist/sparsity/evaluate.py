"""Accuracy through the runtime's own decode path: teacher-forced NLL, perplexity, multiple choice.

Every score here comes from decode steps exactly as serving runs them: the scheduler's batches
(max_batch_size sequences at a time), the paged KV cache, and the run's sparse decode (head
routers or the oracle, selective attention, sparse MLP). A `Request` is a token sequence whose
first `prefill_len` tokens are prefilled (dense, as every prefill is); each later token is fed by
a decode step, in place of the token the engine would have sampled (teacher forcing), and the
logits of the decode step that fed tokens[i - 1] score tokens[i]. So tokens[prefill_len + 1:]
are scored, every one by a decode step; tokens[prefill_len] is predicted by the prefill and is
not scored.

    rt = build_runtime(cfg, ctx)
    ppl = segment_perplexity(rt, perplexity_segments(ids, seg_len=256))    # NLLTotal
    mc = score_choices(rt, read_choice_items("task.jsonl"))               # ChoiceScores

Under tensor parallelism every rank calls these with the same arguments: teacher-forced steps
depend only on the inputs, so each rank's scheduler plans the same steps (no broadcast is
needed), and every rank gets the scores (the LM head gathers the logits on every rank).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from polar_dist.engine.sampling import SamplingParams
from polar_dist.errors import UserError
from polar_dist.models.tokenizer import Tokenizer
from polar_dist.runtime import LocalSteps, Runtime
from polar_dist.sparsity.choice_tasks import ChoiceItem
from polar_dist.sparsity.text import token_segments

# Dense prefill before each perplexity segment's decode steps: enough context that the first
# scored tokens are not near-unconditional guesses, short enough that almost all of a 256-token
# segment (239 tokens) is scored by decode steps.
PREFIX_LEN = 16
SEGMENT_LEN = 256


@dataclass(frozen=True)
class Request:
    """tokens[:prefill_len] are prefilled; tokens[prefill_len + 1:] are scored by decode steps."""

    tokens: list[int]
    prefill_len: int

    @property
    def num_scored(self) -> int:
        return len(self.tokens) - self.prefill_len - 1


@dataclass(frozen=True)
class NLLTotal:
    nll_sum: float  # natural log, summed over the scored tokens
    tokens: int  # scored tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)


def decode_nll(rt: Runtime, requests: Sequence[Request]) -> list[torch.Tensor]:
    """Per request, (num_scored,) float64 NLL of tokens[prefill_len + 1:], in order."""
    steps = LocalSteps(rt)
    scheduler = steps.scheduler
    for i, r in enumerate(requests):
        if r.prefill_len < 1 or r.num_scored < 1:
            raise UserError(f"request {i} has {len(r.tokens)} tokens and prefill_len {r.prefill_len}: it needs at "
                            "least one prefilled token and two after them (one fed by a decode step, one scored)")
        if len(r.tokens) > scheduler.max_seq_len:
            raise UserError(f"request {i} has {len(r.tokens)} tokens, more than the runtime's maximum sequence "
                            f"length {scheduler.max_seq_len}; raise engine.max_seq_len or use shorter segments")
    # Waves of max_batch_size requests, the next added once the last has finished: a request
    # admitted while others decode would share a mixed step, whose decode rows read every head.
    pending = deque(range(len(requests)))
    index: dict[int, int] = {}  # scheduler request id -> index into requests
    nll = [torch.full((r.num_scored,), math.nan, dtype=torch.float64) for r in requests]
    while True:
        if not scheduler.has_work():
            if not pending:
                break
            for _ in range(min(scheduler.max_batch_size, len(pending))):
                i = pending.popleft()
                r = requests[i]
                seq = scheduler.add(r.tokens[:r.prefill_len],
                                    SamplingParams(max_new_tokens=len(r.tokens) - r.prefill_len, ignore_eos=True),
                                    seed=0)
                index[seq.request_id] = i
        step = steps.next()
        assert step is not None, "a wave with work must give a step"
        if not step.is_decode and step.num_decode:
            if any(s.prefill_len > len(s.prompt_ids) for s in scheduler.running):
                raise _preempted()
            raise UserError(f"the evaluation batch's prefills did not fit one step, so some positions would be "
                            f"scored by a dense mixed step; raise engine.max_num_batched_tokens (now "
                            f"{scheduler.max_num_batched_tokens}) to at least engine.max_batch_size x the prefill "
                            "length, or shorten the prefill")
        logits = rt.runner.logits(step).double()  # (B, V): the sampled rows, in step.sample_ids order
        stepped = [scheduler.requests[i] for i in step.sample_ids]
        rows = [requests[index[s.request_id]] for s in stepped]
        # The step fed each sequence's last token; its logits predict the text's next one.
        targets = [r.tokens[s.num_tokens] for r, s in zip(rows, stepped)]
        if step.is_decode:
            target = torch.tensor(targets, device=logits.device).unsqueeze(1)  # (B, 1)
            step_nll = (torch.logsumexp(logits, dim=-1) - logits.gather(1, target).squeeze(1)).cpu()  # (B,)
            for s, r, value in zip(stepped, rows, step_nll):
                nll[index[s.request_id]][s.num_tokens - r.prefill_len - 1] = value
        steps.feed(step, targets)
    if any(torch.isnan(v).any() for v in nll):
        raise _preempted()
    return nll


def _preempted() -> UserError:
    # A preempted sequence is recomputed by a prefill, which would score a position densely.
    return UserError("the KV cache was too small for the evaluation batch and a sequence was preempted, so some "
                     "positions were not scored by decode steps; raise engine.kv_cache_blocks (or set it to 0) "
                     "or lower engine.max_batch_size")


def perplexity_segments(ids: Sequence[int], seg_len: int = SEGMENT_LEN, max_tokens: int | None = None
                        ) -> list[list[int]]:
    """Consecutive non-overlapping segments of `seg_len` tokens from the first `max_tokens` ids
    (all of them when None); a last partial segment is dropped."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return token_segments(ids, seg_len, seg_len)


def segment_perplexity(rt: Runtime, segments: Sequence[Sequence[int]], prefix_len: int = PREFIX_LEN) -> NLLTotal:
    """Token-weighted NLL of every segment's tokens after its first prefix_len + 1."""
    nll = decode_nll(rt, [Request(list(s), prefix_len) for s in segments])
    return NLLTotal(sum(v.sum().item() for v in nll), sum(v.numel() for v in nll))


@dataclass(frozen=True)
class ChoiceScores:
    logliks: list[list[float]]  # per item, the summed log-likelihood of each choice's tokens
    choice_bytes: list[list[int]]  # per item, each choice's length in UTF-8 bytes
    labels: list[int]

    @property
    def predictions(self) -> list[int]:
        return [max(range(len(ll)), key=ll.__getitem__) for ll in self.logliks]

    @property
    def predictions_norm(self) -> list[int]:
        """Chosen by log-likelihood per byte, which does not favour short choices."""
        return [max(range(len(ll)), key=lambda c: ll[c] / max(1, nb[c])) for ll, nb in
                zip(self.logliks, self.choice_bytes)]

    @property
    def accuracy(self) -> float:
        return sum(p == y for p, y in zip(self.predictions, self.labels)) / len(self.labels)

    @property
    def accuracy_norm(self) -> float:
        return sum(p == y for p, y in zip(self.predictions_norm, self.labels)) / len(self.labels)


def choice_token_split(tokenizer: Tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split as lm-eval does: whitespace at the end of the
    context moves to the continuation, the pair is encoded whole, and the continuation is what
    follows the context's own encoding (so its first token is the one the model would produce)."""
    stripped = context.rstrip()
    choice = context[len(stripped):] + choice
    ctx_ids = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + choice)
    return ctx_ids, whole[len(ctx_ids):]


def score_choice_ids(rt: Runtime, contexts: Sequence[Sequence[int]], choices: Sequence[Sequence[Sequence[int]]]
                     ) -> list[list[float]]:
    """Summed log-likelihood of each choice's tokens after its context, every token scored by a
    decode step: the context but its last token is prefilled, the last is fed by decode."""
    requests, owner = [], []
    for i, (ctx, options) in enumerate(zip(contexts, choices)):
        if len(ctx) < 2:
            raise UserError(f"multiple-choice item {i}: its context has {len(ctx)} token(s); give at least 2 (one to "
                            "prefill, one fed by a decode step)")
        for j, cont in enumerate(options):
            if not cont:
                raise UserError(f"multiple-choice item {i}: choice {j} has no tokens after the context")
            requests.append(Request(list(ctx) + list(cont), len(ctx) - 1))
            owner.append(i)
    logliks: list[list[float]] = [[] for _ in contexts]
    for i, nll in zip(owner, decode_nll(rt, requests)):
        logliks[i].append(-nll.sum().item())
    return logliks


def score_choices(rt: Runtime, items: Sequence[ChoiceItem]) -> ChoiceScores:
    if not items:
        raise UserError("no multiple-choice items to score")
    contexts, choices = [], []
    for item in items:
        pairs = [choice_token_split(rt.tokenizer, item.context, c) for c in item.choices]
        contexts.append(pairs[0][0])
        choices.append([cont for _, cont in pairs])
    return ChoiceScores(score_choice_ids(rt, contexts, choices),
                        [[len(c.encode("utf-8")) for c in item.choices] for item in items],
                        [item.label for item in items])
