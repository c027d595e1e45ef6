"""The kernel backend is chosen once per model and bound into KernelOps: each op then calls
its Triton kernel or its torch reference, and nothing else decides per call."""

from __future__ import annotations

import pytest
import torch

import kernels.gather_gemm as gather_gemm
import kernels.norms as norms
import kernels.select_attention as select_attention
from kernels.dispatch import Backend, KernelOps, choose_backend, choose_pdl

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_picks_triton_only_for_16_bit_cuda() -> None:
    assert choose_backend("auto", CUDA, torch.bfloat16) is Backend.TRITON
    assert choose_backend("auto", CUDA, torch.float16) is Backend.TRITON
    assert choose_backend("auto", CUDA, torch.float32) is Backend.TORCH
    assert choose_backend("auto", CPU, torch.bfloat16) is Backend.TORCH
    assert choose_backend("torch", CUDA, torch.bfloat16) is Backend.TORCH


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("triton", CPU, torch.float32) is Backend.TRITON
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        choose_backend("triton", CPU, torch.float32)


@pytest.mark.parametrize("backend", list(Backend))
def test_ops_call_the_bound_backend(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for mod, op in ((select_attention, "select_attention"), (gather_gemm, "gather_fc1"), (gather_gemm, "gather_fc2"),
                    (norms, "rms_norm"), (norms, "add_rms_norm"), (norms, "layer_norm"), (norms, "add_layer_norm")):
        for name in (op, f"{op}_ref"):
            monkeypatch.setattr(mod, name, lambda *a, _n=name: calls.append(_n))
    ops = KernelOps(backend)
    ops.select_attention(*([None] * 7))
    ops.gather_fc1(None, None, None, None)
    ops.gather_fc2(None, None, None, None)
    ops.rms_norm(None, None, 1e-6)
    ops.add_rms_norm(None, None, None, 1e-6)
    ops.layer_norm(None, None, None, 1e-5)
    ops.add_layer_norm(None, None, None, None, 1e-5)
    suffix = "" if backend is Backend.TRITON else "_ref"
    assert calls == [f"{op}{suffix}" for op in ("select_attention", "gather_fc1", "gather_fc2", "rms_norm",
                                                  "add_rms_norm", "layer_norm", "add_layer_norm")]


@pytest.mark.parametrize("pdl", [False, True])
def test_pdl_reaches_exactly_the_launches_that_take_it(pdl: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """KernelOps(pdl=True) passes pdl=True to the decode step's small Triton kernels (norms,
    head selection, rotary, attention, SiLU x up) and to the sparse MLP's plan (the gather pair
    within it), and nothing to a lone gather_fc1 / gather_fc2 (fc2's reads before its wait are
    safe only after fc1)."""
    import kernels.mlp_dispatch as mlp_dispatch
    import kernels.rotary as rotary
    import kernels.route_heads as route_heads
    import kernels.silu_mul as silu_mul

    seen: dict[str, object] = {}
    for mod, op in ((select_attention, "select_attention"), (norms, "rms_norm"), (norms, "add_rms_norm"),
                    (norms, "layer_norm"), (norms, "add_layer_norm"), (route_heads, "select_groups"),
                    (route_heads, "route_heads"), (rotary, "rotary_store_kv"), (silu_mul, "silu_mul"),
                    (gather_gemm, "gather_fc1"), (gather_gemm, "gather_fc2"), (mlp_dispatch, "run_plan")):
        monkeypatch.setattr(mod, op, lambda *a, _n=op, **kw: seen.__setitem__(_n, kw.get("pdl", "absent")))
    ops = KernelOps(Backend.TRITON, pdl=pdl)
    monkeypatch.setattr(ops, "mlp_plan", lambda *a: mlp_dispatch.MlpPlan(mlp_dispatch.MlpPath.GATHER))
    ops.select_attention(*([None] * 7))
    ops.rms_norm(None, None, 1e-6)
    ops.add_rms_norm(None, None, None, 1e-6)
    ops.layer_norm(None, None, None, 1e-5)
    ops.add_layer_norm(None, None, None, None, 1e-5)
    ops.select_groups(None, None, 1, 0, 1)
    ops.route_heads(None, None, None, 1, 0, 1)
    ops.rotary_store_kv(*([None] * 6))
    ops.silu_mul(None)
    ops.gather_fc1(None, None, None, None)
    ops.gather_fc2(None, None, None, None)
    ops.sparse_mlp(None, None, None, None, torch.zeros(1, dtype=torch.int32))
    takes_pdl = ("select_attention", "rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "select_groups",
                 "route_heads", "rotary_store_kv", "silu_mul", "run_plan")
    assert seen == {**{op: True if pdl else "absent" for op in takes_pdl}, "gather_fc1": "absent",
                    "gather_fc2": "absent"}


def test_pdl_is_chosen_only_where_it_can_run() -> None:
    assert not choose_pdl(True, Backend.TRITON, CPU)  # the interpreter runs no inline PTX
    assert not choose_pdl(True, Backend.TORCH, CPU)
    assert not choose_pdl(False, Backend.TRITON, CPU)
    with pytest.raises(ValueError, match="torch backend"):
        KernelOps(Backend.TORCH, pdl=True)
    assert repr(KernelOps(Backend.TRITON, pdl=True)) == "KernelOps(triton, pdl)"


def test_torch_backend_matches_the_reference_exactly() -> None:
    x, w = torch.randn(3, 64), torch.ones(64)
    out = KernelOps(Backend.TORCH).rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, norms.rms_norm_ref(x, w, 1e-6), rtol=0, atol=0)


# ---- the sparse MLP: gather-GEMM pair or dense cuBLAS (kernels/mlp_dispatch.py) ----------------

def _mlp(m: int, d: int, n: int, k: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=gen).to(device, dtype)
    w1 = (torch.randn(n, d, generator=gen) / d**0.5).to(device, dtype)
    b1 = torch.randn(n, generator=gen).to(device, dtype)
    w2t = (torch.randn(n, d, generator=gen) / k**0.5).to(device, dtype)
    idx = torch.randperm(n, generator=gen)[:k].sort().values.int().to(device)
    return x, w1, b1, w2t, idx


def _mlp_ref(x, w1, b1, w2t, idx):  # float32 reference and the same in the inputs' dtype
    from kernels.gather_gemm import gather_fc1_ref, gather_fc2_ref

    def f(*ts):
        return gather_fc2_ref(gather_fc1_ref(ts[0], ts[1], idx, ts[2]), ts[3], idx, None)
    return f(*(t.float() for t in (x, w1, b1, w2t))), f(x, w1, b1, w2t)


@pytest.mark.parametrize("backend", list(Backend))
def test_sparse_mlp_is_dense_at_density_1_and_gather_below(backend: Backend) -> None:
    """At k = N the plan is dense (cuBLAS on CUDA); below it, on the CPU, the gather path: the torch
    references (torch backend) or the kernels in the interpreter (triton backend). Nothing is
    measured on the CPU."""
    from kernels.mlp_dispatch import MlpPath

    ops = KernelOps(backend)
    x, w1, b1, w2t, _ = _mlp(3, 64, 96, 96, torch.float32)
    assert ops.mlp_plan(x, w1, b1, w2t, 96).path is MlpPath.DENSE
    assert ops.mlp_plan(x, w1, b1, w2t, 37).path is MlpPath.GATHER
    assert ops._mlp_dispatch is None or not ops._mlp_dispatch.plans


@pytest.mark.parametrize("k", [37, 96])
def test_sparse_mlp_on_cpu_matches_the_reference(k: int) -> None:
    from support.tolerance import assert_close_to_reference

    x, w1, b1, w2t, idx = _mlp(5, 64, 96, k, torch.bfloat16)
    ref32, ref16 = _mlp_ref(x, w1, b1, w2t, idx)
    assert_close_to_reference(KernelOps(Backend.TORCH).sparse_mlp(x, w1, b1, w2t, idx), ref32, ref16)


@pytest.mark.parametrize("k", [1, 37, 95])
def test_dense_plan_computes_the_gather_function(k: int) -> None:
    """DENSE masks the unselected neurons through fc1's bias: the same y as GATHER, on any k."""
    from kernels.mlp_dispatch import dense_masked_mlp
    from support.tolerance import assert_close_to_reference

    for dtype in (torch.float32, torch.bfloat16):
        x, w1, b1, w2t, idx = _mlp(4, 64, 96, k, dtype, seed=k)
        ref32, ref_same = _mlp_ref(x, w1, b1, w2t, idx)
        assert_close_to_reference(dense_masked_mlp(x, w1, b1, w2t, idx), ref32, ref_same, ulps=2,
                                  what=f"{dtype} k={k}")  # 2: dense rounds h at all N, then sums in another order


def test_buckets_and_bins() -> None:
    from kernels.mlp_dispatch import full_tile, k_bin, m_bucket

    ms = (1, 16, 17, 48, 64, 65, 130, 256, 257, 512)
    assert [m_bucket(m) for m in ms] == [16, 16, 32, 64, 64, 128, 256, 256, 512, 512]
    assert [m for m in ms if full_tile(m)] == [16, 64, 256, 512]  # the rest mask rows off: keyed apart
    n = 36864
    assert k_bin(n, n) == n and k_bin(n - 1, n) == n - 1  # density 1 is its own bin, not measured
    for k in (1, 1151, 1152, 1153, 3686, 20000):
        assert k <= k_bin(k, n) < n and k_bin(k, n) - k < n // 32 + 1
        assert k_bin(k_bin(k, n), n) == k_bin(k, n)  # a bin's representative is in the bin


def test_measured_plans_are_fixed_before_capture(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The decision logic, with the GPU timing replaced: one measurement per (shape, M bucket, full
    last tile or not, k bin), cached; a miss while capturing runs the static gather plan and caches
    nothing."""
    from kernels.mlp_dispatch import MlpDispatch, MlpPath, MlpPlan

    measured: list = []
    capturing = [False]
    monkeypatch.setattr(MlpDispatch, "_measurable", staticmethod(lambda x: True))
    monkeypatch.setattr(MlpDispatch, "_capturing", staticmethod(lambda: capturing[0]))
    monkeypatch.setattr(MlpDispatch, "_measure",
                        lambda self, key, *a: measured.append(key) or MlpPlan(MlpPath.DENSE))
    dispatch = MlpDispatch()
    x, w1, b1, w2t, _ = _mlp(1, 64, 960, 96, torch.bfloat16)
    for m in (1, 2, 4, 8, 15):  # one M bucket with its last tile part empty, one k bin
        assert dispatch.plan(x[:1].expand(m, -1), w1, b1, w2t, 90).path is MlpPath.DENSE
    assert len(measured) == 1 and measured[0].m_bucket == 16 and measured[0].k_bin == 90
    assert not measured[0].full_tile
    dispatch.plan(x.expand(16, -1), w1, b1, w2t, 90)  # the same bucket, its tile full: another build
    assert len(measured) == 2 and measured[1].full_tile and measured[1].m_bucket == 16
    dispatch.plan(x.expand(17, -1), w1, b1, w2t, 90)  # the next M bucket
    dispatch.plan(x, w1, b1, w2t, 91)  # the next k bin
    assert len(measured) == 4
    capturing[0] = True
    assert dispatch.plan(x.expand(40, -1), w1, b1, w2t, 90).path is MlpPath.GATHER  # static, with a warning
    assert "while capturing" in caplog.text and len(dispatch.plans) == 4
    assert dispatch.plan(x, w1, b1, w2t, 90).path is MlpPath.DENSE  # cached plans still apply in a capture
    assert dispatch.plan(x, w1, b1, w2t, 960).path is MlpPath.DENSE  # density 1: never measured
    assert len(measured) == 4


def test_choose_plan() -> None:
    from kernels.gather_gemm import GemmConfig
    from kernels.mlp_dispatch import MlpPath, choose_plan

    c = [GemmConfig(16, 64, 128, split_k=s) for s in (1, 2, 4)]
    plan = choose_plan(0.5, {c[0]: 0.2, c[1]: 0.1, c[2]: 0.1}, {c[0]: 0.15, c[1]: 0.3})
    assert plan.path is MlpPath.GATHER and plan.fc1 == c[1] and plan.fc2 == c[0]  # ties: fewer splits
    assert plan.measured_ms["gather"] == pytest.approx(0.25)
    assert choose_plan(0.25, {c[0]: 0.1}, {c[0]: 0.15}).path is MlpPath.DENSE  # a tie goes to dense
    stream = GemmConfig(16, 64, 128, stream=2)
    plan = choose_plan(0.5, {c[0]: 0.2, stream: 0.05}, {c[0]: 0.15, stream: 0.15})
    assert plan.fc1 == stream and plan.fc2 == c[0]  # ties: the tile grid
    assert plan.measured_ms["fc1_stream2"] == 0.05 and plan.describe() == "gather (stream2/split1)"
    wide = GemmConfig(256, 128, 64, 8)  # M 129-256 has two tiles a kernel: the label names the tile
    narrow = GemmConfig(256, 64, 64, 8)
    plan = choose_plan(0.5, {wide: 0.1, narrow: 0.2}, {narrow: 0.1})
    assert plan.measured_ms["fc1_split1 n128k64"] == 0.1 and plan.measured_ms["fc1_split1 n64k64"] == 0.2
    assert plan.describe() == "gather (split1 n128k64/split1 n64k64)"


@pytest.mark.gpu
def test_gpu_sparse_mlp_measures_once_and_captures() -> None:
    """OPT-6.7B shape at 10% (k not a multiple of 16), bf16, M 24: the first call measures and
    caches a plan, both plans give the reference's result, and after that warm-up the call
    captures in a CUDA graph whose replay equals the eager result."""
    from kernels.mlp_dispatch import MlpPath, MlpPlan, run_plan
    from support.tolerance import assert_close_to_reference

    ops = KernelOps(Backend.TRITON)
    x, w1, b1, w2t, idx = _mlp(24, 4096, 16384, 1637, torch.bfloat16, "cuda")
    ref32, ref16 = _mlp_ref(x, w1, b1, w2t, idx)
    y = ops.sparse_mlp(x, w1, b1, w2t, idx)
    plan = ops.mlp_plan(x, w1, b1, w2t, 1637)
    assert len(ops._mlp_dispatch.plans) == 1 and {"dense", "gather"} <= set(plan.measured_ms)
    assert_close_to_reference(y, ref32, ref16, ulps=2)
    for other in (MlpPlan(MlpPath.DENSE), MlpPlan(MlpPath.GATHER)):
        assert_close_to_reference(run_plan(other, x, w1, b1, w2t, idx), ref32, ref16, ulps=2, what=str(other.path))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.sparse_mlp(x, w1, b1, w2t, idx)
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert len(ops._mlp_dispatch.plans) == 1  # the capture ran the cached plan
    assert_close_to_reference(captured, ref32, ref16, ulps=2, what="replay")


@pytest.mark.gpu
def test_gpu_density_1_is_cublas() -> None:
    from kernels.mlp_dispatch import MlpPath

    ops = KernelOps(Backend.TRITON)
    x, w1, b1, w2t, idx = _mlp(8, 1024, 4096, 4096, torch.float16, "cuda")
    assert ops.mlp_plan(x, w1, b1, w2t, 4096).path is MlpPath.DENSE
    torch.testing.assert_close(ops.sparse_mlp(x, w1, b1, w2t, idx),
                               torch.nn.functional.linear(x, w1, b1).relu_() @ w2t, rtol=0, atol=0)
    assert ops._mlp_dispatch is None or not ops._mlp_dispatch.plans  # nothing measured


@pytest.mark.parametrize("n, k, spread", [(1000, 1, True), (1000, 999, True), (5000, 300, True), (5000, 100, False),
                                          (300, 129, True), (257, 256, True), (200, 0, True)])
def test_masked_bias_kernel_equals_the_torch_build(n: int, k: int, spread: bool) -> None:
    """The DENSE plan's bias in one kernel: b1 at the selected ids, the dtype's lowest value
    elsewhere, bit-equal to the torch ops' fill + gather + scatter (a copy: no rounding), with
    ids spread or bunched, blocks of ids cut anywhere, with and without b1, every dtype."""
    from kernels.masked_bias import masked_bias, masked_bias_ref

    gen = torch.Generator().manual_seed(n + k)
    ids = torch.randperm(n, generator=gen)[:k] if spread else torch.arange(n - k - 7, n - 7)
    idx = ids.sort().values.to(torch.int32)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for b1 in (torch.randn(n, generator=gen).to(dtype), None):
            got = masked_bias(b1, idx, n, dtype, idx.device)
            assert torch.equal(got, masked_bias_ref(b1, idx, n, dtype, idx.device)), f"{dtype} bias={b1 is not None}"
    with pytest.raises(ValueError, match="idx must be"):
        masked_bias(None, idx.long(), n, torch.float16, idx.device)


def test_graph_timer_refuses_an_unknown_flush() -> None:
    from kernels.graph_timer import GraphTimer

    with pytest.raises(ValueError, match="flush must be one of"):
        GraphTimer(CPU, flush="zero")


@pytest.mark.gpu
def test_graph_timer_in_graph_replays_each_flushed_call() -> None:
    """in_graph captures `copies` calls (each after a flush) and replays that graph once to warm it
    and once per rep: the count of calls it made proves the structure its difference relies on."""
    from kernels.graph_timer import GraphTimer

    timer = GraphTimer(CUDA, reps=3)
    calls = torch.zeros((), dtype=torch.int64, device=CUDA)
    ms = timer.in_graph(lambda: calls.add_(1), copies=4)
    assert calls.item() == 1 + 4 * (1 + 3)  # the eager call, then 4 calls per replay (warm + 3 reps)
    assert ms == ms and abs(ms) < 1.0  # a number, and the flushes cancelled (an add_ is microseconds)
    with pytest.raises(ValueError, match="copies must be"):
        timer.in_graph(lambda: calls.add_(1), copies=0)


def test_plan_asks_for_pdl_only_for_a_short_gather_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    """choose_plan marks a GATHER pair measured under PDL_MAX_PAIR_MS for PDL (never DENSE), and
    run_plan launches the pair with PDL only where both the caller's kernels and the plan say so."""
    import kernels.mlp_dispatch as mlp_dispatch
    from kernels.gather_gemm import tile_config
    from kernels.mlp_dispatch import PDL_MAX_PAIR_MS, MlpPath, MlpPlan, choose_plan, run_plan

    c1, c2 = tile_config(16, fc1=True), tile_config(16, fc1=False)
    short = PDL_MAX_PAIR_MS / 4
    assert choose_plan(1.0, {c1: short}, {c2: short}).pdl
    assert not choose_plan(1.0, {c1: PDL_MAX_PAIR_MS}, {c2: short}).pdl  # a long pair: no PDL
    dense = choose_plan(short, {c1: short}, {c2: short})
    assert dense.path is MlpPath.DENSE and not dense.pdl
    seen = []
    monkeypatch.setattr(mlp_dispatch, "gather_mlp", lambda *a: seen.append(a[-1]))
    for plan_pdl in (False, True):
        for ops_pdl in (False, True):
            run_plan(MlpPlan(MlpPath.GATHER, c1, c2, plan_pdl), *([None] * 5), pdl=ops_pdl)
    assert seen == [False, False, False, True]
