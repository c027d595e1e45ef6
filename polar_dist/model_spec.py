"""ModelSpec: the shape of a model, read from a Hugging Face config, family-agnostic.

Names follow the convention: `num_heads`, `num_kv_heads`, `vocab_size` are model totals;
per-rank values (see `polar_dist.parallel.plan.ShardPlan`) end in `_local`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from polar_dist.errors import UserError


class Family(Enum):
    LLAMA = "llama"  # Llama 2/3, Mistral, Qwen2, SmolLM2: RMSNorm, RoPE, SwiGLU, GQA
    OPT = "opt"  # LayerNorm, learned positions, ReLU MLP, biases


_FAMILY_OF_MODEL_TYPE = {
    "llama": Family.LLAMA,
    "mistral": Family.LLAMA,
    "qwen2": Family.LLAMA,
    "opt": Family.OPT,
}


class RopeKind(Enum):
    DEFAULT = "default"
    LINEAR = "linear"  # positions divided by `factor`
    LLAMA3 = "llama3"  # long wavelengths slowed by `factor`, short ones kept, a smooth band between


@dataclass(frozen=True, kw_only=True)
class RopeSpec:
    theta: float
    kind: RopeKind = RopeKind.DEFAULT
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    family: Family
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, OPT, Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias (Qwen2 has no out-projection bias)
    mlp_bias: bool = False  # Llama with mlp_bias: gate, up and down projections
    rope: RopeSpec | None  # None for OPT (learned positions); the MLP is SwiGLU for LLAMA, ReLU for OPT
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def check_tp(self, tp: int) -> None:
        """Raise a UserError naming the fix if `tp` cannot shard this model."""
        if self.num_heads % tp:
            options = [t for t in range(1, self.num_heads + 1) if self.num_heads % t == 0 and t <= 16]
            raise UserError(
                f"parallel.tp = {tp} does not divide num_heads ({self.num_heads}) of this {self.model_type} model; "
                f"use one of tp = {options}"
            )
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            options = [
                t for t in range(1, self.num_heads + 1)
                if self.num_heads % t == 0 and (self.num_kv_heads % t == 0 or t % self.num_kv_heads == 0) and t <= 16
            ]
            raise UserError(
                f"parallel.tp = {tp} neither divides num_kv_heads ({self.num_kv_heads}) nor is a multiple of it "
                f"(needed to replicate KV heads); use one of tp = {options}"
            )


def spec_from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config.json dict."""
    model_type = cfg.get("model_type", "")
    family = _FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise UserError(
            f"model_type {model_type!r} is not supported; supported: {sorted(_FAMILY_OF_MODEL_TYPE)}"
        )
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    if family is Family.OPT:
        return _opt_spec(cfg, eos_ids)
    num_heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    num_kv_heads = cfg.get("num_key_value_heads") or num_heads
    _check_heads(num_heads, num_kv_heads)
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {cfg.get('hidden_act')!r} is not supported for {model_type}; only silu (SwiGLU)")
    return ModelSpec(
        family=family,
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        rope=_rope_spec(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _check_heads(num_heads: Any, num_kv_heads: Any) -> None:
    for name, value in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"model config {name} = {value!r} must be a positive integer")
    if num_heads % num_kv_heads:
        raise UserError(f"model config num_attention_heads ({num_heads}) must be a multiple of "
                        f"num_key_value_heads ({num_kv_heads}): each KV head serves a whole group of query heads")


def _rope_spec(cfg: dict[str, Any]) -> RopeSpec:
    scaling = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}  # transformers 5 folds theta and scaling into this
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    merged = {**params, **scaling}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in {k.value for k in RopeKind}:
        raise UserError(f"rope scaling type {kind!r} is not supported; supported: {[k.value for k in RopeKind]}")
    return RopeSpec(
        theta=float(theta),
        kind=RopeKind(kind),
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position=int(merged.get("original_max_position_embeddings", 8192)),
    )


def _opt_spec(cfg: dict[str, Any], eos_ids: tuple[int, ...]) -> ModelSpec:
    hidden = cfg["hidden_size"]
    if cfg.get("word_embed_proj_dim", hidden) != hidden:
        raise UserError("OPT with word_embed_proj_dim != hidden_size (opt-350m) is not supported")
    if not cfg.get("do_layer_norm_before", True):
        raise UserError("OPT with do_layer_norm_before = False (opt-350m) is not supported")
    if cfg.get("activation_function", "relu") != "relu":
        raise UserError(f"OPT activation {cfg.get('activation_function')!r} is not supported; only relu")
    num_heads = cfg["num_attention_heads"]
    _check_heads(num_heads, num_heads)
    return ModelSpec(
        family=Family.OPT,
        model_type="opt",
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["ffn_dim"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=1e-5,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=bool(cfg.get("enable_bias", True)),
        rope=None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
