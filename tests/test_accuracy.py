"""Decode-path accuracy (polar_dist/sparsity/evaluate.py, benchmarks/accuracy.py) on tiny random
models against transformers.

References are transformers' full causal forward over each whole sequence, in float64 (and in
float32, to measure float32's own error). Ours prefills a short prefix and teacher-forces the
rest through decode steps (paged cache, head tables, selective attention), so agreement checks
the whole decode path, not just the arithmetic.

Sparse decode with the oracle is checked against transformers with a hook on each sparse layer's
o_proj input (the per-head attention outputs, (B, T, Hq * D)): at every position fed by a decode
step it keeps each token's top-k KV groups by output norm (a group's score is the max L2 norm
of its query heads) and zeroes the rest; layer 0 and prefilled positions stay dense. That
reference shares no code with ours - transformers' attention over the whole sequence instead of
our paged selective kernel, its own masking - and a decode token's masked hidden state feeds
its K/V in later layers in both, so it is a full statement of what oracle sparse decode must
compute. Two guards keep it a real check: the masked reference must differ from the dense one
by far more than the tolerance (so a runtime that ignored the density would fail), and every
top-k choice in the reference must win by a relative margin that float32 rounding cannot flip.

Tolerance (per token NLL): twice transformers' own float32 error against float64, plus 8 float32
ulps of the largest logit (NLL = logsumexp - logit moves by at most twice a logit error; the
logits test allows 4 ulps of it, as the CUDA logits tests do: tests/support/tolerance.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from support import tiny_models
from polar_dist.config import config_from_dict
from polar_dist.errors import UserError
from polar_dist.parallel.context import init_parallel
from polar_dist.runtime import Runtime, build_runtime
from polar_dist.sparsity.choice_tasks import (ChoiceItem, next_sentence_items, read_choice_items, split_sentences,
                                              write_choice_items)
from polar_dist.sparsity.evaluate import Request, decode_nll, score_choices, segment_perplexity
from polar_dist.sparsity.policy import DENSE_LAYERS
from polar_dist.sparsity.selection import density_to_k

PREFIX = 5
SEG_LEN = 40  # crosses two 16-token blocks
NUM_SEGMENTS = 6  # max_batch_size 4: a full batch, then admission of the rest as the first finish
MIN_MARGIN = 1e-5  # relative top-k margin; float32 group norms are good to ~1e-6


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny_models.save_tiny_model(arch, root / arch) for arch in ("llama-gqa", "qwen2")}


def runtime(model_dir: Path, density: float = 1.0, **engine: int) -> Runtime:
    cfg = config_from_dict({
        "model": {"path": str(model_dir), "tokenizer": "bytes", "dtype": "float32", "device": "cpu"},
        "sparsity": {"head_density": density, "routing": "oracle"},
        "engine": {"block_size": 16, "max_batch_size": 4, "max_seq_len": 64, **engine},
    })
    return build_runtime(cfg, init_parallel(cfg.parallel, cfg.model.device))


def segments(seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, tiny_models.VOCAB, (NUM_SEGMENTS, SEG_LEN), generator=gen).tolist()


def hf_nll(model_dir: Path, dtype: torch.dtype, tokens: list[list[int]], prefill_lens: list[int],
           density: float = 1.0) -> tuple[list[torch.Tensor], float, float]:
    """Per sequence, float64 NLL of tokens[p + 1:] from transformers; with density < 1 the oracle
    mask is applied at positions >= p of every sparse layer. Also returns the largest |logit| and
    the smallest relative top-k margin (inf when dense)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    cfg = model.config
    G, Hq = cfg.num_key_value_heads, cfg.num_attention_heads
    k = density_to_k(density, G)
    margins = [math.inf]
    state: dict[str, int] = {}

    def mask(module: torch.nn.Module, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        (o,) = inputs  # (1, T, Hq * D)
        heads = o.view(*o.shape[:2], Hq, -1)  # (1, T, Hq, D)
        scores = heads.norm(dim=-1).view(*o.shape[:2], G, Hq // G).amax(-1)  # (1, T, G)
        top = scores.sort(dim=-1, descending=True).values  # (1, T, G)
        decode = torch.arange(o.shape[1]) >= state["prefill"]  # (T,) positions fed by decode steps
        margins.append(((top[..., k - 1] - top[..., k]) / top[..., k - 1])[:, decode].min().item())
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)
        keep = keep.repeat_interleave(Hq // G, dim=-1) | ~decode.view(1, -1, 1)  # (1, T, Hq)
        return ((heads * keep.unsqueeze(-1)).reshape(o.shape),)

    if k < G:
        for i, layer in enumerate(model.model.layers):
            if i not in DENSE_LAYERS:
                layer.self_attn.o_proj.register_forward_pre_hook(mask)
    out, max_logit = [], 0.0
    with torch.no_grad():
        for seq, p in zip(tokens, prefill_lens):
            state["prefill"] = p
            logits = model(torch.tensor([seq])).logits[0].double()  # (L, V)
            target = torch.tensor(seq[p + 1:]).unsqueeze(1)
            scored = logits[p:-1]  # (L - p - 1, V): position i predicts token i + 1
            out.append(torch.logsumexp(scored, -1) - scored.gather(1, target).squeeze(1))
            max_logit = max(max_logit, logits.abs().max().item())
    return out, max_logit, min(margins)


def nll_tolerance(ref64: list[torch.Tensor], hf32: list[torch.Tensor], max_logit: float) -> float:
    hf_err = max((a - b).abs().max().item() for a, b in zip(hf32, ref64))
    return 2 * hf_err + 8 * torch.finfo(torch.float32).eps * max_logit


def check_nll(model_dir: Path, density: float) -> tuple[float, float]:
    segs = segments()
    ours = decode_nll(runtime(model_dir, density), [Request(s, PREFIX) for s in segs])
    ref64, max_logit, margin = hf_nll(model_dir, torch.float64, segs, [PREFIX] * len(segs), density)
    hf32, _, _ = hf_nll(model_dir, torch.float32, segs, [PREFIX] * len(segs), density)
    assert margin > MIN_MARGIN, f"a top-k choice wins by only {margin:.1e}: the case is ill-conditioned, change seed"
    tol = nll_tolerance(ref64, hf32, max_logit)
    for a, b in zip(ours, ref64):
        assert a.shape == b.shape == (SEG_LEN - PREFIX - 1,)
    err = max((a - b).abs().max().item() for a, b in zip(ours, ref64))
    assert err <= tol, f"max |NLL ours - float64 reference| = {err:.3e} > tolerance {tol:.3e}"
    # the perplexity the benchmark reports: token-weighted over the same positions
    ppl = segment_perplexity(runtime(model_dir, density), segs, PREFIX)
    ref_mean = torch.cat(ref64).mean().item()
    assert ppl.tokens == NUM_SEGMENTS * (SEG_LEN - PREFIX - 1)
    assert abs(math.log(ppl.perplexity) - ref_mean) <= tol
    return ref_mean, tol


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_dense_perplexity_matches_transformers(arch: str, model_dirs: dict[str, Path]) -> None:
    check_nll(model_dirs[arch], 1.0)


@pytest.mark.parametrize("arch, density", [("llama-gqa", 0.5), ("qwen2", 0.5)])
def test_oracle_perplexity_matches_masked_transformers(arch: str, density: float,
                                                       model_dirs: dict[str, Path]) -> None:
    sparse_mean, tol = check_nll(model_dirs[arch], density)
    segs = segments()
    dense, _, _ = hf_nll(model_dirs[arch], torch.float64, segs, [PREFIX] * len(segs))
    gap = abs(sparse_mean - torch.cat(dense).mean().item())
    assert gap > 10 * tol, f"masking changes the mean NLL by only {gap:.2e}: the sparse check would not see it"


def test_preemption_is_an_error(model_dirs: dict[str, Path]) -> None:
    rt = runtime(model_dirs["llama-gqa"], kv_cache_blocks=6)  # 4 segments of 3 blocks cannot all stay
    with pytest.raises(UserError, match="preempted"):
        decode_nll(rt, [Request(s, PREFIX) for s in segments()])


def constrained_greedy(model_dir: Path, context: str, n: int) -> str:
    """transformers' greedy continuation among printable ASCII bytes (the byte tokenizer's text)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    ids = list(context.encode())
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(32 + int(logits[32:127].argmax()))
    return bytes(ids[len(context.encode()):]).decode()


def test_choices_pick_the_constructed_answer(model_dirs: dict[str, Path]) -> None:
    gen = torch.Generator().manual_seed(0)
    items = []
    for i, context in enumerate(["The quick brown fox", "Once upon a time ", "x = 1; y"]):
        right = constrained_greedy(model_dirs["llama-gqa"], context, 6)
        wrong = [bytes(torch.randint(32, 127, (6,), generator=gen).tolist()).decode() for _ in range(3)]
        label = i % 4
        items.append(ChoiceItem(context, tuple(wrong[:label] + [right] + wrong[label:]), label))
    scores = score_choices(runtime(model_dirs["llama-gqa"]), items)
    assert scores.predictions == [it.label for it in items] and scores.accuracy == 1.0
    # each choice's log-likelihood is transformers' over the same continuation tokens
    tokens, prefill = [], []
    for item in items:
        stripped = item.context.rstrip()
        for c in item.choices:
            tokens.append(list((stripped + item.context[len(stripped):] + c).encode()))
            prefill.append(len(stripped.encode()) - 1)
    ref64, max_logit, _ = hf_nll(model_dirs["llama-gqa"], torch.float64, tokens, prefill)
    hf32, _, _ = hf_nll(model_dirs["llama-gqa"], torch.float32, tokens, prefill)
    tol = nll_tolerance(ref64, hf32, max_logit) * max(len(t) for t in tokens)  # a sum of per-token NLLs
    ref = [-r.sum().item() for r in ref64]
    ours = [ll for row in scores.logliks for ll in row]
    assert max(abs(a - b) for a, b in zip(ours, ref)) <= tol


def test_next_sentence_items(tmp_path: Path) -> None:
    paragraphs = [" ".join(f"Paragraph {p} says thing number {i} about the topic at hand." for i in range(6))
                  for p in range(5)]
    text = "\n".join(paragraphs)
    assert split_sentences(paragraphs[0])[2] == "Paragraph 0 says thing number 2 about the topic at hand."
    items = next_sentence_items(text, 8, num_choices=3, context_sentences=2, seed=1)
    assert items == next_sentence_items(text, 8, num_choices=3, context_sentences=2, seed=1)
    assert len(items) == 8
    for item in items:
        last = item.context.split(". ")[-1]  # "Paragraph p says thing number i ... hand."
        p, i = int(last.split()[1]), int(last.split()[5])
        right = item.choices[item.label]
        assert right == f" Paragraph {p} says thing number {i + 1} about the topic at hand."
        assert all(f"Paragraph {p} " not in c for j, c in enumerate(item.choices) if j != item.label)
    path = tmp_path / "task.jsonl"
    write_choice_items(path, items)
    assert read_choice_items(path) == items
    path.write_text('{"context": "a", "choices": ["b"], "label": 0}\n')
    with pytest.raises(UserError, match="task.jsonl:1: a multiple-choice item needs at least 2 choices"):
        read_choice_items(path)


def test_benchmark_json_lines(model_dirs: dict[str, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import accuracy

    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: {{path: {model_dirs['qwen2']}, tokenizer: bytes, dtype: float32, device: cpu}}\n"
                      "engine: {max_batch_size: 4, max_seq_len: 64}\n")
    gen = torch.Generator().manual_seed(0)
    text = tmp_path / "text.txt"
    text.write_text(bytes(torch.randint(32, 127, (300,), generator=gen).tolist()).decode())
    mc = tmp_path / "mc.jsonl"
    write_choice_items(mc, [ChoiceItem("Some context", (" yes", " no", " maybe"), 1)])
    out = tmp_path / "acc.json"
    accuracy.main(["--config", str(config), "--text", str(text), "--densities", "1.0,0.5", "--oracle",
                   "--set", "sparsity.routers=random", "--seg-len", "40", "--prefix-len", "5", "--max-tokens", "200",
                   "--mc", str(mc), "--out", str(out)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["density"], r["routing"], r["allocation"]) for r in lines] == [
        (1.0, "router", "uniform"), (0.5, "router", "uniform"), (1.0, "oracle", "uniform"), (0.5, "oracle", "uniform")]
    for r in lines:
        assert {"density", "routing", "allocation", "tokens", "perplexity", "mc_accuracy"} <= set(r)
        assert r["tokens"] == 5 * (40 - 5 - 1) and math.isfinite(r["perplexity"])
    assert lines[0]["perplexity"] == lines[2]["perplexity"]  # density 1.0 is the dense model under any routing
    assert lines[1]["routers"] == "random" and lines[3]["routers"] == ""
    assert lines[1]["head_k"] == [4, 2] and lines[3]["mean_density"] == 0.75
    assert json.loads(out.read_text())["rows"] == lines
    assert out.with_suffix(".md").is_file()
