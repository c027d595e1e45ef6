"""Config loading: typed, strict, with errors that name the field, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from polar_dist.config import load_config
from polar_dist.model_spec import spec_from_hf_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.path or cfg.model.architecture
    if cfg.model.architecture:  # shape-only configs: the model shape must parse and shard
        spec = spec_from_hf_config(cfg.model.architecture)
        for tp in (1, 2, 4, 8):
            spec.check_tp(tp)


def test_overrides_replace_existing_fields(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs/smollm2-135m.yaml", ["model.dtype=bfloat16", "engine.block_size=32"])
    assert cfg.model.dtype == "bfloat16" and cfg.engine.block_size == 32


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {path: x, colour: red}", "unknown key(s) ['colour']"),
        ("modle: {path: x}", "unknown key(s) ['modle']"),
        ("model: {path: x, dtype: float64}", "model.dtype = 'float64' is not one of"),
        ("model: {path: x}\nengine: {block_size: 12}", "engine.block_size = 12 must be a power of two"),
        ("model: {path: x}\nengine: {block_size: 8}", "engine.block_size = 8 must be a power of two >= 16"),
        ("model: {path: x}\nengine: {max_batch_size: two}", "engine.max_batch_size = 'two' must be of type int"),
        ("model: {path: x}\nsparsity: {head_density: 1.5}", "sparsity.head_density = 1.5 must be in (0, 1]"),
        ("model: {path: x, device: cpu, dtype: float16}", "float16 on model.device = cpu"),
        ("model: {path: 'embedded:gpt5'}", "is not an embedded model"),
        ("parallel: {tp: 2}", "missing required section(s) ['model']"),
        ("model: {path: x}\nparallel: {timeout_s: .nan}", "parallel.timeout_s = nan must be a finite number"),
        ("model: {path: x}\nparallel: {timeout_s: .inf}", "parallel.timeout_s = inf must be a finite number"),
        ("model: {path: x}\nsparsity: {mlp_density: -.inf}", "sparsity.mlp_density = -inf must be a finite number"),
        ("model: {path: x}\nparallel: {timeout_s: soon}", "parallel.timeout_s = 'soon' must be a number"),
        ("model: {path: x}\nengine:\n  block_size: 16\n  block_size: 32",
         "line 4: duplicate key 'block_size' (first given on line 3)"),
        ("model: {path: x}\nmodel: {path: y}", "line 2: duplicate key 'model' (first given on line 1)"),
        ("model: {path: x\nengine: {}", "run.yaml: line 2, column 7: invalid YAML: expected ',' or '}'"),
        ("model:\n\tpath: x", "run.yaml: line 2, column 1: invalid YAML: found character '\\t'"),
    ],
)
def test_bad_config_names_field_and_value(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)


def test_float_fields_read_exponents_without_a_dot(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-9 as a string; float fields take it as the number it spells
    cfg = load_config(write(tmp_path, "model: {path: x}\nsparsity: {head_density: 1e-9}\nparallel: {timeout_s: 3e2}"))
    assert cfg.sparsity.head_density == 1e-9 and cfg.parallel.timeout_s == 300.0
    assert load_config(ROOT / "configs/smollm2-135m.yaml", ["parallel.timeout_s=5e1"]).parallel.timeout_s == 50.0


def test_config_path_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a directory, not a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"model: {path: \xff}")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_config(tmp_path / "binary.yaml")


def test_syntax_error_is_one_short_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        load_config(write(tmp_path, "model:\n  path: x\n  dtype: [float32\n"))
    message = str(e.value)
    assert "\n" not in message and len(message) < 200 and message.startswith(f"{tmp_path / 'run.yaml'}: line ")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.colour=red", "model has no field 'colour'"),
        ("gpu.count=2", "unknown section 'gpu'"),
        ("dtype=float32", "expected section.field=value"),
        ("model.dtype=float8", "model.dtype = 'float8' is not one of"),
        ("parallel.timeout_s=nan", "parallel.timeout_s = nan must be a finite number"),
        ("model.path=[", "--set 'model.path=[': line 1, column 2: invalid YAML"),
    ],
)
def test_bad_override(override: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        load_config(ROOT / "configs/smollm2-135m.yaml", [override])
    assert message in str(e.value)


def test_impossible_tp_names_heads_and_options() -> None:
    spec = spec_from_hf_config(dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4))
    with pytest.raises(ValueError, match=r"parallel.tp = 3 does not divide num_heads \(8\).*tp = \[1, 2, 4, 8\]"):
        spec.check_tp(3)
    spec.check_tp(8)  # KV heads replicated: 4 KV heads on 8 ranks
    spec6 = spec_from_hf_config(dict(model_type="llama", vocab_size=100, hidden_size=96, intermediate_size=128,
                                     num_hidden_layers=1, num_attention_heads=12, num_key_value_heads=4))
    with pytest.raises(ValueError, match="neither divides num_kv_heads"):
        spec6.check_tp(6)


def test_heads_must_group_evenly() -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads \(6\) must be a multiple of num_key_value_heads \(4\)"):
        spec_from_hf_config(dict(model_type="llama", vocab_size=100, hidden_size=96, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=4))


def test_unsupported_model_type() -> None:
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        spec_from_hf_config({"model_type": "gpt2"})
