"""Weight loading: sharded checkpoints with an index, and random weights that are the same
model at every tp size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polar_dist.config import config_from_dict
from polar_dist.parallel.context import init_parallel
from polar_dist.runtime import build_runtime
from support.ranks import run_ranks
from support.tiny_models import check_against_hf, prefill_logits, rank_main, runtime_logits, save_tiny_model


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    model_dir = save_tiny_model("qwen2", tmp_path / "model", max_shard_size="300KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("*.safetensors"))) > 2
    out = tmp_path / "logits.pt"
    run_ranks(rank_main, 2, str(model_dir), str(out), "float32")
    check_against_hf(model_dir, torch.load(out), "float32")


def random_logits(rank: int, world_size: int, out: str) -> None:
    arch = {"model_type": "llama", "vocab_size": 500, "hidden_size": 128, "intermediate_size": 200,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "max_position_embeddings": 128}
    cfg = config_from_dict({"model": {"init": "random", "seed": 3, "architecture": arch, "tokenizer": "bytes",
                                      "device": "cpu"}, "engine": {"max_seq_len": 64}})
    ctx = init_parallel(cfg.parallel, cfg.model.device)
    if world_size == 1:
        import torch.distributed as dist

        assert not dist.is_initialized(), "tp=1 must not touch torch.distributed"
    rt = build_runtime(cfg, ctx)
    logits = prefill_logits(rt, list(range(3, 20)))
    ctx.shutdown()
    if ctx.rank == 0:
        torch.save(logits, out)


@pytest.mark.parametrize("tp", [2, 4])
def test_random_weights_are_the_same_model_at_every_tp(tp: int, tmp_path: Path) -> None:
    random_logits(0, 1, str(tmp_path / "tp1.pt"))
    run_ranks(random_logits, tp, str(tmp_path / "tpn.pt"))
    one, many = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tpn.pt")
    assert one.abs().max() > 0
    torch.testing.assert_close(many, one, rtol=0, atol=1e-5)  # float32 sums in another order


def test_checkpoint_tensors_the_config_does_not_declare_stop_loading(tmp_path: Path) -> None:
    import json

    model_dir = save_tiny_model("llama-bias", tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["attention_bias"] = False  # the checkpoint still holds q/k/v/o biases
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"self_attn\.o_proj\.bias.*not used by this model"):
        runtime_logits(model_dir, "float32")
