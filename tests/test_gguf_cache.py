"""The GGUF conversion cache: keyed by content, checked on load, rebuilt when damaged, and
POLAR_CACHE_DIR problems named. The conversion itself is replaced by a stand-in that writes
small files (the real one takes tens of seconds); what is tested is the cache around it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from polar_dist import envs
from polar_dist.errors import UserError
from polar_dist.models import gguf_cache
from polar_dist.models.gguf_cache import cached_hf_dir


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Point POLAR_CACHE_DIR at a fresh directory and count the (stand-in) conversions."""
    monkeypatch.setenv(envs.CACHE_DIR.name, str(tmp_path / "cache"))
    done: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        data = gguf_path.read_bytes()
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out_dir / "tokenizer.json").write_text(json.dumps({"model": "bytes"}))
        (out_dir / "model.safetensors").write_bytes(data * 64)
        done.append(gguf_path)

    monkeypatch.setattr(gguf_cache, "_convert", convert)
    return done


def gguf(tmp_path: Path, name: str = "m.gguf", content: bytes = b"GGUF weights") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_converted_once_with_a_manifest(conversions: list[Path], tmp_path: Path) -> None:
    src = gguf(tmp_path)
    entry = cached_hf_dir(src)
    assert cached_hf_dir(src) == entry and len(conversions) == 1
    files = json.loads((entry / "manifest.json").read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in files.values())


def test_key_is_the_content_not_the_path(conversions: list[Path], tmp_path: Path) -> None:
    a = cached_hf_dir(gguf(tmp_path / "checkout-a"))
    b = cached_hf_dir(gguf(tmp_path / "checkout-b"))  # the same file installed elsewhere
    c = cached_hf_dir(gguf(tmp_path / "checkout-c", content=b"other weights"))
    assert a == b != c and len(conversions) == 2


def damage_truncate(entry: Path) -> str:
    with (entry / "model.safetensors").open("r+b") as f:
        f.truncate(10)
    return "model.safetensors has 10 bytes"


def damage_alter(entry: Path) -> str:
    path = entry / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size; the mtime moves, so the hash is checked
    path.write_bytes(bytes(data))
    return "model.safetensors does not match its sha256"


def damage_tokenizer(entry: Path) -> str:
    (entry / "tokenizer.json").unlink()
    return "tokenizer.json is missing"


def damage_manifest(entry: Path) -> str:
    (entry / "manifest.json").unlink()
    return "manifest.json is missing or unreadable"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("damage", [damage_truncate, damage_alter, damage_tokenizer, damage_manifest])
def test_damaged_entry_is_named_and_rebuilt(conversions: list[Path], tmp_path: Path, damage) -> None:
    src = gguf(tmp_path)
    entry = cached_hf_dir(src)
    good = (entry / "model.safetensors").read_bytes()
    message = damage(entry)
    records = Records()  # on the module's logger itself: configure_logging may stop propagation to the root
    gguf_cache.log.addHandler(records)
    try:
        assert cached_hf_dir(src) == entry
    finally:
        gguf_cache.log.removeHandler(records)
    assert len(conversions) == 2
    assert any(f"cache entry {entry} is damaged: {message}" in m for m in records.messages), records.messages
    assert (entry / "model.safetensors").read_bytes() == good
    assert gguf_cache.check_entry(entry) is None


def test_unchanged_files_are_not_hashed_again(conversions: list[Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src = gguf(tmp_path)
    entry = cached_hf_dir(src)
    hashed: list[Path] = []
    real = gguf_cache._sha256
    monkeypatch.setattr(gguf_cache, "_sha256", lambda p: hashed.append(p) or real(p))
    cached_hf_dir(src)
    assert hashed == []  # the GGUF's hash is remembered by (path, size, mtime); the entry's by its verified state
    os.utime(entry / "config.json", ns=(1, 1))
    assert gguf_cache.check_entry(entry) is None and hashed == [entry / "config.json"]


def test_stale_temporaries_are_removed(conversions: list[Path], tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    root = Path(os.environ[envs.CACHE_DIR.name]) / "gguf"
    root.mkdir(parents=True)
    host = gguf_cache.socket.gethostname()
    killed = root / f"m-0123.tmp-{host}-{dead.pid}-abc123"
    running = root / f"m-0123.tmp-{host}-{os.getpid()}-def456"
    old = root / f"m-0123.tmp-other-host-{os.getpid()}-ghi789"
    for d in (killed, running, old):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    hour_ago = time.time() - 2 * gguf_cache.STALE_TEMPORARY_S
    os.utime(old, (hour_ago, hour_ago))
    cached_hf_dir(gguf(tmp_path))
    assert not killed.exists() and not old.exists() and running.exists()


def test_empty_cache_dir_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(envs.CACHE_DIR.name, "")
    assert envs.CACHE_DIR.get() == envs.CACHE_DIR.default
    monkeypatch.setenv(envs.CACHE_DIR.name, "relative/cache")
    assert envs.CACHE_DIR.get() == Path.cwd() / "relative/cache"


def test_unusable_cache_dir_names_the_variable(conversions: list[Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    monkeypatch.setenv(envs.CACHE_DIR.name, str(not_a_dir))
    with pytest.raises(UserError, match=f"cannot write the model cache at {not_a_dir}/gguf .*; set POLAR_CACHE_DIR"):
        cached_hf_dir(gguf(tmp_path))


def test_full_cache_disk_names_the_variable(conversions: list[Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(gguf_path: Path, out_dir: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_cache, "_convert", no_space)
    with pytest.raises(UserError, match="No space left on device.*set POLAR_CACHE_DIR"):
        cached_hf_dir(gguf(tmp_path))
    root = Path(os.environ[envs.CACHE_DIR.name]) / "gguf"
    assert [p.name for p in root.iterdir() if p.is_dir()] == []  # the temporary directory is gone
    shutil.rmtree(root)


def test_every_damaged_file_is_named(conversions: list[Path], tmp_path: Path) -> None:
    entry = cached_hf_dir(gguf(tmp_path))
    damage_truncate(entry)
    damage_tokenizer(entry)
    assert gguf_cache.check_entry(entry) == ("model.safetensors has 10 bytes, its manifest says 768 (truncated or "
                                             "replaced); tokenizer.json is missing")
