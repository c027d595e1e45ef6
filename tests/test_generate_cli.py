"""launch/generate.py end to end in one process on a tiny model: JSON lines, seeded sampling,
config overrides from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> Path:
    path = tmp_path_factory.mktemp("cli") / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tiny_model("opt")), "tokenizer": "bytes", "device": "cpu"},
                                    "engine": {"max_seq_len": 64}}))
    return path


def generate(config: Path, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "launch/generate.py"), "--config", str(config),
                           "--prompt", "one", "--prompt", "two and three", "--max-new-tokens", "16", "--ignore-eos",
                           *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_json_lines_and_seeded_sampling(config: Path) -> None:
    hot = ["--temperature", "1.2", "--top-k", "50", "--top-p", "0.9"]
    a = generate(config, *hot, "--seed", "11")
    assert [x["prompt"] for x in a] == ["one", "two and three"]
    assert all(len(x["token_ids"]) == 16 and isinstance(x["text"], str) for x in a)
    assert all(x["finish_reason"] == "length" for x in a)  # --ignore-eos: always max_new_tokens
    assert generate(config, *hot, "--seed", "11") == a
    assert generate(config, *hot, "--seed", "12") != a
    assert generate(config) != a  # greedy differs from the sampled run


def test_set_overrides_reach_the_run(config: Path) -> None:
    bf16 = generate(config, "--set", "model.dtype=bfloat16", "--set", "engine.block_size=32")
    assert len(bf16) == 2
    proc = subprocess.run([sys.executable, str(ROOT / "launch/generate.py"), "--config", str(config),
                           "--prompt", "hello", "--set", "engine.max_seq_len=4"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "the prompt has 5 tokens but the maximum sequence length is 4" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "nan"], "argument --temperature: 'nan' is not a finite number"),
        (["--temperature", "inf"], "argument --temperature: 'inf' is not a finite number"),
        (["--temperature", "-0.5"], "argument --temperature: -0.5 must be >= 0"),
        (["--top-p", "0"], "argument --top-p: 0 must be in (0, 1]"),
        (["--top-p", "1.01"], "argument --top-p: 1.01 must be in (0, 1]"),
        (["--max-new-tokens", "-1"], "argument --max-new-tokens: -1 must be >= 1"),
        (["--top-k", "-2"], "argument --top-k: -2 must be >= 0"),
        (["--seed", str(1 << 64)], f"argument --seed: {1 << 64} does not fit in 64 bits"),
        ([b"--prompt", b"caf\xe9"], "argument --prompt: the text is not valid UTF-8 (the byte 0xe9 at character 3)"),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(tmp_path: Path, args: list, message: str) -> None:
    # the model path does not exist: an argument error must come first, before any loading
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "no-model"), "device": "cpu"}}))
    proc = subprocess.run([sys.executable, str(ROOT / "launch/generate.py"), "--config", str(path), "--prompt", "hi",
                           *args], capture_output=True, timeout=60, cwd=ROOT)
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == 2, err
    assert message in err and "Traceback" not in err
