"""Tiny random HF models and the teacher-forced logits check shared by the tensor-parallel tests.

A case = a random HF model saved as a safetensors directory + token sequences. The reference is
transformers' forward over each whole sequence (float64, and the test dtype); ours is the
runtime's prefill of each prompt followed by decode steps fed the sequence's next tokens, so
every decode position is compared too. `rank_main` runs under run_ranks, and under torchrun,
mpirun and the deepspeed launcher through `tests/support/tp_script.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from support.tolerance import assert_close_to_reference

if TYPE_CHECKING:
    from polar_dist.runtime import Runtime

PROMPT_LENS = (5, 11, 17)  # different lengths; 17 crosses a 16-token block
DECODE_STEPS = 3
VOCAB = 1003  # not a multiple of tp: exercises the padded vocabulary shard

ARCHS: dict[str, dict] = {
    # GQA with 2 KV heads: tp=4 replicates each KV head on two ranks; llama3 RoPE scaling; untied head
    "llama-gqa": dict(model_type="llama", hidden_size=256, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=64)),
    # Llama with every optional bias (attention_bias: q, k, v and o; mlp_bias: gate, up, down)
    "llama-bias": dict(model_type="llama", hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                       attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    # QKV bias, tied embeddings; an intermediate size tp=4 splits unevenly (76, 76, 75, 75)
    "qwen2": dict(model_type="qwen2", hidden_size=256, intermediate_size=302, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                   rope_theta=10000.0)),
    # Mistral: GQA, sliding window (longer than the test's max_seq_len)
    "mistral": dict(model_type="mistral", hidden_size=256, intermediate_size=320, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                    sliding_window=128, tie_word_embeddings=False,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    # LayerNorm, learned positions, ReLU MLP, biases
    "opt": dict(model_type="opt", hidden_size=256, ffn_dim=701, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, do_layer_norm_before=True, word_embed_proj_dim=256),
}


# Head dims between powers of two, which the decode kernel runs as a main and a tail tile (64 + 32)
# (GPU tests only: on the CPU the torch backend takes any head dim). OPT-2.7B's head dim is 80.
ODD_HEAD_DIM_ARCHS: dict[str, dict] = {
    "opt-d80": dict(model_type="opt", hidden_size=320, ffn_dim=640, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, do_layer_norm_before=True, word_embed_proj_dim=320),
    "llama-d96": dict(model_type="llama", hidden_size=256, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=96, max_position_embeddings=256,
                      tie_word_embeddings=False),
}


def save_tiny_model(arch: str, directory: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """A random HF model of `arch`, every parameter perturbed (biases and norms too), saved
    (as several safetensors files plus an index when max_shard_size is given)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(ARCHS[arch] if arch in ARCHS else ODD_HEAD_DIM_ARCHS[arch])
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(directory), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return directory


# ChatML, as SmolLM2 and Qwen write it
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_chat_tokenizer(directory: Path) -> Path:
    """A Hugging Face tokenizer with a chat template for a tiny model's directory: byte-level (ids
    0-255 are the bytes, no merges) plus <|im_end|> (256) and <|im_start|> (257), so that with
    `model.tokenizer: auto` a tiny model serves /v1/chat/completions. (The model's EOS stays the one
    its config.json names.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(directory))
    return directory


def sequences(seed: int = 1) -> list[list[int]]:
    """The test sequences: prompts of PROMPT_LENS tokens, each followed by DECODE_STEPS more."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n + DECODE_STEPS,), generator=gen).tolist() for n in PROMPT_LENS]


def reference_logits(model_dir: Path, dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor]:
    """Per sequence, (DECODE_STEPS + 1, V) float64 logits at the positions ours produces."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    out = []
    with torch.no_grad():
        for seq, n in zip(sequences(), PROMPT_LENS):
            logits = model(torch.tensor([seq], device=device)).logits[0].double().cpu()  # (L, V)
            out.append(logits[n - 1:n + DECODE_STEPS])
    return out


def model_section(source: Path) -> dict:
    """The config `model` section for a HF directory, or the one of a run-config YAML."""
    if source.suffix == ".yaml":
        import yaml

        return dict(yaml.safe_load(source.read_text())["model"])
    return {"path": str(source), "tokenizer": "bytes"}


def runtime_logits(model_dir: Path, dtype: str, device: str = "cpu", backend: str = "auto",
                   cuda_graphs: bool = True) -> list[torch.Tensor] | None:
    """Ours: prefill then teacher-forced decode. Returns the logits on rank 0, None elsewhere.
    `model_dir` is a HF directory or a run-config YAML (e.g. a random-weight shape config)."""
    from polar_dist.config import config_from_dict
    from polar_dist.engine.sampling import SamplingParams
    from polar_dist.parallel.context import init_parallel
    from polar_dist.runtime import LocalSteps, build_runtime

    cfg = config_from_dict({
        "model": {**model_section(model_dir), "dtype": dtype, "device": device},
        "parallel": {"timeout_s": 60, "backend": backend},
        "engine": {"block_size": 16, "max_batch_size": 4, "max_seq_len": 64, "cuda_graphs": cuda_graphs},
    })
    ctx = init_parallel(cfg.parallel, cfg.model.device)
    rt = build_runtime(cfg, ctx)
    # Every rank plans the same steps from the same inputs, so no messages are needed.
    steps = LocalSteps(rt)
    seqs = [steps.scheduler.add(s[:n], SamplingParams(max_new_tokens=DECODE_STEPS + 1, ignore_eos=True), seed=0)
            for s, n in zip(sequences(), PROMPT_LENS)]
    collected: list[list[torch.Tensor]] = [[] for _ in seqs]
    for i in range(DECODE_STEPS + 1):
        step = steps.next()
        assert step is not None
        logits = rt.runner.logits(step)
        for seq_id, row in zip(step.sample_ids, logits):
            collected[seq_id].append(row.double().cpu())
        if i == DECODE_STEPS:
            break
        # feed each sequence its own next token
        teacher = [sequences()[j][PROMPT_LENS[j] + i] for j in step.sample_ids]
        steps.feed(step, teacher)
    ctx.shutdown()
    # The runtime's KV cache takes most of a GPU: hand it back, or a test that starts another
    # process on this GPU next finds it in use.
    del rt, steps
    release_device_memory()
    return [torch.stack(rows) for rows in collected] if ctx.rank == 0 else None


def release_device_memory() -> None:
    """Free what dead runtimes left in PyTorch's CUDA caching allocator (no-op on CPU)."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prefill_logits(rt: "Runtime", prompt_ids: list[int]) -> torch.Tensor:
    """(1, V) logits of the prompt's last token from one prefill step (every rank calls it)."""
    from polar_dist.engine.sampling import SamplingParams
    from polar_dist.runtime import LocalSteps

    steps = LocalSteps(rt)
    steps.scheduler.add(prompt_ids, SamplingParams(max_new_tokens=1), seed=0)
    step = steps.next()
    assert step is not None
    return rt.runner.logits(step)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_against_hf(model_dir: Path, ours: list[torch.Tensor], dtype: str, device: str = "cpu",
                     ulps: float = 1) -> None:
    """Ours (per sequence, float64 logits computed in `dtype`) against transformers in float64,
    by the tolerance rule with transformers in `dtype` as the same-dtype reference. On CPU the
    default 1 ulp holds with room to spare (fp32 and bf16, tp 1, 2 and 4)."""
    ref64 = reference_logits(model_dir, torch.float64, device)
    hf_same = reference_logits(model_dir, DTYPES[dtype], device)
    assert [a.shape for a in ours] == [b.shape for b in ref64]  # every position: prefill + each decode step
    assert_close_to_reference(ours, ref64, hf_same, dtype=DTYPES[dtype], ulps=ulps, what=f"{model_dir.name} {dtype}")


def rank_main(rank: int, world_size: int, model_dir: str, out_file: str, dtype: str, device: str = "cpu",
              backend: str = "auto") -> None:
    """One rank of the logits check (rank and world size come from the environment); rank 0
    saves the logits to `out_file` with torch.save."""
    logits = runtime_logits(Path(model_dir), dtype, device, backend)
    if logits is not None:
        torch.save(logits, out_file)

