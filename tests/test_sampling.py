"""Device sampling (polar_dist/engine/sampling.py, kernels/sample_tokens.py): the Triton kernel
(interpreter on CPU) draws exactly the reference's tokens; the draws follow the filtered
softmax; filters, penalties and logprobs do what the OpenAI API says; a seeded row's token does
not depend on the other rows; bad parameters are refused naming the field."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.sample_tokens import sample_tokens, sample_tokens_ref
from polar_dist.engine.sampling import PromptRows, SampleRow, Sampler, SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rows(R: int, V: int, seed: int = 0) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, V, generator=gen) * 3
    temp = torch.tensor([0.0, 1.0, 0.7, 1.5, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 0.01])[:R]
    top_k = torch.tensor([0, 0, 5, 0, 1, 50, 0, 0, 20, 0, 3, 0], dtype=torch.int32)[:R]
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 0.5, 0.3, 1.0, 0.8, 1.0, 0.95, 1.0])[:R]
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.05, 0.0, 0.0, 0.0])[:R]
    seeds = torch.tensor([(i * 0x9E3779B97F4A7C15) % (1 << 63) - (i << 40) for i in range(R)], dtype=torch.int64)
    counters = torch.arange(R, dtype=torch.int64) * 7
    return logits, (temp, top_k, top_p, min_p, seeds, counters)


def test_kernel_equals_reference() -> None:
    logits, params = _rows(12, 1000)
    logits[9, 5] = float("nan")  # -> -1
    logits[11] = float("-inf")  # -> -1
    out = sample_tokens(logits.to(DEVICE), *(p.to(DEVICE) for p in params)).cpu()
    ref = sample_tokens_ref(logits, *params)
    assert out.tolist() == ref.tolist()
    assert out[9] == -1 and out[11] == -1
    assert out[0] == logits[0].argmax()  # temperature 0: greedy


def test_draws_follow_the_filtered_softmax() -> None:
    # 4000 draws of one row (different counters): frequencies match softmax(x / T) restricted to
    # the top-p set, within 5 standard errors.
    V, n = 8, 4000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0])
    p = torch.softmax(logits / 0.8, 0)
    keep = p.cumsum(0) - p < 0.9  # the smallest prefix reaching 0.9 (the logits are sorted)
    expected = torch.where(keep, p, 0.0) / p[keep].sum()
    ones = torch.ones(n)
    tokens = sample_tokens_ref(logits.expand(n, V).contiguous(), 0.8 * ones, torch.zeros(n, dtype=torch.int32),
                               0.9 * ones, 0 * ones, torch.full((n,), 5, dtype=torch.int64), torch.arange(n))
    freq = torch.bincount(tokens, minlength=V).float() / n
    stderr = (expected * (1 - expected) / n).sqrt()
    assert (freq - expected).abs().le(5 * stderr + 1e-9).all(), (freq, expected)
    assert freq[~keep].sum() == 0


def test_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])

    def draws(**kw: float) -> set[int]:
        t = torch.tensor
        out = set()
        for c in range(100):
            out.add(int(sample_tokens_ref(logits, t([kw.get("temperature", 1.0)]), t([int(kw.get("top_k", 0))],
                                          dtype=torch.int32), t([kw.get("top_p", 1.0)]), t([kw.get("min_p", 0.0)]),
                                          t([3]), t([c]))[0]))
        return out

    assert draws(top_k=1) == {1} and draws(top_p=0.01) == {1}  # only the arg-max is left
    assert draws(temperature=5.0, top_k=2) == {1, 2}  # exactly the two best
    assert draws(temperature=5.0, min_p=0.6) == {1, 2}  # p >= 0.6 of the best's (token 0 has 0.55)
    assert draws(temperature=1e-38) == {1}  # a tiny temperature is greedy, not an overflow
    assert draws(temperature=5.0) == {0, 1, 2, 3}


def test_seeded_row_is_independent_of_the_batch() -> None:
    # The same (seed, counter) row gives the same token alone and among other rows.
    logits, params = _rows(12, 1000, seed=1)
    batched = sample_tokens_ref(logits, *params)
    for r in range(12):
        alone = sample_tokens_ref(logits[r:r + 1], *(p[r:r + 1] for p in params))
        assert alone.item() == batched[r].item()
    temp, top_k, top_p, min_p, seeds, counters = params
    other = sample_tokens_ref(logits, temp, top_k, top_p, min_p, seeds + 1, counters)
    assert (other != batched).any()


def test_penalties_and_logprobs() -> None:
    V = 6
    sampler = Sampler(V, torch.device(DEVICE), use_kernel=DEVICE == "cuda")
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 0.0, 3.0]] * 3, device=DEVICE)
    greedy = SamplingParams(logprobs=2)
    rep = SamplingParams(repetition_penalty=4.0)  # token 5 (in the prompt): 3 / 4; token 2 (output): -1 * 4
    freq = SamplingParams(frequency_penalty=1.5, presence_penalty=0.1)  # token 5 twice in the output: 3 - 3.1
    rows = [SampleRow(greedy, 0, 0), SampleRow(rep, 0, 1, prompt_ids=[5], output_ids=[2]),
            SampleRow(freq, 0, 2, prompt_ids=[1], output_ids=[5, 5])]
    out = sampler.sample(logits, rows)
    assert out.token_ids == [5, 1, 1]
    lp = torch.log_softmax(logits[0].cpu(), 0)
    assert out.logprobs[1] is None and out.logprobs[2] is None
    first = out.logprobs[0]
    assert first is not None and first.token_id == 5 and math.isclose(first.logprob, lp[5].item(), rel_tol=1e-6)
    assert [t for t, _ in first.top] == [5, 1] and math.isclose(first.top[1][1], lp[1].item(), rel_tol=1e-6)
    # prompt logprobs: rows after the sampled ones, each scoring its target token
    out = sampler.sample(torch.cat([logits[:1], logits[:2]]), [rows[0]], PromptRows([3, 4], 1))
    assert [p.token_id for p in out.prompt_logprobs] == [3, 4]
    assert math.isclose(out.prompt_logprobs[0].logprob, lp[3].item(), rel_tol=1e-6)
    assert out.prompt_logprobs[1].top[0][0] == 5


@pytest.mark.parametrize("field, value, message", [
    ("temperature", float("nan"), "temperature = nan must be a finite number"),
    ("temperature", float("inf"), "temperature = inf must be a finite number"),
    ("top_p", float("nan"), "top_p = nan must be a finite number"),
    ("top_p", 0.0, "top_p = 0.0 must be in"),
    ("min_p", 1.5, "min_p = 1.5 must be in"),
    ("repetition_penalty", 0.0, "repetition_penalty = 0.0 must be > 0"),
    ("seed", 1 << 64, "seed = 18446744073709551616 must be an integer that fits 64 bits"),
    ("seed", -(1 << 63) - 1, "must be an integer that fits 64 bits"),
    ("logprobs", 21, "logprobs = 21 must be an integer in"),
    ("max_new_tokens", 0, "max_new_tokens = 0 must be >= 1"),
    ("top_k", -1, "top_k = -1 must be in \\[0, 2147483647\\]"),
    ("top_k", 1 << 31, "top_k = 2147483648 must be in"),
    ("temperature", 1e308, "temperature = 1e\\+308 is past float32's range"),
    ("presence_penalty", -1e39, "presence_penalty = -1e\\+39 is past float32's range"),
])
def test_bad_parameters_are_refused_naming_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SamplingParams(**{field: value})


def test_64_bit_seeds_are_accepted() -> None:
    for seed in (0, (1 << 64) - 1, -(1 << 63), 1 << 63):
        SamplingParams(temperature=1.0, seed=seed)


@pytest.mark.parametrize("chunk", [256, 768])
def test_chunked_kernel_ties_across_chunk_boundaries(chunk: int) -> None:
    # V = 1000 is not a multiple of the chunk; the best logit, the top-k threshold and the
    # top-p threshold are tied between tokens in different chunks (ties at a threshold are all
    # kept, greedy takes the first index). The rowwise kernel draws the same tokens.
    from kernels.sample_tokens_rowwise import sample_tokens_rowwise

    logits, params = _rows(12, 1000, seed=3)
    logits = logits.clamp(max=8.0)
    logits[:, [100, 255, 256, 767, 768, 999]] = 9.0  # the best, in five chunks
    logits[:, [200, 511, 512, 900]] = 8.5  # ranks 7-10: top-k 8 cuts inside this tie
    logits[3, :] = torch.round(logits[3, :])  # many ties everywhere
    temp, top_k, top_p, min_p, seeds, counters = params
    top_k = top_k.clone()
    top_k[2] = 8
    params = (temp, top_k, top_p, min_p, seeds, counters)
    dev = [p.to(DEVICE) for p in params]
    ref = sample_tokens_ref(logits, *params)
    out = sample_tokens(logits.to(DEVICE), *dev, chunk=chunk).cpu()
    assert out.tolist() == ref.tolist()
    assert out[0] == 100  # greedy: the first index of the max
    assert sample_tokens_rowwise(logits.to(DEVICE), *dev).cpu().tolist() == ref.tolist()
    # the hints only skip launches: all-greedy rows with any_hot False
    greedy = torch.zeros_like(temp)
    g = sample_tokens(logits.to(DEVICE), greedy.to(DEVICE), *dev[1:], any_hot=False, chunk=chunk).cpu()
    assert g.tolist() == sample_tokens_ref(logits, greedy, *params[1:]).tolist()


def test_chunked_kernel_one_row_many_chunks() -> None:
    # One row over 5 chunks (last one short) with every filter on: top-k 40 then top-p 0.6.
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 1100, generator=gen) * 2
    t = torch.tensor
    params = (t([1.0, 0.5, 1.0]), t([40, 0, 3], dtype=torch.int32), t([0.6, 0.9, 1.0]), t([0.0, 0.01, 0.2]),
              t([11, -5, 1 << 62]), t([3, 4, 5]))
    ref = sample_tokens_ref(logits, *params)
    for counter in range(3):
        ps = params[:5] + (params[5] + counter,)
        ref = sample_tokens_ref(logits, *ps)
        out = sample_tokens(logits.to(DEVICE), *(p.to(DEVICE) for p in ps), chunk=256).cpu()
        assert out.tolist() == ref.tolist()


def test_top_p_chain_and_its_fallback_draw_the_reference_tokens() -> None:
    # Top-p draws from the chain (draw over the kept set, check the winner against the top-p mass,
    # draw again below it) and leaves undecided rows to the threshold search. Flat logits and
    # small top_p keep many rows undecided after one round; 0 rounds is the search alone. Every
    # count of rounds gives the reference's tokens, with top-k and min-p before top-p.
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(8, 900, generator=gen) * torch.tensor([0.2, 0.2, 1.0, 3.0, 3.0, 8.0, 0.5, 2.0])[:, None]
    t = torch.tensor
    params = (t([1.0, 1.0, 0.7, 1.0, 1.3, 1.0, 1.0, 0.0]), t([0, 0, 0, 30, 0, 0, 0, 0], dtype=torch.int32),
              t([0.05, 0.5, 0.9, 0.6, 1.0, 0.3, 0.95, 0.5]), t([0.0, 0.0, 0.0, 0.0, 0.02, 0.0, 0.3, 0.0]),
              t([1, 2, 3, 4, 5, 6, 7, 8]) * 1000003, t([9, 8, 7, 6, 5, 4, 3, 2]))
    ref = sample_tokens_ref(logits, *params).tolist()
    dev = [p.to(DEVICE) for p in params]
    for rounds in (0, 1, 3):
        assert sample_tokens(logits.to(DEVICE), *dev, chunk=256, chain_rounds=rounds).cpu().tolist() == ref, rounds


@pytest.mark.gpu
def test_graph_replayed_draw_equals_direct_draw_and_reference() -> None:
    # Sampler on CUDA replays the draw from a CUDA graph per (bucket, vocab, hints); buckets 1, 2,
    # 4, 8, 16 here and 20 rows past the last bucket take the direct call. Row counts inside and
    # across buckets, each hint combination, several replays of one graph with new logits,
    # seeds and counters: the same tokens as the direct call and the torch reference.
    V = 3001
    dev = torch.device("cuda")
    graphed = Sampler(V, dev, use_kernel=True, graph_rows=16)
    direct = Sampler(V, dev, use_kernel=True, graph_rows=0)
    assert graphed.graphs is not None and direct.graphs is None
    modes = {"greedy": [SamplingParams()], "hot": [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7)],
             "top-k": [SamplingParams(temperature=1.0, top_k=20), SamplingParams()],
             "top-p": [SamplingParams(temperature=0.8, top_p=0.9, min_p=0.02)],
             "all": [SamplingParams(temperature=1.0, top_k=50, top_p=0.9), SamplingParams(),
                     SamplingParams(temperature=1.5, top_p=0.5), SamplingParams(temperature=1.0, top_k=1)]}
    gen = torch.Generator().manual_seed(5)
    for R in (1, 2, 3, 5, 8, 13, 16, 20):
        for mode, mix in modes.items():
            for rep in range(3):
                logits = torch.randn(R, V, generator=gen) * 3
                if R > 2 and rep == 1:
                    logits[1, 7] = float("nan")  # -> -1
                rows = [SampleRow(mix[i % len(mix)], seed=rep * 1000 + i * 77 - 50, counter=rep * 3 + i)
                        for i in range(R)]
                g = graphed.sample(logits.to(dev), rows).token_ids
                d = direct.sample(logits.to(dev), rows).token_ids
                temp, top_k, top_p, min_p = (torch.tensor([getattr(r.params, f) for r in rows], dtype=t)
                                             for f, t in (("temperature", torch.float32), ("top_k", torch.int32),
                                                          ("top_p", torch.float32), ("min_p", torch.float32)))
                ref = sample_tokens_ref(logits, temp, top_k, top_p, min_p, torch.tensor([r.seed for r in rows]),
                                        torch.tensor([r.counter for r in rows])).tolist()
                assert g == d == ref, (R, mode, rep)
    keys = set(graphed.graphs._graphs)
    assert {k[0] for k in keys} == {1, 2, 4, 8, 16} and len(keys) == 5 * 5  # 5 buckets x 5 hint sets
    # with logprobs: the sampled ids come from the replayed draw too
    rows = [SampleRow(SamplingParams(temperature=1.0, top_p=0.9, logprobs=2), seed=i, counter=1) for i in range(6)]
    logits = (torch.randn(6, V, generator=gen) * 3).to(dev)
    out, want = graphed.sample(logits, rows), direct.sample(logits, rows)
    assert out.token_ids == want.token_ids and [lp.token_id for lp in out.logprobs] == out.token_ids


def test_padded_parameter_buffer_draws_the_same_tokens() -> None:
    # What a graph bucket runs: R rows' parameters packed for n > R rows (the padding greedy, its
    # logits stale) and the draw over all n rows; the first R tokens are the reference's.
    from polar_dist.engine.sampling import _pack, _param_views

    logits, params = _rows(12, 700, seed=4)
    temp, top_k, top_p, min_p, seeds, counters = params
    rows = [SampleRow(SamplingParams(temperature=float(temp[i]), top_k=int(top_k[i]), top_p=float(top_p[i]),
                                     min_p=float(min_p[i])), seed=int(seeds[i]), counter=int(counters[i]))
            for i in range(5)]
    ps = [r.params for r in rows]
    ref = sample_tokens_ref(logits[:5], *(p[:5] for p in params)).tolist()
    for n in (5, 8):
        d = torch.from_numpy(_pack(rows, ps, ps, n)).to(DEVICE)
        padded = torch.cat([logits[:5], torch.randn(n - 5, 700)]).to(DEVICE)
        out = sample_tokens(padded, *_param_views(d, n)).cpu().tolist()
        assert out[:5] == ref
        assert out[5:] == padded[5:].argmax(dim=1).tolist()  # padding rows are greedy
