"""Test set-up that has to happen before any test module is imported, and fixtures shared by modules.

TRITON_INTERPRET must be set before triton is first imported (triton reads it at import),
so it is decided here, at the top of the first module pytest loads: on a machine without
CUDA the Triton kernels run in the interpreter on CPU tensors. `tests/` goes on sys.path so
that test modules import shared code as `support.*` (see tests/support/__init__.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model(arch)`: the directory of the random HF model of `arch` (support.tiny_models.ARCHS),
    saved once per session and shared: tests only read it (copy it to change its files)."""
    from support.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    saved: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in saved:
            saved[arch] = save_tiny_model(arch, root / arch)
        return saved[arch]

    return get


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny llama-gqa with a byte-level Hugging Face tokenizer and a chat template
    (support.tiny_models.save_chat_tokenizer): served with `model.tokenizer: auto`, it answers
    /v1/chat/completions too."""
    import shutil

    from support.tiny_models import save_chat_tokenizer

    directory = tmp_path_factory.mktemp("tiny-chat") / "llama-gqa"
    shutil.copytree(tiny_model("llama-gqa"), directory)
    return save_chat_tokenizer(directory)
