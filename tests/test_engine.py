"""The engine on a tiny random Llama at tp=1: batching, chunking, arrival order and preemption
change no token; seeded sampling is the same alone and in a busy batch; abort frees blocks;
logprobs are the model's; the CUDA-graph buffers give the eager tokens; and `kernels` does not
pass for the HF `kernels` distribution."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from polar_dist.config import config_from_dict
from polar_dist.engine.engine import Engine, RequestOutput
from polar_dist.engine.sampling import SamplingParams
from polar_dist.parallel.context import init_parallel
from polar_dist.runtime import Runtime, build_runtime, generate_ids
from support.tiny_models import VOCAB

PROMPTS = [[5, 6, 7], list(range(10, 40)), list(range(100, 117)), [9]]
GREEDY = SamplingParams(max_new_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama-gqa")


def runtime(model_dir: Path, **engine: int) -> Runtime:
    cfg = config_from_dict({"model": {"path": str(model_dir), "tokenizer": "bytes", "device": "cpu"},
                            "engine": {"max_seq_len": 128, **engine}})
    return build_runtime(cfg, init_parallel(cfg.parallel, cfg.model.device))


def outputs(rt: Runtime, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    done = generate_ids(rt, prompts, params)
    assert done is not None
    return [c.output_ids for c in done]


def drive(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]],
          on_step: Callable[[list[RequestOutput]], None] | None = None) -> dict[int, list[int]]:
    """Step the engine, adding arrivals[i] before step i; returns {request id: tokens}, ids in arrival order."""
    tokens: dict[int, list[int]] = {}
    i = 0
    while engine.has_unfinished() or i <= max(arrivals):
        for prompt, params in arrivals.get(i, []):
            tokens[engine.add_request(prompt, params)] = []
        outs = engine.step()
        for out in outs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if on_step:
            on_step(outs)
        i += 1
    return tokens


def test_batched_chunked_and_late_arrivals_equal_one_at_a_time(model_dir: Path) -> None:
    rt = runtime(model_dir, max_batch_size=4, max_num_batched_tokens=8)  # 30-token prompt: 4+ chunks
    alone = [outputs(rt, [p], GREEDY)[0] for p in PROMPTS]
    assert all(len(o) == 20 for o in alone)
    assert outputs(rt, PROMPTS, GREEDY) == alone
    engine = Engine(rt)
    got = drive(engine, {0: [(PROMPTS[0], GREEDY)], 3: [(PROMPTS[1], GREEDY), (PROMPTS[2], GREEDY)],
                         9: [(PROMPTS[3], GREEDY)]})
    assert list(got.values()) == alone
    assert engine.num_free_blocks == rt.runner.num_blocks
    engine.shutdown()


def test_a_long_prompt_is_chunked_while_others_keep_decoding(model_dir: Path) -> None:
    rt = runtime(model_dir, max_batch_size=4, max_num_batched_tokens=8)
    engine = Engine(rt)
    short = engine.add_request(PROMPTS[0], GREEDY)
    engine.step()
    long = engine.add_request(list(range(3, 60)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    steps = 0
    while True:
        outs = {o.request_id: o for o in engine.step()}
        steps += 1
        assert len(outs[short].new_token_ids) == 1, "the running stream gets a token every step"
        if long in outs:
            break
    assert steps == 9  # 57 prompt tokens in chunks of 8 - 1 (the decode row's token)
    drive(engine, {0: []})
    engine.shutdown()


def test_preemption_under_a_small_cache_loses_nothing(model_dir: Path) -> None:
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    roomy = outputs(runtime(model_dir, max_batch_size=4), PROMPTS, params)
    # 8 blocks of 16 tokens cannot hold the four sequences at once (they end needing 3+5+4+3 = 15)
    tight_rt = runtime(model_dir, max_batch_size=4, kv_cache_blocks=8, max_num_batched_tokens=16)
    assert outputs(tight_rt, PROMPTS, params) == roomy


def test_prompt_that_cannot_fit_the_cache_is_rejected(model_dir: Path) -> None:
    rt = runtime(model_dir, kv_cache_blocks=1)
    with pytest.raises(ValueError, match="raise engine.kv_cache_blocks"):
        generate_ids(rt, [list(range(3, 40))], SamplingParams(max_new_tokens=2))


def test_sequences_longer_than_the_cache_stop_at_its_capacity(model_dir: Path) -> None:
    # 3 blocks of 16 tokens: each sequence alone may grow to 48 tokens, then stops with "length";
    # together they preempt each other and still all finish.
    rt = runtime(model_dir, max_batch_size=4, kv_cache_blocks=3)
    done = generate_ids(rt, [[5, 6, 7], list(range(10, 30))], SamplingParams(max_new_tokens=100, ignore_eos=True))
    assert done is not None
    assert [len(c.all_ids) for c in done] == [48, 48]
    assert [c.finish_reason for c in done] == ["length", "length"]


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(model_dir: Path) -> None:
    rt = runtime(model_dir, max_batch_size=4, max_num_batched_tokens=8)
    hot = SamplingParams(max_new_tokens=24, temperature=1.5, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    alone = outputs(rt, [PROMPTS[1]], hot)[0]
    busy = [(p, SamplingParams(max_new_tokens=30, temperature=1.0, seed=i, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    engine = Engine(rt)
    got = drive(engine, {0: busy[:2], 2: [(PROMPTS[1], hot)], 4: busy[2:]})
    engine.shutdown()
    assert got[2] == alone
    assert alone != outputs(rt, [PROMPTS[1]], GREEDY)[0][:24]
    assert alone != outputs(rt, [PROMPTS[1]], SamplingParams(**{**hot.__dict__, "seed": 8}))[0]


def test_overlapped_steps_give_the_tokens_of_steps_that_wait(model_dir: Path) -> None:
    """With engine.overlap_steps the next decode step is launched before this one's tokens are
    on the host: the tokens must be those of the engine that waits, through finishes at
    different steps (a stop token, max_new_tokens), seeded sampling, an abort, penalties (which
    do not chain) and arrivals, and every block must come back."""
    wait_rt = runtime(model_dir, max_batch_size=4, max_num_batched_tokens=16, overlap_steps=False)
    free = outputs(wait_rt, [PROMPTS[0]], GREEDY)[0]
    stop = SamplingParams(max_new_tokens=20, stop_token_ids=(free[6],))  # ends at its 7th token (or before)
    hot = SamplingParams(max_new_tokens=15, temperature=1.0, seed=5, ignore_eos=True)
    short = SamplingParams(max_new_tokens=4, ignore_eos=True)
    penalized = SamplingParams(max_new_tokens=6, repetition_penalty=1.3, seed=1, temperature=0.7, ignore_eos=True)
    arrivals = {0: [(PROMPTS[0], stop), (PROMPTS[1], hot), (PROMPTS[2], short), (PROMPTS[3], GREEDY)],
                14: [(PROMPTS[2], penalized)], 16: [(PROMPTS[1], GREEDY)]}

    def run(rt: Runtime) -> tuple[dict[int, list[int]], Engine]:
        engine = Engine(rt)
        steps = 0

        def abort_late(outs: list[RequestOutput]) -> None:
            nonlocal steps
            steps += 1
            if steps == 10:
                assert engine.abort(3)  # the greedy one, mid-decode
        got = drive(engine, arrivals, abort_late)
        assert engine.num_free_blocks == rt.runner.num_blocks
        engine.shutdown()
        return got, engine

    expected, waited = run(wait_rt)
    assert waited.chained_steps == 0
    assert len(expected[0]) <= 7 and expected[0][-1] == free[6] and len(expected[2]) == 4
    got, overlapped = run(runtime(model_dir, max_batch_size=4, max_num_batched_tokens=16))
    assert got == expected
    assert overlapped.chained_steps > 5


def test_abort_frees_blocks_and_reports(model_dir: Path) -> None:
    rt = runtime(model_dir, max_batch_size=2, max_num_batched_tokens=8)
    engine = Engine(rt)
    a = engine.add_request(PROMPTS[1], GREEDY)  # chunked: aborted part-way through its prefill
    b = engine.add_request(PROMPTS[0], GREEDY)
    c = engine.add_request(PROMPTS[2], GREEDY)  # still waiting (batch of 2)
    engine.step()
    assert engine.num_free_blocks < rt.runner.num_blocks
    assert engine.abort(a) and engine.abort(c) and not engine.abort(c)
    outs = engine.step()
    assert {(o.request_id, o.finish_reason) for o in outs if o.finished} == {(a, "abort"), (c, "abort")}
    for _ in range(3):
        engine.step()
    assert engine.abort(b)
    engine.step()
    assert not engine.has_unfinished()
    assert engine.num_free_blocks == rt.runner.num_blocks  # no block leaked
    engine.shutdown()


def test_logprobs_are_the_models(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    rt = runtime(model_dir, max_num_batched_tokens=16)  # the prompt's logprobs come from two chunks
    prompt = PROMPTS[1]
    done = generate_ids(rt, [prompt], SamplingParams(max_new_tokens=3, logprobs=3, prompt_logprobs=2))
    assert done is not None
    c = done[0]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([c.all_ids])).logits[0].double(), -1)  # (L, V)
    assert c.prompt_logprobs is not None and len(c.prompt_logprobs) == len(prompt) - 1
    for p, lp in enumerate(c.prompt_logprobs):
        assert lp.token_id == prompt[p + 1] and math.isclose(lp.logprob, ref[p, prompt[p + 1]].item(), abs_tol=1e-4)
        assert [t for t, _ in lp.top] == ref[p].topk(2).indices.tolist()
    assert c.logprobs is not None and len(c.logprobs) == 3
    for i, lp in enumerate(c.logprobs):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == c.output_ids[i] == row.argmax().item()  # greedy
        assert math.isclose(lp.logprob, row.max().item(), abs_tol=1e-4) and len(lp.top) == 3


def test_prompt_ids_outside_the_vocabulary_are_rejected(model_dir: Path) -> None:
    rt = runtime(model_dir)
    for bad in (VOCAB, -1):
        with pytest.raises(ValueError, match=f"prompt token id {bad} is outside the vocabulary"):
            generate_ids(rt, [[5, bad, 6]], SamplingParams(max_new_tokens=2))


def test_kernels_package_is_not_the_hf_kernels_distribution() -> None:
    # transformers looks for the HF `kernels` distribution; our top-level `kernels` package is
    # published by polar-dist, whose version is far below the range transformers accepts.
    code = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


class _EagerReplay:
    """Stands in for a captured CUDA graph on CPU: replay() runs the same forward over the same buffers."""

    def __init__(self, graphs: "DecodeGraphs", n: int) -> None:
        self.graphs, self.n = graphs, n
        self.logits = graphs._forward(n)

    def replay(self) -> None:
        self.logits.copy_(self.graphs._forward(self.n))


def test_graph_buffers_and_padding_rows_give_eager_results(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph decode path (step copied into static buffers, batch padded to a bucket with
    rows on the scratch block, block tables padded to max_seq_len) gives the eager path's tokens."""
    from polar_dist.engine import cuda_graphs
    from polar_dist.engine.cuda_graphs import DecodeGraphs

    rt = runtime(model_dir, max_batch_size=8)
    eager = outputs(rt, PROMPTS[:3], GREEDY)  # 3 sequences: the bucket of 4 has a padding row
    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(DecodeGraphs, "_capture", lambda self, n: ((r := _EagerReplay(self, n)), r.logits))
    runner = rt.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.head_table, runner.planner,
                                 max_blocks=128 // 16, block_size=16, scratch_block=runner.num_blocks, device=runner.device)
    assert outputs(rt, PROMPTS[:3], GREEDY) == eager
    assert sorted(runner.graphs._graphs) == [4]


MARKER = [70, 65, 73, 76]  # the token-id run that POLAR_INJECT_FAULT chooses requests by


@pytest.mark.parametrize("kind", ["raise", "nan"])
def test_a_request_whose_sampling_fails_fails_alone(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                    kind: str) -> None:
    rt = runtime(model_dir, max_batch_size=4, max_num_batched_tokens=16)
    sampled = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.8, top_p=0.9, seed=7, logprobs=2)
    alone = [outputs(rt, [p], GREEDY)[0] for p in PROMPTS[:3]] + [outputs(rt, [PROMPTS[3]], sampled)[0]]
    monkeypatch.setenv("POLAR_INJECT_FAULT", f"{kind}:{','.join(map(str, MARKER))}")
    engine = Engine(rt)
    doomed = [1, 2] + MARKER + [3]
    reasons: dict[int, tuple[str | None, str | None]] = {}

    def note(outs: list[RequestOutput]) -> None:
        reasons.update({o.request_id: (o.finish_reason, o.error) for o in outs if o.finished})

    got = drive(engine, {0: [(PROMPTS[0], GREEDY), (doomed, GREEDY), (PROMPTS[1], GREEDY)],
                         2: [(PROMPTS[2], GREEDY), (PROMPTS[3], sampled)]}, note)
    ids = list(got)
    assert [got[i] for i in ids if i != ids[1]] == alone
    reason, why = reasons[ids[1]]
    assert reason == "error" and got[ids[1]] == []
    assert ("injected by POLAR_INJECT_FAULT" if kind == "raise" else "NaN") in (why or ""), why
    assert all(reasons[i] == ("length", None) for i in ids if i != ids[1])
    assert engine.num_free_blocks == rt.runner.num_blocks
    assert engine.failure is None
    assert list(drive(engine, {0: [(PROMPTS[0], GREEDY)]}).values()) == [alone[0]]  # and it keeps serving
    engine.shutdown()
