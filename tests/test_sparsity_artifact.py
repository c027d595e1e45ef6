"""Router artifacts: round trip, and each way an artifact can be wrong gives a UserError that
names the file or field, what was expected and found, and the fix."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from polar_dist.errors import UserError
from polar_dist.sparsity.artifact import (
    METADATA_FILE,
    WEIGHTS_FILE,
    ArtifactMeta,
    CreationInfo,
    LayerMetrics,
    ModelIdentity,
    NeuronKTable,
    RoutingScope,
    TextFile,
    head_weight_names,
    load_artifact,
    neuron_weight_names,
    save_artifact,
)

MODEL = ModelIdentity(model_type="opt", hidden_size=8, num_layers=2, num_heads=4, num_kv_heads=4,
                      intermediate_size=16, vocab_size=50, weights_fingerprint="abc123")
_FIX = "launch/calibrate.py"


def _meta(**overrides) -> ArtifactMeta:  # noqa: ANN003
    fields = dict(
        model=MODEL,
        routing_scope=RoutingScope.GLOBAL,
        head_density=0.5,
        head_k=(4, 2),  # layer 0 dense: no head router needed there
        head_label_k=2,
        neuron_k=NeuronKTable(buckets=(1, 8), k=((4, 8), (6, 12))),
        layer_metrics=(LayerMetrics(head_recall=None, head_precision=None, neuron_recall=0.99, neuron_precision=0.5),
                       LayerMetrics(head_recall=0.9, head_precision=0.9, neuron_recall=0.98, neuron_precision=0.4,
                                    head_recall_at_k=(0.5, 0.9, 0.95, 1.0))),
        train_texts=(TextFile(name="kjv.txt", sha256="a" * 64, num_bytes=10),),
        heldout_texts=(TextFile(name="heldout.txt", sha256="b" * 64, num_bytes=3),),
        created=CreationInfo(created_at="2026-11-25T06:00:00Z", created_by="python launch/calibrate.py",
                             polar_dist_version="0.1.0", torch_version=torch.__version__),
    )
    fields.update(overrides)
    return ArtifactMeta(**fields)


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weights = {}
    weight, bias = head_weight_names(1)
    weights[weight], weights[bias] = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    for layer in range(2):
        fc1, fc2 = neuron_weight_names(layer)
        weights[fc1] = torch.randn(3, 8, generator=g).bfloat16()
        weights[fc2] = torch.randn(16, 3, generator=g).bfloat16()
    return weights


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    save_artifact(tmp_path / "routers", _weights(), _meta())
    return tmp_path / "routers"


def _fails(directory: Path, *fragments: str, expect: ModelIdentity = MODEL) -> str:
    with pytest.raises(UserError) as info:
        load_artifact(directory, expect)
    message = str(info.value)
    for fragment in (*fragments, _FIX):
        assert fragment in message, message
    return message


def test_round_trip(artifact: Path) -> None:
    weights, meta = load_artifact(artifact, MODEL)
    assert meta == _meta()
    expected = _weights()
    assert set(weights) == set(expected)
    for name, t in expected.items():
        assert weights[name].dtype == t.dtype and torch.equal(weights[name], t)
    document = json.loads((artifact / METADATA_FILE).read_text())
    assert document["routing_scope"] == "global" and document["format_version"] == 1
    assert set(document["files"]) == {WEIGHTS_FILE}


def test_no_neuron_table_and_no_fingerprint(tmp_path: Path) -> None:
    weights = {n: t for n, t in _weights().items() if ".neuron." not in n}
    meta = _meta(neuron_k=None, model=dataclasses.replace(MODEL, weights_fingerprint=None))
    save_artifact(tmp_path, weights, meta)
    loaded, loaded_meta = load_artifact(tmp_path, MODEL)  # a fingerprint on one side only is not compared
    assert loaded_meta.neuron_k is None and set(loaded) == set(weights)


def test_missing_files(artifact: Path, tmp_path: Path) -> None:
    _fails(tmp_path / "nowhere", "does not exist")
    (artifact / WEIGHTS_FILE).unlink()
    _fails(artifact, WEIGHTS_FILE, "missing")
    (artifact / METADATA_FILE).unlink()
    _fails(artifact, f"has no {METADATA_FILE}")


def test_flipped_byte_fails_checksum(artifact: Path) -> None:
    path = artifact / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data: still a valid safetensors file
    path.write_bytes(bytes(data))
    _fails(artifact, WEIGHTS_FILE, "sha256", "changed after calibration")


def test_truncated_weights(artifact: Path) -> None:
    path = artifact / WEIGHTS_FILE
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    _fails(artifact, WEIGHTS_FILE, f"is {size // 2} bytes", f"records {size}", "truncated")


def test_truncated_metadata(artifact: Path) -> None:
    path = artifact / METADATA_FILE
    path.write_text(path.read_text()[:100])
    _fails(artifact, METADATA_FILE, "not valid JSON")


@pytest.mark.parametrize(("field", "value"), [("hidden_size", 16), ("num_kv_heads", 2), ("intermediate_size", 32),
                                              ("num_layers", 3), ("model_type", "llama"),
                                              ("weights_fingerprint", "other")])
def test_other_model_is_refused(artifact: Path, field: str, value: object) -> None:
    found = getattr(MODEL, field)
    _fails(artifact, f"model.{field} is {found!r}", f"has {value!r}",
           expect=dataclasses.replace(MODEL, **{field: value}))


def _edit_metadata(artifact: Path, edit) -> None:  # noqa: ANN001
    path = artifact / METADATA_FILE
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def test_unknown_and_missing_keys(artifact: Path) -> None:
    _edit_metadata(artifact, lambda d: d.update(head_sparsity=0.5))
    _fails(artifact, "unknown keys ['head_sparsity']", "missing keys []")
    _edit_metadata(artifact, lambda d: d.pop("head_sparsity"))
    _edit_metadata(artifact, lambda d: d["model"].pop("vocab_size"))
    _fails(artifact, "model: unknown keys []", "missing keys ['vocab_size']")


def test_wrong_types_and_values(artifact: Path) -> None:
    _edit_metadata(artifact, lambda d: d.update(head_k=[4, "2"]))
    _fails(artifact, "field head_k[1]", "expected int", "'2'")
    _edit_metadata(artifact, lambda d: d.update(head_k=[4, 2], routing_scope="everywhere"))
    _fails(artifact, "field routing_scope", "one of ['local', 'global']")
    _edit_metadata(artifact, lambda d: d.update(routing_scope="local", head_k=[4, 5]))
    _fails(artifact, "head_k is [4, 5]", "values in [1, 4]")


def test_unknown_format_version(artifact: Path) -> None:
    _edit_metadata(artifact, lambda d: d.update(format_version=2))
    _fails(artifact, "format_version 2", "reads format_version 1")


def test_save_refuses_inconsistent_weights(tmp_path: Path) -> None:
    weights = _weights()
    weights[head_weight_names(1)[0]] = torch.zeros(4, 9)
    with pytest.raises(UserError, match=r"layers\.1\.head\.weight is torch.float32 \(4, 9\), expected .*\(4, 8\)"):
        save_artifact(tmp_path, weights, _meta())
    weights = _weights()
    del weights[head_weight_names(1)[1]]  # layer 1 is sparse (k 2 < 4): its router is required
    with pytest.raises(UserError, match=r"layers\.1\.head\.bias.*missing"):
        save_artifact(tmp_path, weights, _meta())
    with pytest.raises(UserError, match="no neuron k table"):
        save_artifact(tmp_path, _weights(), _meta(neuron_k=None))
    assert not (tmp_path / METADATA_FILE).exists()


def test_text_file_record(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("abc")
    record = TextFile.from_path(path)
    assert record == TextFile(name="t.txt", sha256="ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                              num_bytes=3)
    assert ArtifactMeta.from_json(_meta(train_texts=(record,)).to_json()).train_texts == (record,)
