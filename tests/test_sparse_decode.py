"""Sparse decode end to end on tiny random models: density 1.0 is the dense path token for
token; the global routing scope gives the same tokens at tp = 1, 2 and 3 (real gloo processes);
the local scope follows its per-rank rule; the policy refuses what a model or layout cannot do;
the CUDA-graph buffers (padding rows, the row count) leave the sparse tokens unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support import tiny_models
from support.ranks import run_ranks
from polar_dist.config import config_from_dict
from polar_dist.engine.sampling import SamplingParams
from polar_dist.errors import UserError
from polar_dist.models.head_selection import RoutedGroups
from polar_dist.parallel.context import init_parallel
from polar_dist.runtime import Runtime, build_runtime, generate_ids
from polar_dist.sparsity.selection import density_to_k, head_table_local

PROMPTS = [[5, 6, 7], list(range(10, 40)), list(range(100, 117)), [9, 8]]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)
# MHA with 6 heads = 6 KV groups: tp 1, 2, 3 all hold >= 2 groups per rank (the local scope's need)
MHA6 = dict(model_type="llama", hidden_size=384, intermediate_size=512, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=6, head_dim=64, max_position_embeddings=256, tie_word_embeddings=False,
            vocab_size=tiny_models.VOCAB)


def _cfg(sparsity: dict, **model) -> dict:
    return {"model": {"init": "random", "seed": 3, "architecture": MHA6, "tokenizer": "bytes", "device": "cpu",
                      **model},
            "parallel": {"timeout_s": 120}, "sparsity": sparsity,
            "engine": {"max_seq_len": 128, "max_batch_size": 4}}


def _tokens(cfg: dict) -> list[list[int]] | None:
    c = config_from_dict(cfg)
    rt = build_runtime(c, init_parallel(c.parallel, c.model.device))
    seqs = generate_ids(rt, PROMPTS, PARAMS)
    rt.ctx.shutdown()
    return None if seqs is None else [s.output_ids for s in seqs]


def _rank_tokens(rank: int, world_size: int, cfg: dict, out: str) -> None:
    tokens = _tokens(cfg)
    if tokens is not None:
        Path(out).write_text(json.dumps(tokens))


def _tp_tokens(cfg: dict, tp: int, tmp_path: Path) -> list[list[int]]:
    if tp == 1:
        tokens = _tokens(cfg)
        assert tokens is not None
        return tokens
    out = tmp_path / f"tokens-tp{tp}.json"
    run_ranks(_rank_tokens, tp, cfg, str(out))
    return json.loads(out.read_text())


def test_density_one_is_the_dense_path() -> None:
    dense = _tokens(_cfg({}))
    assert _tokens(_cfg({"head_density": 1.0, "routers": "random"})) == dense
    # a density whose k is every group (0.95 * 6 rounds to 6) is dense too: no layer is routed
    assert _tokens(_cfg({"head_density": 0.95, "routers": "random"})) == dense
    assert _tokens(_cfg({"head_density": 0.5, "routers": "random"})) != dense


def test_head_min_batch_reads_every_head_below_it() -> None:
    dense = _tokens(_cfg({}))  # the 4 prompts decode together: steps of 4 rows
    assert _tokens(_cfg({"head_density": 0.5, "routers": "random", "head_min_batch": 5})) == dense
    assert _tokens(_cfg({"head_density": 0.5, "routers": "random", "head_min_batch": 4})) != dense
    with pytest.raises(UserError, match="head_min_batch = 0"):
        config_from_dict(_cfg({"head_min_batch": 0}))


@pytest.mark.slow
def test_global_scope_tokens_equal_across_tp(tmp_path: Path) -> None:
    cfg = _cfg({"head_density": 0.5, "routers": "random", "head_scope": "global"})
    single = _tp_tokens(cfg, 1, tmp_path)
    assert single != _tokens(_cfg({}))  # the routers do change the computation
    for tp in (2, 3):
        assert _tp_tokens(cfg, tp, tmp_path) == single, f"tp={tp}"


@pytest.mark.slow
def test_engine_counts_the_attention_it_reads() -> None:
    # 3 layers of 6 groups at density 0.5: layer 0 dense, layers 1-2 read 3 -> 12 of 18 group-layers
    # per decode row; steps of fewer rows than head_min_batch read all 18 (what /metrics reports).
    from polar_dist.engine.engine import Engine

    raw = _cfg({"head_density": 0.5, "routers": "random", "head_min_batch": 3})
    raw["engine"]["overlap_steps"] = False  # each step as scheduled after the previous one's tokens (mixed below)
    c = config_from_dict(raw)
    rt = build_runtime(c, init_parallel(c.parallel, c.model.device))
    assert rt.policy.groups_read(4, 6, 1) == 12 and rt.policy.groups_read(2, 6, 1) == 18
    engine = Engine(rt)

    def run(prompts: list[list[int]], n: int) -> None:
        for p in prompts:
            engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()

    run(PROMPTS, 6)  # one prefill step, then 5 decode steps of 4 rows
    assert (engine.decode_group_reads, engine.decode_group_reads_dense) == (4 * 5 * 12, 4 * 5 * 18)
    run(PROMPTS[:2], 4)  # 3 decode steps of 2 rows, below head_min_batch
    assert (engine.decode_group_reads, engine.decode_group_reads_dense) == (240 + 2 * 3 * 18, 360 + 2 * 3 * 18)
    reads, dense = engine.decode_group_reads, engine.decode_group_reads_dense
    for p in PROMPTS[:3]:  # 3 decoding rows, then a prompt arrives: a mixed step routes its 3 decode rows
        engine.add_request(p, SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()
    engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=1, ignore_eos=True))
    engine.step()  # mixed: 3 decode rows + 1 prefill
    assert (engine.decode_group_reads - reads, engine.decode_group_reads_dense - dense) == (2 * 3 * 12, 2 * 3 * 18)
    while engine.has_unfinished():
        engine.step()
    engine.shutdown()
    rt.ctx.shutdown()


@pytest.mark.slow
def test_decode_rows_of_mixed_steps_are_routed_like_decode_steps() -> None:
    # Prompts arriving while others decode make mixed (prefill + decode) steps; routed per row,
    # each sequence's tokens equal the same request alone (pure decode steps only).
    from polar_dist.engine.engine import Engine

    c = config_from_dict(_cfg({"head_density": 0.5, "routers": "random"}))
    rt = build_runtime(c, init_parallel(c.parallel, c.model.device))
    alone = [generate_ids(rt, [p], PARAMS)[0].output_ids for p in PROMPTS]  # type: ignore[index]
    dense = _tokens(_cfg({"head_density": 1.0, "routers": "random"}))
    assert dense is not None and all(a != d for a, d in zip(alone, dense))  # routing changed every sequence
    engine = Engine(rt)
    tokens: dict[int, list[int]] = {}
    mixed = 0
    for step in range(40):
        arrives = step < len(PROMPTS) * 2 and step % 2 == 0
        if arrives:
            tokens[engine.add_request(PROMPTS[step // 2], PARAMS)] = []
        reads = engine.decode_group_reads
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        mixed += arrives and engine.decode_group_reads > reads  # a prefill beside decoding rows
        if not engine.has_unfinished() and step >= len(PROMPTS) * 2:
            break
    assert mixed >= 3  # arrivals met decoding rows
    assert list(tokens.values()) == alone
    engine.shutdown()
    rt.ctx.shutdown()


def test_groups_read_follows_the_scope_and_the_routing() -> None:
    from polar_dist.sparsity.policy import HeadRouting, RoutingScope, SparsityPolicy

    base = dict(head_k=(8, 4, 2), num_groups=8, neuron_k=None, mlp_dense_above=0.8, head_min_batch=4)
    glob = SparsityPolicy(routing=HeadRouting.ROUTER, scope=RoutingScope.GLOBAL, **base)
    assert glob.groups_read(8, 8, 1) == 14 and glob.groups_read(3, 8, 1) == 24
    local = SparsityPolicy(routing=HeadRouting.ROUTER, scope=RoutingScope.LOCAL, **base)
    assert local.groups_read(8, 2, 4) == 8 + 4 * 1 + 4 * 1  # 4 ranks of 2 groups: 0.5 -> 1, 0.25 -> 0.5 -> 1
    oracle = SparsityPolicy(routing=HeadRouting.ORACLE, scope=RoutingScope.GLOBAL, **base)
    assert oracle.groups_read(8, 8, 1) == 24  # the oracle reads every group, then masks


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_router_scores_are_columns_of_the_qkv_gemm(arch: str) -> None:
    """A routed layer's QKV weight and router weight are views of one joint weight (filled by the
    loader through either), and its one GEMM gives what the two separate ones give."""
    cfg = _cfg({"head_density": 0.5, "routers": "random"}, **(
        {"architecture": dict(tiny_models.ARCHS["opt"], vocab_size=tiny_models.VOCAB)} if arch == "opt" else {}))
    c = config_from_dict(cfg)
    rt = build_runtime(c, init_parallel(c.parallel, c.model.device))
    attn = rt.runner.model.layers[1].attn
    router, project = attn.heads.router, attn.project
    assert project.weight is not None
    assert attn.qkv.weight.data_ptr() == project.weight.data_ptr()
    assert router.weight.data_ptr() == project.weight[project.n].data_ptr()
    assert float(router.weight.abs().sum()) > 0 and float(attn.qkv.weight.abs().sum()) > 0  # both loaded
    x = torch.randn(5, router.hidden_size, generator=torch.Generator().manual_seed(0))
    qkv, scores = project(x)
    torch.testing.assert_close(qkv, attn.qkv(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores + router.bias, router(x), rtol=1e-5, atol=1e-5)
    rt.ctx.shutdown()


@pytest.mark.parametrize("tp", [2, 3])
def test_local_scope_follows_its_per_rank_rule(tp: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At tp = N the local scope takes top-k_local of each rank's block of groups. Reference: one
    process whose routed layers apply exactly that rule over the N blocks."""
    cfg = _cfg({"head_density": 0.5, "routers": "random", "head_scope": "local"})
    sharded = _tp_tokens(cfg, tp, tmp_path)
    groups = MHA6["num_key_value_heads"]
    per = groups // tp
    k_local = density_to_k(density_to_k(0.5, groups) / groups, per)  # the policy's rule for the local scope

    def table(self: RoutedGroups, x: torch.Tensor, dense_table: torch.Tensor,
              scores: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.router(x)  # (B, G)
        parts = [head_table_local(scores[:, b * per:(b + 1) * per], k_local) + b * per for b in range(tp)]
        return torch.cat(parts, dim=1)  # (B, tp * k_local) global ids, every group local at tp = 1

    monkeypatch.setattr(RoutedGroups, "table", table)
    reference = _tokens(_cfg({"head_density": 0.5, "routers": "random", "head_scope": "global"}))
    assert sharded == reference


@pytest.mark.parametrize("sparsity, model, match", [
    ({"head_density": 0.5}, {}, "needs head routers"),
    ({"head_density": 0.5, "routers": "random", "head_allocation": "per_layer"}, {}, "recall curves"),
    ({"mlp": True, "routers": "random"}, {}, "needs a ReLU MLP"),
])
def test_policy_refuses_what_cannot_run(sparsity: dict, model: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        _tokens(_cfg(sparsity, **model))


def test_local_scope_needs_two_groups_per_rank() -> None:
    from polar_dist.config import SparsityConfig
    from polar_dist.model_spec import spec_from_hf_config
    from polar_dist.sparsity.policy import make_policy

    spec = spec_from_hf_config({**MHA6, "num_key_value_heads": 3, "num_attention_heads": 6})
    cfg = SparsityConfig(head_density=0.5, routers="random", head_scope="local")
    assert make_policy(cfg, spec, None, 1, 4).head_k[1] == 2
    with pytest.raises(UserError, match="local needs >= 2 KV groups per rank.*use sparsity.head_scope = global"):
        make_policy(cfg, spec, None, 3, 4)


def test_graph_buffers_keep_sparse_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """OPT with routed heads and batch-union neurons through the CUDA-graph buffers (replayed
    eagerly on CPU): padding rows must not enter the neuron union, so the tokens stay the eager ones."""
    from polar_dist.engine import cuda_graphs
    from polar_dist.engine.cuda_graphs import DecodeGraphs

    opt = dict(model_type="opt", hidden_size=256, ffn_dim=701, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, do_layer_norm_before=True, word_embed_proj_dim=256,
               vocab_size=tiny_models.VOCAB)
    raw = _cfg({"head_density": 0.5, "routers": "random", "mlp": True, "mlp_density": 0.2}, architecture=opt)
    raw["engine"]["max_batch_size"] = 8
    c = config_from_dict(raw)
    rt: Runtime = build_runtime(c, init_parallel(c.parallel, c.model.device))
    eager = [s.output_ids for s in generate_ids(rt, PROMPTS[:3], PARAMS)]

    class EagerReplay:
        def __init__(self, graphs: DecodeGraphs, n: int) -> None:
            self.graphs, self.n = graphs, n
            self.logits = graphs._forward(n)

        def replay(self) -> None:
            self.logits.copy_(self.graphs._forward(self.n))

    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(DecodeGraphs, "_capture", lambda self, n: ((r := EagerReplay(self, n)), r.logits))
    runner = rt.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.head_table, runner.planner,
                                 max_blocks=128 // 16, block_size=16, scratch_block=runner.num_blocks, device=runner.device)
    graphed = [s.output_ids for s in generate_ids(rt, PROMPTS[:3], PARAMS)]  # 3 rows in the bucket of 4
    assert graphed == eager
    assert sorted(runner.graphs._graphs) == [4]


def _gpu_runtime(raw: dict, cuda_graphs: bool) -> Runtime:
    """The run config `raw` built with or without decode graphs, its K/V cache filled from seed 0
    (the same cache size gives both builds the same K/V)."""
    raw["engine"]["cuda_graphs"] = cuda_graphs
    c = config_from_dict(raw)
    rt = build_runtime(c, init_parallel(c.parallel, c.model.device))
    torch.manual_seed(0)
    for k, v in rt.runner.kv_caches:
        k.normal_()
        v.normal_()
    return rt


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["configs/llama-2-7b.yaml", "configs/llama-3.1-8b.yaml"])
def test_sparse_graph_decode_equals_eager_on_gpu(config: str) -> None:
    """Routers inside the captured decode graph: replaying it gives the eager sparse logits
    (real layer shapes, 4 layers, bf16, random routers at density 0.5)."""
    import yaml

    from polar_dist.engine.kv_cache import BlockAllocator, blocks_needed
    from polar_dist.engine.step import Step

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / config).read_text())
    raw["model"]["architecture"]["num_hidden_layers"] = 4
    raw["model"].update(dtype="bfloat16", device="cuda")
    raw["sparsity"] = {"head_density": 0.5, "routers": "random"}
    # The same cache size for both runtimes, so the same seed fills it with the same K/V.
    raw["engine"] = {"max_batch_size": 8, "max_seq_len": 1024, "block_size": 16, "kv_cache_blocks": 8 * 64}
    results = {}
    for graphs in (False, True):
        rt = _gpu_runtime(raw, graphs)
        alloc = BlockAllocator(rt.runner.num_blocks)
        lens = [100, 300, 517, 900, 64, 1000, 250, 777]  # 8 rows: the bucket's own size, no padding rows
        tables = [alloc.allocate(blocks_needed(n, 16)) for n in lens]
        step = Step.decode([(13 * i) % 1000 for i in range(8)], lens, tables, 16)
        results[graphs] = torch.stack([rt.runner.logits(step) for _ in range(2)])
        del rt
        torch.cuda.empty_cache()
    eager, graphed = results[False], results[True]
    scale = eager.abs().max().item()
    assert (graphed - eager).abs().max().item() <= 1e-2 * scale
    assert (graphed.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.9


@pytest.mark.gpu
def test_pdl_changes_no_logit_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Programmatic dependent launch (kernels/pdl.py) moves only the gaps between kernels: the
    captured sparse decode step gives bit-identical logits with it on and off (2 layers of the
    Llama-3.1-8B shape, bf16, random routers at density 0.5, replayed twice)."""
    import yaml

    from polar_dist.engine.kv_cache import BlockAllocator, blocks_needed
    from polar_dist.engine.step import Step

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/llama-3.1-8b.yaml").read_text())
    raw["model"]["architecture"]["num_hidden_layers"] = 2
    raw["model"].update(dtype="bfloat16", device="cuda")
    raw["sparsity"] = {"head_density": 0.5, "routers": "random"}
    raw["engine"] = {"max_batch_size": 8, "max_seq_len": 1024, "block_size": 16, "kv_cache_blocks": 8 * 64}
    results = {}
    for pdl in ("1", "0"):
        monkeypatch.setenv("POLAR_PDL", pdl)
        rt = _gpu_runtime(raw, cuda_graphs=True)
        ops = next(m.ops for m in rt.runner.model.modules() if hasattr(m, "ops"))
        assert ops.pdl == (pdl == "1" and torch.cuda.get_device_capability()[0] >= 9)
        alloc = BlockAllocator(rt.runner.num_blocks)
        lens = [100, 300, 517, 900, 64, 1000, 250]  # 7 rows in the bucket of 8: a padding row too
        tables = [alloc.allocate(blocks_needed(n, 16)) for n in lens]
        step = Step.decode([(13 * i) % 1000 for i in range(7)], lens, tables, 16)
        results[pdl] = torch.stack([rt.runner.logits(step) for _ in range(2)])
        del rt
        torch.cuda.empty_cache()
    assert torch.equal(results["1"], results["0"])


@pytest.mark.gpu
def test_neuron_sparsity_choice_is_measured_before_capture_on_gpu() -> None:
    """OPT-6.7B layer shapes (2 layers, fp16, random routers): a bucket's sparse-or-dense MLP
    choice is timed once per layer and row count, in the eager warm-up before the bucket's graph
    is captured (a capture cannot time; it would assume sparse and cache nothing); with the
    choices fixed, graph replays give the eager logits."""
    import yaml

    from polar_dist.engine.kv_cache import BlockAllocator, blocks_needed
    from polar_dist.engine.step import Step
    from polar_dist.models.relu_mlp import NeuronSparseMLP

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/opt-6.7b.yaml").read_text())
    raw["model"]["architecture"]["num_hidden_layers"] = 2
    raw["model"]["device"] = "cuda"
    raw["sparsity"] = {"head_density": 1.0, "routers": "random", "mlp": True, "mlp_density": 0.3}
    raw["engine"] = {"max_batch_size": 16, "max_seq_len": 512, "block_size": 16, "kv_cache_blocks": 16 * 32}
    steps: dict[int, Step] = {}
    logits, choices = {}, []
    for graphs in (False, True):
        rt = _gpu_runtime(raw, graphs)
        mlps = [layer.mlp for layer in rt.runner.model.layers]
        assert all(isinstance(m, NeuronSparseMLP) and not m.sparse_pays for m in mlps)
        if graphs:  # bucket 1 runs the eager run's choices; bucket 16 measures its own
            for m, chosen in zip(mlps, choices):
                m.sparse_pays[1] = chosen[1]
        alloc = BlockAllocator(rt.runner.num_blocks)
        for batch in (1, 16):  # buckets of their own size: no padding rows
            lens = [50 + 29 * i for i in range(batch)]
            tables = [alloc.allocate(blocks_needed(n, 16)) for n in lens]
            steps[batch] = Step.decode([(13 * i) % 1000 for i in range(batch)], lens, tables, 16)
            logits[graphs, batch] = torch.stack([rt.runner.logits(steps[batch]) for _ in range(2)])
            assert all(isinstance(m.sparse_pays.get(batch), bool) for m in mlps)
        if not graphs:
            choices = [dict(m.sparse_pays) for m in mlps]
        del rt
        torch.cuda.empty_cache()
    eager, graphed = logits[False, 1], logits[True, 1]
    assert (graphed - eager).abs().max().item() <= 1e-2 * eager.abs().max().item()
