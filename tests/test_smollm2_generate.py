"""The embedded SmolLM2-135M: dense greedy token ids from launch/generate.py at tp=1 (python)
and tp=3 (torchrun) equal transformers' greedy generate on the same GGUF, one prompt at a time;
the shipped sparse default (calibrated head routers, global scope) gives the same tokens at
tp=3, where each rank holds one KV group, as at tp=1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.ranks import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Hi",
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "Write a short list of three fruits that are red, and explain for each one why people like to eat it "
    "in summer, especially when the weather is hot and dry, because",
]
NEW_TOKENS = 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_greedy() -> list[list[int]]:
    """transformers' greedy continuation of each prompt, generated one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polar_dist.models.gguf_cache import locate_embedded

    gguf = locate_embedded("embedded:smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def launcher(tp: int) -> list[str]:
    if tp == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def run_generate(launcher: list[str], *extra: str) -> list[dict]:
    args = [*launcher, str(ROOT / "launch/generate.py"), "--config", str(ROOT / "configs/smollm2-135m.yaml"),
            "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0", *extra]
    for p in PROMPTS:
        args += ["--prompt", p]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("tp", [1, 3])
def test_greedy_equals_transformers(tp: int, hf_greedy: list[list[int]]) -> None:
    lines = run_generate(launcher(tp), "--set", "sparsity.head_density=1.0")
    assert [line["prompt"] for line in lines] == PROMPTS
    for line, expected in zip(lines, hf_greedy):
        assert line["token_ids"] == expected, f"prompt {line['prompt']!r}"
        assert isinstance(line["text"], str)


def test_sparse_default_tokens_equal_at_tp3() -> None:
    """Global scope at tp = 3: one KV group per rank, each rank computes its group only for the
    sequences that chose it; the tokens equal the single-rank sparse model's."""
    single = run_generate(launcher(1))
    sharded = run_generate(launcher(3))
    assert [line["token_ids"] for line in sharded] == [line["token_ids"] for line in single]
