"""Every POLAR_* environment variable, declared once with its type, default and meaning.

Library code reads the environment only through this module, and only when a value is
needed (nothing is read at import time). A variable set to the empty string counts as unset
(`POLAR_CACHE_DIR=` must not mean the current directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

from polar_dist.errors import UserError

T = TypeVar("T")


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise UserError(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    name: str
    default: T
    parse: Callable[[str, str], T]
    meaning: str

    def get(self) -> T:
        raw = os.environ.get(self.name, "")
        return self.default if not raw.strip() else self.parse(self.name, raw)


def _parse_choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw not in choices:
            raise UserError(f"{name}={raw!r} is not one of {', '.join(choices)}")
        return raw

    return parse


def _parse_path(name: str, raw: str) -> Path:
    return Path(raw).expanduser().absolute()  # every rank the same directory, whatever its working directory


CACHE_DIR: EnvVar[Path] = EnvVar(
    "POLAR_CACHE_DIR",
    Path("~/.cache/polar_dist").expanduser(),
    _parse_path,
    "where converted checkpoints (GGUF -> safetensors) are cached",
)
KERNEL_BACKEND: EnvVar[str] = EnvVar(
    "POLAR_KERNEL_BACKEND",
    "auto",
    _parse_choice("auto", "triton", "torch"),
    "kernel backend, chosen once per model: auto (Triton for fp16/bf16 on CUDA, torch references otherwise), "
    "triton or torch",
)
PDL: EnvVar[bool] = EnvVar(
    "POLAR_PDL", True, parse_bool,
    "launch the decode step's small Triton kernels with programmatic dependent launch where the GPU (compute "
    "capability >= 9) and Triton support it; 0 turns it off (kernels/pdl.py)",
)
BLAS_CHOICE: EnvVar[bool] = EnvVar(
    "POLAR_BLAS_CHOICE", True, parse_bool,
    "run each dense linear of a decode-sized batch through cuBLAS or cuBLASLt, whichever the GPU measures faster "
    "for its shape at first use (kernels/blas_choice.py); 0 leaves every linear to torch's default library",
)
PLAN_LONGEST_FIRST: EnvVar[bool] = EnvVar(
    "POLAR_PLAN_LONGEST_FIRST", True, parse_bool,
    "start the attention launch with the sequences whose pieces are longest (kernels/attention_plan.py); 0 lists "
    "them in batch order",
)
LOG_ALL_RANKS: EnvVar[bool] = EnvVar(
    "POLAR_LOG_ALL_RANKS", False, parse_bool, "log from every rank, not rank 0 only"
)
API_KEY: EnvVar[str] = EnvVar(
    "POLAR_API_KEY", "", lambda name, raw: raw,
    "the server's API key when server.api_key is empty (keeps it out of files and command lines)",
)
INJECT_FAULT: EnvVar[str] = EnvVar(
    "POLAR_INJECT_FAULT", "", lambda name, raw: raw.strip(),
    "tests only: fail the steps of requests whose prompt holds a token-id run (polar_dist/engine/faults.py)",
)
