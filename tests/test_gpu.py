"""CUDA checks, run on a GPU machine with `pytest -m gpu`: the tiny-model logits match
transformers in fp16 and bf16 (decode through the Triton kernels, eager and CUDA graphs; head
dims 80 and 96 too), also
through the NCCL code path at world size 1, and launch/generate.py runs a random
Llama-3.1-8B-shape model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from support.ranks import free_port
from support.tiny_models import ARCHS, ODD_HEAD_DIM_ARCHS, check_against_hf, release_device_memory, runtime_logits
from support.tolerance import CUDA_MODEL_ULPS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_logits_match_transformers_cuda(arch: str, dtype: str, cuda_graphs: bool,
                                        tiny_model: Callable[[str], Path]) -> None:
    # 3 sequences decode in the batch-4 graph: one padding row writes the scratch block
    ours = runtime_logits(tiny_model(arch), dtype, device="cuda", cuda_graphs=cuda_graphs)
    check_against_hf(tiny_model(arch), ours, dtype, device="cuda", ulps=CUDA_MODEL_ULPS)


@pytest.mark.parametrize("arch", list(ODD_HEAD_DIM_ARCHS))
def test_head_dims_between_powers_of_two_match_transformers(arch: str, tiny_model: Callable[[str], Path]) -> None:
    ours = runtime_logits(tiny_model(arch), "bfloat16", device="cuda", cuda_graphs=True)
    check_against_hf(tiny_model(arch), ours, "bfloat16", device="cuda", ulps=CUDA_MODEL_ULPS)


def test_nccl_path_at_world_size_one(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    release_device_memory()  # the runtime in the child sizes its KV cache from this GPU's free memory
    out = tmp_path / "logits.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
         str(ROOT / "tests/support/tp_script.py"), str(tiny_model("llama-gqa")), str(out), "bfloat16",
         "--device", "cuda", "--backend", "nccl"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_against_hf(tiny_model("llama-gqa"), torch.load(out), "bfloat16", device="cuda", ulps=CUDA_MODEL_ULPS)


def test_generate_llama31_8b_shape_on_gpu() -> None:
    release_device_memory()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch/generate.py"), "--config", str(ROOT / "configs/llama-3.1-8b.yaml"),
         "--set", "engine.max_batch_size=16", "--set", "engine.max_seq_len=1024", "--prompt", "hello world",
         "--prompt", "a second, longer prompt", "--max-new-tokens", "64", "--ignore-eos", "--stats"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [len(x["token_ids"]) for x in lines] == [64, 64]
    print(proc.stderr.strip().splitlines()[-1])  # tokens/s


def test_overlapped_steps_give_the_tokens_of_steps_that_wait_on_gpu(tiny_model: Callable[[str], Path]) -> None:
    """CUDA graphs with chained steps (inputs copied from the previous draw's output on the
    device): the same tokens as the engine that waits, through finishes at different steps."""
    from polar_dist.config import config_from_dict
    from polar_dist.engine.engine import Engine
    from polar_dist.engine.sampling import SamplingParams
    from polar_dist.parallel.context import init_parallel
    from polar_dist.runtime import build_runtime

    prompts = [[5, 6, 7], list(range(10, 40)), list(range(100, 117)), [9]]
    params = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=i, ignore_eos=True)
              for i, n in enumerate((24, 9, 17, 30))]
    got = []
    for overlap in (False, True):
        cfg = config_from_dict({"model": {"path": str(tiny_model("llama-gqa")), "tokenizer": "bytes", "device": "cuda",
                                          "dtype": "bfloat16"},
                                "engine": {"max_seq_len": 128, "max_batch_size": 4, "kv_cache_blocks": 64,
                                           "overlap_steps": overlap}})
        rt = build_runtime(cfg, init_parallel(cfg.parallel, cfg.model.device))
        engine = Engine(rt)
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        tokens: dict[int, list[int]] = {i: [] for i in ids}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
        assert (engine.chained_steps > 10) == overlap
        engine.shutdown()
        rt.ctx.shutdown()
        got.append([tokens[i] for i in ids])
        del rt, engine
        release_device_memory()
    assert [len(t) for t in got[1]] == [24, 9, 17, 30]
    assert got[1] == got[0]
