"""The peer a user would otherwise pick: Hugging Face transformers' generate (static cache,
SDPA; 5.x compiles the forward) on the same random-weight shape, timed per decode step.

Step time = (time of 1 + n new tokens - time of 1 new token) / n: the prefill and the first
token cancel, what is left is n decode steps at contexts just past `context`.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch


def hf_decode_step_ms(hf_config: dict[str, Any], dtype: torch.dtype, batch: int, context: int,
                      new_tokens: int = 128) -> float:
    """(t(1 + n) - t(1)) / n, the minimum of 3 runs each, after one warm-up run of each length
    (transformers 5.x compiles the forward for a static cache: a new cache length recompiles)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(hf_config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch, context), device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       cache_implementation="static", pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    try:
        timed(1)
        timed(1 + new_tokens)
        one = min(timed(1) for _ in range(3))
        many = min(timed(1 + new_tokens) for _ in range(3))
        return (many - one) / new_tokens * 1e3
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
