"""Calibration end to end on tiny random models (GQA Llama: head routers; OPT: head and neuron
routers) over a few KB of public-domain text: the collected rows equal a reference computed
from transformers' own forward, memory stays within the buffer budget, tp=2 collects the same
rows as tp=1, and the artifact loads and drives sparse generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.ranks import free_port, run_ranks

from support import tiny_models
from polar_dist.config import config_from_dict
from polar_dist.engine.sampling import SamplingParams
from polar_dist.models.tokenizer import ByteTokenizer
from polar_dist.parallel.context import init_parallel
from polar_dist.runtime import build_runtime, generate
from polar_dist.sparsity.artifact import load_artifact
from polar_dist.sparsity.calibrate import CalibrationConfig, calibrate, prepare_text
from polar_dist.sparsity.collect import collect, label_layouts
from polar_dist.sparsity.policy import model_identity
from polar_dist.sparsity.selection import density_to_k
from polar_dist.sparsity.training import RouterTrainConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests/data/sonnets_1-20.txt"  # Shakespeare, Sonnets I-XX (public domain), 12.6 KB
SEG_LEN = 64
FAST = dict(seg_len=SEG_LEN, heldout_fraction=0.2, max_train_tokens=4096, max_heldout_tokens=1024,
            head_training=RouterTrainConfig(epochs=3, batch_size=256),
            neuron_training=RouterTrainConfig(epochs=2, batch_size=64), progress=False)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calibrate")
    return {arch: tiny_models.save_tiny_model(arch, root / arch) for arch in ("llama-gqa", "opt")}


def run_config(model_dir: Path, **sparsity) -> dict:  # noqa: ANN003
    return {"model": {"path": str(model_dir), "tokenizer": "bytes", "device": "cpu"},
            "parallel": {"timeout_s": 60}, "sparsity": sparsity,
            "engine": {"max_batch_size": 4, "max_seq_len": SEG_LEN + 16, "cuda_graphs": False}}


def runtime(model_dir: Path, **sparsity):  # noqa: ANN003, ANN201
    cfg = config_from_dict(run_config(model_dir, **sparsity))
    return build_runtime(cfg, init_parallel(cfg.parallel, "cpu"))


def segments(count: int = 10) -> list[list[int]]:
    ids = ByteTokenizer().encode(TEXT.read_text())
    return [ids[i * SEG_LEN:(i + 1) * SEG_LEN] for i in range(count)]


# ---- the collected rows -------------------------------------------------------------------


def transformers_rows(model_dir: Path, segs: list[list[int]]) -> dict[tuple[str, int], torch.Tensor]:
    """Per layer, from transformers' forward over each segment: router input x (T, d), per-head
    output norms (T, H) and, for OPT, fc1 pre-activations (T, N)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    opt = model.config.model_type == "opt"
    layers = model.model.decoder.layers if opt else model.model.layers
    rows: dict[tuple[str, int], list[torch.Tensor]] = {}

    def keep(key: tuple[str, int], t: torch.Tensor) -> None:
        rows.setdefault(key, []).append(t.detach().reshape(-1, t.shape[-1]))

    for i, layer in enumerate(layers):
        norm = layer.self_attn_layer_norm if opt else layer.input_layernorm
        out_proj = layer.self_attn.out_proj if opt else layer.self_attn.o_proj
        norm.register_forward_hook(lambda m, a, out, i=i: keep(("x", i), out))
        out_proj.register_forward_pre_hook(lambda m, a, i=i: keep(("o", i), a[0]))  # (1, T, H * D)
        if opt:
            layer.fc1.register_forward_hook(lambda m, a, out, i=i: keep(("fc1", i), out))
    with torch.no_grad():
        for seg in segs:
            model(torch.tensor([seg]))
    out = {key: torch.cat(parts) for key, parts in rows.items()}
    H, D = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    for i in range(len(layers)):
        out[("norms", i)] = out.pop(("o", i)).view(-1, H, D).norm(dim=-1)  # (T, H)
    return out


@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
def test_collected_rows_match_transformers(arch: str, model_dirs: dict[str, Path]) -> None:
    rt = runtime(model_dirs[arch])
    spec, segs = rt.spec, segments()
    k = density_to_k(0.5, spec.num_kv_heads)
    samples = collect(rt, segs, segs[:1], k_label=k, budget_bytes=64 << 20, progress=False)
    ref = transformers_rows(model_dirs[arch], segs)
    G, group = spec.num_kv_heads, spec.group_size
    assert set(samples) == set(label_layouts(spec)) == ({0, 1} if arch == "opt" else {1})
    for layer, s in samples.items():
        x, y = s.train.tensors()  # the buffer holds every row, in order
        assert x.shape[0] == len(segs) * SEG_LEN and s.heldout.num_seen == SEG_LEN
        torch.testing.assert_close(x, ref[("x", layer)].half().float(), atol=2e-3, rtol=2e-3)
        if s.layout.num_groups:
            scores = ref[("norms", layer)].view(-1, G, group).amax(dim=2)  # (T, G): max over a group's heads
            top = scores.sort(dim=1, descending=True).values
            clear = top[:, k - 1] - top[:, k] > 1e-4 * top[:, 0]  # rows without a near tie at the k-th group
            truth = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
            labels = y[:, s.layout.heads]
            assert clear.float().mean() > 0.95
            assert torch.equal(labels[clear], truth[clear])
            assert (labels.sum(dim=1) == k).all()
        if s.layout.num_neurons:
            fc1 = ref[("fc1", layer)]
            clear = fc1.abs() > 1e-4
            assert torch.equal(y[:, s.layout.neurons][clear], (fc1 > 0)[clear])


def test_buffers_stay_within_budget(model_dirs: dict[str, Path]) -> None:
    rt = runtime(model_dirs["llama-gqa"])
    budget = 40_000  # ~62 training and ~15 held-out rows of layer 1 (256 * 2 + 1 bytes each)
    samples = collect(rt, segments(8), segments(2), k_label=1, budget_bytes=budget, progress=False)
    (s,) = samples.values()
    assert s.nbytes <= budget
    assert s.train.num_seen == 8 * SEG_LEN > len(s.train) == s.train.capacity
    assert s.heldout.num_seen == 2 * SEG_LEN > len(s.heldout) == s.heldout.capacity


def test_text_split_has_no_shared_tokens(tmp_path: Path) -> None:
    cfg = CalibrationConfig(seg_len=SEG_LEN, stride=SEG_LEN // 2, heldout_fraction=0.2, max_train_tokens=1 << 20)
    text = prepare_text(ByteTokenizer(), [TEXT], cfg)
    ids = ByteTokenizer().encode(TEXT.read_text())
    starts = {tuple(ids[s:s + SEG_LEN]): s for s in range(0, len(ids) - SEG_LEN + 1, SEG_LEN // 2)}
    train = {p for seg in text.train for p in range(starts[tuple(seg)], starts[tuple(seg)] + SEG_LEN)}
    heldout = {p for seg in text.heldout for p in range(starts[tuple(seg)], starts[tuple(seg)] + SEG_LEN)}
    assert train and heldout and not train & heldout
    assert text.train_files[0].name == TEXT.name and text.train_files == text.heldout_files
    capped = prepare_text(ByteTokenizer(), [TEXT], CalibrationConfig(seg_len=SEG_LEN, max_train_tokens=5 * SEG_LEN))
    assert len(capped.train) == 5
    with pytest.raises(Exception, match="also training text"):
        prepare_text(ByteTokenizer(), [TEXT], cfg, heldout_paths=[TEXT])


# ---- the artifact ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
def test_artifact_loads_and_drives_sparse_generation(arch: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    rt = runtime(model_dirs[arch])
    allocation = "per_layer" if arch == "opt" else "uniform"
    meta = calibrate(rt, [TEXT], tmp_path / "routers",
                     CalibrationConfig(**FAST, head_density=0.5, head_allocation=allocation))
    spec, G = rt.spec, rt.spec.num_kv_heads
    weights, loaded = load_artifact(tmp_path / "routers", expect=model_identity(spec))
    assert loaded == meta
    assert meta.head_label_k == density_to_k(0.5, G) and meta.head_k[0] == G and meta.head_k[1] == G // 2
    assert meta.layer_metrics[0].head_recall_at_k is None
    curve = meta.layer_metrics[1].head_recall_at_k
    assert len(curve) == G and curve[-1] == 1.0 and list(curve) == sorted(curve)
    assert meta.layer_metrics[1].head_recall == curve[meta.head_k[1] - 1]
    assert weights["layers.1.head.weight"].shape == (G, spec.hidden_size) and "layers.0.head.weight" not in weights
    if arch == "opt":
        assert meta.neuron_k.buckets == (1, 2, 4)  # the CUDA-graph buckets up to max_batch_size 4
        assert all(row == tuple(sorted(row)) for row in meta.neuron_k.k)
        assert weights["layers.0.neuron.fc2.weight"].shape == (spec.intermediate_size, 1024)
    else:
        assert meta.neuron_k is None

    sparse = {"head_density": 0.5, "routers": str(tmp_path / "routers"), "mlp": arch == "opt"}
    rt = runtime(model_dirs[arch], **sparse)
    assert rt.runner.model.layers[1].attn.heads.k == G // 2
    (seq,) = generate(rt, ["Shall I compare thee"], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert len(seq.output_ids) == 6
    # A policy that leaves routed layers dense loads the same artifact and skips their routers.
    rt = runtime(model_dirs[arch], **{**sparse, "head_density": 1.0})
    assert not any(rt.policy.head_routed(i) for i in range(spec.num_layers))


# ---- tensor parallelism ------------------------------------------------------------------


def collect_rank(rank: int, world_size: int, model_dir: str, out_file: str) -> None:
    cfg = config_from_dict({**run_config(Path(model_dir)), "parallel": {"timeout_s": 60, "backend": "gloo"}})
    ctx = init_parallel(cfg.parallel, "cpu")
    rt = build_runtime(cfg, ctx)
    samples = collect(rt, segments(6), segments(2), k_label=density_to_k(0.5, rt.spec.num_kv_heads),
                      budget_bytes=64 << 20, progress=False)
    if samples is not None:
        torch.save({i: (s.train.tensors(), s.heldout.tensors()) for i, s in samples.items()}, out_file)
    ctx.shutdown()


def test_tp2_collects_the_rows_of_tp1(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    for arch in ("llama-gqa", "opt"):  # opt: 701 neurons split 351 + 350 over the ranks
        one, two = tmp_path / f"{arch}-tp1.pt", tmp_path / f"{arch}-tp2.pt"
        collect_rank(0, 1, str(model_dirs[arch]), str(one))
        run_ranks(collect_rank, 2, str(model_dirs[arch]), str(two))
        a, b = torch.load(one), torch.load(two)
        assert a.keys() == b.keys()
        for layer in a:
            for (xa, ya), (xb, yb) in zip(a[layer], b[layer]):
                torch.testing.assert_close(xa, xb, atol=2e-3, rtol=2e-3)
                assert (ya != yb).float().mean() < 1e-3  # only near-ties may differ


@pytest.mark.slow
def test_torchrun_tp2_calibration_matches_tp1(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(model_dirs["opt"], head_density=0.5)))
    args = [str(ROOT / "launch/calibrate.py"), "--config", str(config), "--text", str(TEXT),
            "--seg-len", str(SEG_LEN), "--heldout-fraction", "0.2", "--max-train-tokens", "4096",
            "--max-heldout-tokens", "1024", "--head-epochs", "3", "--neuron-epochs", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    runs = {1: [sys.executable, *args, "--out", str(tmp_path / "tp1")],
            2: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), *args, "--out", str(tmp_path / "tp2")]}
    procs = {tp: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300) for tp, cmd in runs.items()}
    for tp, proc in procs.items():
        assert proc.returncode == 0, (tp, proc.stderr[-4000:])
        assert "head k" in proc.stdout and proc.stdout.count("/4") == 2  # one table row per layer
    a, b = (json.loads((tmp_path / f"tp{tp}" / "metadata.json").read_text()) for tp in (1, 2))
    assert a["head_k"] == b["head_k"] and a["head_label_k"] == b["head_label_k"]
    assert a["neuron_k"]["buckets"] == b["neuron_k"]["buckets"]
    n = a["model"]["intermediate_size"]
    for row_a, row_b in zip(a["neuron_k"]["k"], b["neuron_k"]["k"]):
        assert all(abs(ka - kb) <= 0.02 * n for ka, kb in zip(row_a, row_b))
    for ma, mb in zip(a["layer_metrics"], b["layer_metrics"]):
        for key in ("head_recall", "neuron_recall", "neuron_precision"):
            assert (ma[key] is None) == (mb[key] is None)
            assert ma[key] is None or abs(ma[key] - mb[key]) < 0.02, (key, ma[key], mb[key])
    assert a["created"]["created_by"].startswith("python ") and b["created"]["created_by"].startswith("torchrun ")


@pytest.mark.slow
def test_torchrun_error_on_rank0_ends_every_rank(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(model_dirs["llama-gqa"])))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(ROOT / "launch/calibrate.py"), "--config", str(config),
                           "--text", str(tmp_path / "missing.txt"), "--seg-len", str(SEG_LEN), "--out",
                           str(tmp_path / "routers")],
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):  # rank 0 reads the text; rank 1 raises the same user error instead of waiting
        assert f"[rank {rank}/2] error: text file {tmp_path / 'missing.txt'} does not exist" in proc.stderr
    assert not (tmp_path / "routers").exists()


@pytest.mark.slow
def test_calibration_at_dp2_runs_on_replica_0(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(model_dirs["llama-gqa"], head_density=0.5)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                           str(free_port()), str(ROOT / "launch/calibrate.py"), "--config", str(config),
                           "--set", "parallel.dp=2", "--text", str(TEXT), "--seg-len", str(SEG_LEN),
                           "--heldout-fraction", "0.2", "--max-train-tokens", "2048", "--max-heldout-tokens", "512",
                           "--head-epochs", "2", "--out", str(tmp_path / "routers")],
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "replica 1: nothing to do, replica 0 calibrates (parallel.dp = 2)" in proc.stderr
    assert proc.stdout.count("head k") == 1  # one table, from replica 0
    assert json.loads((tmp_path / "routers" / "metadata.json").read_text())["head_k"]
