"""Router artifacts: a directory of calibrated routers, checked before use.

    <dir>/routers.safetensors   full (unsharded) router weights:
                                  layers.{i}.head.weight (G, d), layers.{i}.head.bias (G,)
                                  layers.{i}.neuron.fc1.weight (R, d), layers.{i}.neuron.fc2.weight (N, R)
    <dir>/metadata.json         format_version, files (sha256 and size of routers.safetensors),
                                then the fields of `ArtifactMeta`

G is the number of KV groups (num_kv_heads), N the MLP width, R the neuron-router rank. A head
router may be absent only in a layer whose head k is G (dense, e.g. layer 0); neuron routers
are present in every layer exactly when the metadata has a neuron k table.

`load_artifact` refuses, with a `UserError` naming the file, the field, expected vs found and
the fix, an artifact with a missing file, a checksum or size that does not match (changed or
truncated), another model's identity or dims, an unknown format version, or metadata with
unknown or missing keys. Nothing is pickled: safetensors and JSON only. `save_artifact` runs
the same checks before writing, so what it writes loads.

    save_artifact(out_dir, weights, meta)
    weights, meta = load_artifact(out_dir, expect=ModelIdentity(model_type="llama", ...))
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from polar_dist.errors import UserError

FORMAT_VERSION = 1
WEIGHTS_FILE = "routers.safetensors"
METADATA_FILE = "metadata.json"
_FIX = "recalibrate with `launch/calibrate.py`, or point sparsity.routers at the directory made for this model"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RoutingScope(Enum):
    """Which groups a sequence picks from under tensor parallelism (DESIGN.md section 4)."""

    LOCAL = "local"  # top-k of each rank's own groups (the paper)
    GLOBAL = "global"  # top-k over all groups, by the replicated router (ours)


@dataclass(frozen=True, kw_only=True)
class ModelIdentity:
    """What a router artifact was calibrated for; all counts are model totals."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # = the number of head-router groups G
    intermediate_size: int
    vocab_size: int
    weights_fingerprint: str | None = None  # compared only when both sides have one


@dataclass(frozen=True, kw_only=True)
class TextFile:
    name: str
    sha256: str
    num_bytes: int

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], name: str | None = None) -> TextFile:
        """The record of a text file; `name` defaults to the file name."""
        path = Path(path)
        return cls(name=name or path.name, sha256=sha256_file(path), num_bytes=path.stat().st_size)


@dataclass(frozen=True, kw_only=True)
class NeuronKTable:
    """k[layer][j] = neurons computed for a batch of at most buckets[j] sequences.

    k counts neurons of the whole model, not of one rank: under tensor parallelism a rank
    selects density_to_k(k / intermediate_size, N_local) of its own neurons (the authors' code
    used the total k on every shard, computing about tp times too many).
    """

    buckets: tuple[int, ...]  # batch sizes, strictly increasing
    k: tuple[tuple[int, ...], ...]  # (num_layers, len(buckets))


@dataclass(frozen=True, kw_only=True)
class LayerMetrics:
    """Held-out router quality of one layer; None where the layer has no such router."""

    head_recall: float | None
    head_precision: float | None
    neuron_recall: float | None
    neuron_precision: float | None
    # Held-out recall of the true top-(head_label_k) groups within the router's top-k, for
    # k = 1..G: what a per-layer allocation of a density budget reads (any budget, no recalibration).
    head_recall_at_k: tuple[float, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class CreationInfo:
    created_at: str  # ISO 8601, UTC
    created_by: str  # the command line that made the artifact
    polar_dist_version: str
    torch_version: str


@dataclass(frozen=True, kw_only=True)
class ArtifactMeta:
    model: ModelIdentity
    routing_scope: RoutingScope  # the default; a run's config may choose the other
    head_density: float  # the density asked for (uniform, or the mean-density budget)
    # Per layer, groups per sequence over all G (the global scope); G means dense. The local
    # scope takes density_to_k(k / G, G_local) of each rank's own groups.
    head_k: tuple[int, ...]
    head_label_k: int  # groups labelled active per token when the head routers were trained
    neuron_k: NeuronKTable | None  # None: the MLP stays dense (non-ReLU models)
    layer_metrics: tuple[LayerMetrics, ...]  # per layer
    train_texts: tuple[TextFile, ...]
    heldout_texts: tuple[TextFile, ...]
    created: CreationInfo

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: enums as their values, tuples as lists."""
        return _to_json(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ArtifactMeta:
        """The inverse of to_json; a UserError on an unknown or missing key or a wrongly typed value."""
        return _from_json(cls, obj, "")


def head_weight_names(layer: int) -> tuple[str, str]:
    """(weight, bias) names of layer `layer`'s head router in routers.safetensors."""
    return f"layers.{layer}.head.weight", f"layers.{layer}.head.bias"


def neuron_weight_names(layer: int) -> tuple[str, str]:
    """(fc1, fc2) weight names of layer `layer`'s neuron router in routers.safetensors."""
    return f"layers.{layer}.neuron.fc1.weight", f"layers.{layer}.neuron.fc2.weight"


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_artifact(directory: str | os.PathLike[str], weights: Mapping[str, torch.Tensor], meta: ArtifactMeta) -> None:
    """Write routers.safetensors and metadata.json into `directory` (created if needed).

    Each file is written under a temporary name and renamed, metadata last: an interrupted
    save leaves no metadata.json that vouches for a partial weights file.
    """
    directory = Path(directory)
    where = f"router artifact {directory} (being saved)"
    _check_meta(meta, where)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in weights.items()}
    _check_weights(tensors, meta, where)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS_FILE
    _write_atomically(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    document = {
        "format_version": FORMAT_VERSION,
        "files": {WEIGHTS_FILE: {"sha256": sha256_file(weights_path), "num_bytes": weights_path.stat().st_size}},
        **meta.to_json(),
    }
    text = _format_json(document) + "\n"
    _write_atomically(directory / METADATA_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_artifact(
    directory: str | os.PathLike[str], expect: ModelIdentity,
) -> tuple[dict[str, torch.Tensor], ArtifactMeta]:
    """Read and check a router artifact made for the model `expect`: (weights on CPU, metadata)."""
    directory = Path(directory)
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        what = "does not exist" if not directory.exists() else f"has no {METADATA_FILE}"
        raise UserError(f"router artifact directory {directory} {what}; {_FIX}")
    try:
        document = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path} is not valid JSON (truncated or edited?): {e}; {_FIX}") from None
    if not isinstance(document, dict):
        raise UserError(f"{meta_path}: expected a JSON object, found {type(document).__name__}; {_FIX}")

    version = document.pop("format_version", None)
    if version != FORMAT_VERSION:
        found = "no format_version" if version is None else f"format_version {version!r}"
        raise UserError(f"{meta_path}: {found}, but this polar_dist reads format_version {FORMAT_VERSION}; {_FIX}")
    _check_files(directory, document.pop("files", None), meta_path)
    meta = _from_json(ArtifactMeta, document, "", source=meta_path)
    _check_meta(meta, str(meta_path))
    _check_identity(meta.model, expect, meta_path)

    weights_path = directory / WEIGHTS_FILE
    try:
        weights = load_file(weights_path)
    except SafetensorError as e:  # checksum matched, so the writer itself produced a bad file
        raise UserError(f"{weights_path} is not a readable safetensors file ({e}); {_FIX}") from None
    _check_weights(weights, meta, str(weights_path))
    return weights, meta


# ---- checks -------------------------------------------------------------------------------


def _check_files(directory: Path, files: Any, meta_path: Path) -> None:
    if not isinstance(files, dict) or set(files) != {WEIGHTS_FILE}:
        found = sorted(files) if isinstance(files, dict) else files
        raise UserError(f"{meta_path}: field files must list exactly [{WEIGHTS_FILE!r}], found {found!r}; {_FIX}")
    for name, record in files.items():
        if (not isinstance(record, dict) or set(record) != {"sha256", "num_bytes"}
                or not isinstance(record["sha256"], str) or not isinstance(record["num_bytes"], int)):
            raise UserError(f"{meta_path}: files.{name} must be {{'sha256': str, 'num_bytes': int}}, "
                            f"found {record!r}; {_FIX}")
        path = directory / name
        if not path.is_file():
            raise UserError(f"router artifact file {path} is missing (listed in {meta_path.name}); {_FIX}")
        size = path.stat().st_size
        if size != record["num_bytes"]:
            raise UserError(f"{path} is {size} bytes but {meta_path.name} records {record['num_bytes']}: "
                            f"the file was truncated or replaced; {_FIX}")
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise UserError(f"{path} has sha256 {digest} but {meta_path.name} records {record['sha256']}: "
                            f"the file was changed after calibration; {_FIX}")


def _check_identity(found: ModelIdentity, expect: ModelIdentity, meta_path: Path) -> None:
    for f in fields(ModelIdentity):
        a, b = getattr(found, f.name), getattr(expect, f.name)
        if f.name == "weights_fingerprint" and (a is None or b is None):
            continue
        if a != b:
            raise UserError(f"{meta_path}: model.{f.name} is {a!r} but the model being served has {b!r}: "
                            f"these routers were calibrated for another model; {_FIX}")


def _check_meta(meta: ArtifactMeta, where: str) -> None:
    m = meta.model
    num_groups = m.num_kv_heads

    def bad(field: str, found: Any, expected: str) -> UserError:
        return UserError(f"{where}: {field} is {found!r}, expected {expected}; {_FIX}")

    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        if getattr(m, name) < 1:
            raise bad(f"model.{name}", getattr(m, name), ">= 1")
    if m.num_heads % m.num_kv_heads:
        raise bad("model.num_kv_heads", m.num_kv_heads, f"a divisor of num_heads ({m.num_heads})")
    if not 0.0 < meta.head_density <= 1.0:
        raise bad("head_density", meta.head_density, "a value in (0, 1]")
    if len(meta.head_k) != m.num_layers or not all(1 <= k <= num_groups for k in meta.head_k):
        raise bad("head_k", list(meta.head_k), f"{m.num_layers} values in [1, {num_groups}]")
    if not 1 <= meta.head_label_k <= num_groups:
        raise bad("head_label_k", meta.head_label_k, f"a value in [1, {num_groups}]")
    if len(meta.layer_metrics) != m.num_layers:
        raise bad("layer_metrics", f"{len(meta.layer_metrics)} entries", f"{m.num_layers} (one per layer)")
    for i, metrics in enumerate(meta.layer_metrics):
        curve = metrics.head_recall_at_k
        if curve is not None and (len(curve) != num_groups or not all(0.0 <= r <= 1.0 for r in curve)):
            raise bad(f"layer_metrics[{i}].head_recall_at_k", list(curve), f"{num_groups} recalls in [0, 1]")
    table = meta.neuron_k
    if table is not None:
        if not table.buckets or any(b < 1 for b in table.buckets) or list(table.buckets) != sorted(set(table.buckets)):
            raise bad("neuron_k.buckets", list(table.buckets), "positive batch sizes, strictly increasing")
        if len(table.k) != m.num_layers or any(len(row) != len(table.buckets) for row in table.k) or not all(
                1 <= k <= m.intermediate_size for row in table.k for k in row):
            raise bad("neuron_k.k", [list(row) for row in table.k],
                      f"{m.num_layers} rows of {len(table.buckets)} values in [1, {m.intermediate_size}]")
    for kind in ("train_texts", "heldout_texts"):
        for i, text in enumerate(getattr(meta, kind)):
            if not _SHA256.fullmatch(text.sha256):
                raise bad(f"{kind}[{i}].sha256", text.sha256, "64 lowercase hex digits")


def _check_weights(weights: Mapping[str, torch.Tensor], meta: ArtifactMeta, where: str) -> None:
    m = meta.model
    expected: dict[str, tuple[int, ...] | None] = {}  # name -> shape (None: any rank R, checked below)
    ranks: set[int] = set()
    for layer in range(m.num_layers):
        weight, bias = head_weight_names(layer)
        if meta.head_k[layer] < m.num_kv_heads or weight in weights or bias in weights:
            expected[weight], expected[bias] = (m.num_kv_heads, m.hidden_size), (m.num_kv_heads,)
        if meta.neuron_k is not None:
            fc1, fc2 = neuron_weight_names(layer)
            rank = weights[fc1].shape[0] if fc1 in weights and weights[fc1].dim() == 2 else -1
            ranks.add(rank)
            expected[fc1], expected[fc2] = (rank, m.hidden_size), (m.intermediate_size, rank)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UserError(f"{where}: router weights {missing[:4]}{' ...' if len(missing) > 4 else ''} are missing "
                        f"({len(missing)} in all); {_FIX}")
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        why = " (the metadata has no neuron k table)" if meta.neuron_k is None and any(
            ".neuron." in n for n in unknown) else ""
        raise UserError(f"{where}: unexpected router weights {unknown[:4]}{why}; {_FIX}")
    if len(ranks) > 1:
        raise UserError(f"{where}: neuron routers must share one rank R, found fc1 rows {sorted(ranks)}; {_FIX}")
    for name, shape in expected.items():
        t = weights[name]
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise UserError(f"{where}: {name} is {t.dtype} {tuple(t.shape)}, expected a float tensor of shape "
                            f"{shape} for {m.model_type} (hidden_size {m.hidden_size}, num_kv_heads "
                            f"{m.num_kv_heads}, intermediate_size {m.intermediate_size}); {_FIX}")


# ---- strict JSON <-> dataclass ------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


def _from_json(tp: Any, value: Any, where: str, *, source: Path | None = None) -> Any:
    """Build a value of type `tp` from JSON, refusing anything but exactly the declared shape."""
    def fail(expected: str) -> UserError:
        prefix = f"{source}: " if source else "router metadata: "
        return UserError(f"{prefix}field {where or '(top level)'}: expected {expected}, found {value!r:.80}; {_FIX}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _from_json(inner, value, where, source=source)
    if origin is tuple:
        item_type, _ = typing.get_args(tp)  # tuple[X, ...]
        if not isinstance(value, list):
            raise fail("a list")
        return tuple(_from_json(item_type, v, f"{where}[{i}]", source=source) for i, v in enumerate(value))
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"an object ({tp.__name__})")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in fields(tp)]
        unknown, missing = sorted(set(value) - set(names)), [n for n in names if n not in value]
        if unknown or missing:
            prefix = f"{source}: " if source else "router metadata: "
            raise UserError(f"{prefix}{where or 'top level'}: unknown keys {unknown}, missing keys {missing} "
                            f"(this polar_dist reads format_version {FORMAT_VERSION}); {_FIX}")
        dot = f"{where}." if where else ""
        return tp(**{n: _from_json(hints[n], value[n], f"{dot}{n}", source=source) for n in names})
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise fail(f"one of {[e.value for e in tp]}") from None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail("a number")
    if tp in (int, str, bool):
        if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
            return value
        raise fail(tp.__name__)
    raise TypeError(f"_from_json: unsupported field type {tp!r} at {where}")


def _format_json(value: Any, depth: int = 0) -> str:
    """Indented JSON with every list of numbers or strings on one line (a k table stays a table)."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_format_json(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(f"{inner}{_format_json(v, depth + 1)}" for v in value) + f"\n{pad}]"
    return json.dumps(value)


def _write_atomically(path: Path, write: typing.Callable[[str], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)
