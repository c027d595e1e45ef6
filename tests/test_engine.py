"""Engine behaviour on a tiny random Llama at tp=1: batching and preemption change nothing,
sampling is seeded, and `kernels` does not pass for the HF `kernels` distribution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from polar_dist.config import config_from_dict
from polar_dist.engine.sampler import SamplingParams, sample
from polar_dist.parallel.context import init_parallel
from polar_dist.runtime import Runtime, build_runtime, generate_ids
from support.tiny_models import VOCAB

PROMPTS = [[5, 6, 7], list(range(10, 40)), list(range(100, 117)), [9]]


@pytest.fixture(scope="module")
def model_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama-gqa")


def runtime(model_dir: Path, **engine: int) -> Runtime:
    cfg = config_from_dict({"model": {"path": str(model_dir), "tokenizer": "bytes", "device": "cpu"},
                            "engine": {"max_seq_len": 128, **engine}})
    return build_runtime(cfg, init_parallel(cfg.parallel, cfg.model.device))


def outputs(rt: Runtime, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    seqs = generate_ids(rt, prompts, params)
    assert seqs is not None
    return [s.output_ids for s in seqs]


def test_batched_equals_one_at_a_time(model_dir: Path) -> None:
    rt = runtime(model_dir, max_batch_size=4)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    batched = outputs(rt, PROMPTS, params)
    alone = [outputs(rt, [p], params)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(o) == 20 for o in batched)


def test_preemption_under_a_small_cache_loses_nothing(model_dir: Path) -> None:
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    roomy = outputs(runtime(model_dir, max_batch_size=4), PROMPTS, params)
    # 8 blocks of 16 tokens cannot hold the four sequences at once (they end needing 3+5+4+3 = 15)
    tight_rt = runtime(model_dir, max_batch_size=4, kv_cache_blocks=8)
    assert outputs(tight_rt, PROMPTS, params) == roomy


def test_prompt_that_cannot_fit_the_cache_is_rejected(model_dir: Path) -> None:
    rt = runtime(model_dir, kv_cache_blocks=1)
    with pytest.raises(ValueError, match="raise engine.kv_cache_blocks"):
        generate_ids(rt, [list(range(3, 40))], SamplingParams(max_new_tokens=2))


def test_sequences_longer_than_the_cache_stop_at_its_capacity(model_dir: Path) -> None:
    # 3 blocks of 16 tokens: each sequence alone may grow to 48 tokens, then stops with "length";
    # together they preempt each other and still all finish.
    rt = runtime(model_dir, max_batch_size=4, kv_cache_blocks=3)
    seqs = generate_ids(rt, [[5, 6, 7], list(range(10, 30))], SamplingParams(max_new_tokens=100, ignore_eos=True))
    assert seqs is not None
    assert [len(s.all_ids) for s in seqs] == [48, 48]
    assert [s.finish_reason for s in seqs] == ["length", "length"]


def test_sampling_is_seeded_and_differs_from_greedy(model_dir: Path) -> None:
    rt = runtime(model_dir, max_batch_size=4)
    hot = SamplingParams(max_new_tokens=24, temperature=1.5, top_p=0.95, seed=7, ignore_eos=True)
    first, again = outputs(rt, PROMPTS[:2], hot), outputs(rt, PROMPTS[:2], hot)
    assert first == again
    greedy = outputs(rt, PROMPTS[:2], SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert first != greedy
    other_seed = outputs(rt, PROMPTS[:2], SamplingParams(**{**hot.__dict__, "seed": 8}))
    assert other_seed != first


def test_prompt_ids_outside_the_vocabulary_are_rejected(model_dir: Path) -> None:
    rt = runtime(model_dir)
    for bad in (VOCAB, -1):
        with pytest.raises(ValueError, match=f"prompt token id {bad} is outside the vocabulary"):
            generate_ids(rt, [[5, bad, 6]], SamplingParams(max_new_tokens=2))


def test_sampler_filters() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    # top_k = 1 and a tiny top_p both leave only the arg-max
    assert {sample(logits, SamplingParams(temperature=1.0, top_k=1), gen) for _ in range(50)} == {1}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.01), gen) for _ in range(50)} == {1}
    # top_k = 2 keeps exactly the two best
    assert {sample(logits, SamplingParams(temperature=5.0, top_k=2), gen) for _ in range(200)} == {1, 2}
    # top_k = 1 keeps exactly one token even when several share the best logit
    tied = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert len({sample(tied, SamplingParams(temperature=1.0, top_k=1), gen) for _ in range(50)}) == 1
    # a tiny temperature is greedy, not an overflow
    assert sample(logits, SamplingParams(temperature=1e-38), gen) == 1
    with pytest.raises(ValueError, match="top_p = 0"):
        SamplingParams(top_p=0)


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
    """The CUDA-graph decode path (plan copied into static buffers, batch padded to a bucket with
    rows on the scratch block, block tables padded to max_seq_len) gives the eager path's tokens."""
    from polar_dist.engine import cuda_graphs
    from polar_dist.engine.cuda_graphs import DecodeGraphs

    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    rt = runtime(model_dir, max_batch_size=8)
    eager = outputs(rt, PROMPTS[:3], params)  # 3 sequences: the bucket of 4 has a padding row
    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(DecodeGraphs, "_capture", lambda self, n: ((r := _EagerReplay(self, n)), r.logits))
    runner = rt.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.head_table, max_blocks=128 // 16,
                                 block_size=16, scratch_block=runner.num_blocks, device=runner.device)
    assert outputs(rt, PROMPTS[:3], params) == eager
    assert sorted(runner.graphs._graphs) == [4]
