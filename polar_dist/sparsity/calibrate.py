"""Calibration: local text -> dense activations -> trained routers -> a router artifact.

    cfg = CalibrationConfig(seg_len=512, max_train_tokens=150_000, head_density=0.67)
    meta = calibrate(rt, ["kjv.txt", "hamlet.txt"], "configs/routers/smollm2-135m", cfg)

1. Text (rank 0, broadcast): the files are tokenized with the model's tokenizer and cut into
   segments of `seg_len` tokens every `stride`; `split_train_heldout` holds out whole chunks of
   segments so that no token is on both sides (or, with `heldout_paths`, those files are the
   held-out text). Each side is capped at its token limit by a seeded random choice of segments.
2. Collection (every rank: the model's collectives need them all): dense prefill over the
   segments; per layer, router inputs and labels go into bounded sample buffers on rank 0
   (`collect.py`).
3. Fitting and writing (rank 0): routers, held-out curves, k tables, the artifact (`fit.py`).
   The other ranks wait for its metadata on a group whose timeout covers training, so every
   rank returns the same `ArtifactMeta`, or raises the same error.

The run's sparsity settings do not matter for collection, which is always dense: build the
runtime with a dense config (launch/calibrate.py does).
"""

from __future__ import annotations

import os
import random
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from polar_dist.engine.cuda_graphs import batch_buckets
from polar_dist.errors import UserError
from polar_dist.log import get_logger
from polar_dist.models.tokenizer import Tokenizer
from polar_dist.parallel.context import ParallelContext
from polar_dist.runtime import Runtime
from polar_dist.sparsity.artifact import ArtifactMeta, CreationInfo, RoutingScope, TextFile, save_artifact
from polar_dist.sparsity.collect import collect
from polar_dist.sparsity.fit import FitConfig, assemble_artifact, fit_routers
from polar_dist.sparsity.selection import density_to_k
from polar_dist.sparsity.text import read_text_files, split_train_heldout, token_segments
from polar_dist.sparsity.training import NEURON_ROUTER_TRAINING, RouterTrainConfig

log = get_logger(__name__)
T = TypeVar("T")

# Head routers: the paper's recipe (5 epochs at lr 1e-4, HEAD_ROUTER_TRAINING) assumes ~400k rows;
# on the 1e4-1e5 rows a bounded buffer holds it stops far from convergence. On SmolLM2-135M
# (12k rows per layer) held-out recall of the true top-2 of 3 groups at k = 2 rose from
# 0.75-0.90 to 0.86-0.92 with lr 1e-3 and up to 40 epochs (early stop keeps the best).
CALIBRATION_HEAD_TRAINING = RouterTrainConfig(epochs=40, batch_size=512, lr=1e-3)
# How long the other ranks wait for rank 0 to read the text, or to train routers and write the artifact.
_TRAINING_WAIT_S = 24 * 3600.0


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    seg_len: int = 512  # tokens per segment (one prefill sequence)
    stride: int | None = None  # segment start spacing; None: seg_len (no overlap)
    heldout_fraction: float = 0.05  # share of the text held out (when no held-out files are given)
    max_train_tokens: int = 200_000  # training tokens run through the model (a random choice of segments)
    max_heldout_tokens: int = 32_768
    buffer_bytes: int = 1 << 30  # all layers' stored rows together, train and held-out
    label_density: float = 0.5  # k_label = density_to_k(label_density, G) groups labelled active per token
    head_density: float = 0.5  # the artifact's head k: a uniform density, or the per_layer mean budget
    head_allocation: Literal["uniform", "per_layer"] = "uniform"
    routing_scope: RoutingScope = RoutingScope.GLOBAL
    head_training: RouterTrainConfig = CALIBRATION_HEAD_TRAINING
    neuron_training: RouterTrainConfig = NEURON_ROUTER_TRAINING
    neuron_buckets: tuple[int, ...] | None = None  # None: the CUDA-graph buckets up to engine.max_batch_size
    target_recall: float = 0.99  # neuron k: the smallest k whose batch-union recall reaches this
    neuron_k_step: int = 1  # neuron k search grid
    seed: int = 0
    created_by: str | None = None  # recorded in the artifact; None: this process's command line
    progress: bool = True  # progress bars on stderr (rank 0)

    def __post_init__(self) -> None:
        if self.seg_len < 2 or (self.stride is not None and self.stride < 1):
            raise UserError(f"segment length ({self.seg_len}) must be >= 2 and stride ({self.stride}) >= 1")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise UserError(f"held-out fraction = {self.heldout_fraction} must be in (0, 1)")
        if self.max_train_tokens < self.seg_len or self.max_heldout_tokens < self.seg_len:
            raise UserError(f"max train tokens ({self.max_train_tokens}) and max held-out tokens "
                            f"({self.max_heldout_tokens}) must each hold one segment of {self.seg_len} tokens")
        for name in ("label_density", "head_density", "target_recall"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise UserError(f"calibration {name} = {getattr(self, name)} must be in (0, 1]")
        if self.neuron_buckets is not None and (not self.neuron_buckets or min(self.neuron_buckets) < 1):
            raise UserError(f"neuron k buckets {self.neuron_buckets} must be positive batch sizes")
        if self.neuron_k_step < 1 or self.buffer_bytes < 1:
            raise UserError(f"neuron k step ({self.neuron_k_step}) and buffer bytes ({self.buffer_bytes}) must be >= 1")

    @property
    def segment_stride(self) -> int:
        return self.stride or self.seg_len


@dataclass(frozen=True)
class CalibrationText:
    train: list[list[int]]  # segments, in text order
    heldout: list[list[int]]
    train_files: tuple[TextFile, ...]
    heldout_files: tuple[TextFile, ...]


def prepare_text(tokenizer: Tokenizer, text_paths: Sequence[str | os.PathLike[str]], cfg: CalibrationConfig,
                 heldout_paths: Sequence[str | os.PathLike[str]] | None = None) -> CalibrationText:
    """Train and held-out segments with no token in common, each capped at its token limit."""
    stride = cfg.segment_stride
    text = read_text_files(text_paths)  # checks that every file exists
    heldout_text = read_text_files(heldout_paths) if heldout_paths else None
    train_files = tuple(TextFile.from_path(p) for p in text_paths)
    segments = token_segments(tokenizer.encode(text), cfg.seg_len, stride)
    if heldout_text is not None:
        heldout_files = tuple(TextFile.from_path(p) for p in heldout_paths)
        shared = {f.sha256 for f in train_files} & {f.sha256 for f in heldout_files}
        if shared:
            names = sorted(f.name for f in heldout_files if f.sha256 in shared)
            raise UserError(f"held-out text {names} is also training text; hold out other files")
        train = segments
        heldout = token_segments(tokenizer.encode(heldout_text), cfg.seg_len, stride)
    else:
        heldout_files = train_files  # held-out chunks of the same files
        train, heldout = split_train_heldout(segments, cfg.heldout_fraction, cfg.seed, stride=stride)
    return CalibrationText(_limit(train, cfg.max_train_tokens, cfg.seed),
                           _limit(heldout, cfg.max_heldout_tokens, cfg.seed + 1), train_files, heldout_files)


def _limit(segments: list[list[int]], max_tokens: int, seed: int) -> list[list[int]]:
    """A seeded random choice of at most max_tokens worth of segments, in text order."""
    count = max_tokens // len(segments[0])
    if len(segments) <= count:
        return segments
    return [segments[i] for i in sorted(random.Random(seed).sample(range(len(segments)), count))]


def calibrate(rt: Runtime, text_paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
              cfg: CalibrationConfig, heldout_paths: Sequence[str | os.PathLike[str]] | None = None) -> ArtifactMeta:
    """Calibrate routers for `rt`'s model on local text and write the artifact to `out_dir`.

    Every rank of the run calls it with the same arguments; all return the artifact's metadata.
    """
    ctx, spec = rt.ctx, rt.spec
    wait_group = ctx.waiting_group(_TRAINING_WAIT_S)  # collective: before anything can fail
    text = _on_driver(ctx, lambda: prepare_text(rt.tokenizer, text_paths, cfg, heldout_paths), wait_group)
    k_label = density_to_k(cfg.label_density, spec.num_kv_heads)
    log.info("calibrating on %d training and %d held-out tokens (segments of %d), %d of %d KV groups labelled",
             sum(map(len, text.train)), sum(map(len, text.heldout)), cfg.seg_len, k_label, spec.num_kv_heads)
    samples = collect(rt, text.train, text.heldout, k_label=k_label, budget_bytes=cfg.buffer_bytes, seed=cfg.seed,
                      progress=cfg.progress)

    def fit_and_write() -> ArtifactMeta:
        assert samples is not None
        log.info("stored %d MB of router samples", sum(s.nbytes for s in samples.values()) >> 20)
        buckets = cfg.neuron_buckets or tuple(batch_buckets(rt.cfg.engine.max_batch_size))
        fit_cfg = FitConfig(head_training=cfg.head_training, neuron_training=cfg.neuron_training,
                            buckets=tuple(sorted(set(buckets))), target_recall=cfg.target_recall,
                            neuron_k_step=cfg.neuron_k_step, seed=cfg.seed)
        fits = fit_routers(samples, k_label, fit_cfg, ctx.device, cfg.progress)
        weights, meta = assemble_artifact(
            spec, fits, k_label=k_label, head_density=cfg.head_density, head_allocation=cfg.head_allocation,
            routing_scope=cfg.routing_scope, buckets=fit_cfg.buckets, train_texts=text.train_files,
            heldout_texts=text.heldout_files, created=_creation_info(cfg.created_by))
        save_artifact(out_dir, weights, meta)
        log.info("wrote router artifact %s", out_dir)
        return meta

    return _on_driver(ctx, fit_and_write, wait_group)


def _on_driver(ctx: ParallelContext, fn: Callable[[], T], group: Any = None) -> T:
    """Run `fn` on rank 0 and give every rank its result; a failure there is raised on every
    rank (a UserError with its message), so no rank is left waiting."""
    if ctx.tp_size == 1:
        return fn()
    if ctx.is_driver:
        try:
            result = fn()
        except Exception as e:
            ctx.broadcast_object((False, isinstance(e, UserError), f"{type(e).__name__}: {e}" if not isinstance(
                e, UserError) else str(e)), group)
            raise
        ctx.broadcast_object((True, result), group)
        return result
    reply = ctx.broadcast_object(None, group)
    if reply[0]:
        return reply[1]
    _, user_error, message = reply
    if user_error:
        raise UserError(message)
    raise RuntimeError(f"rank 0 failed during calibration: {message}")


def _creation_info(created_by: str | None) -> CreationInfo:
    try:
        ours = version("polar-dist")
    except PackageNotFoundError:
        ours = "unknown"
    return CreationInfo(created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        created_by=created_by or shlex.join([Path(sys.executable).name, *sys.argv]),
                        polar_dist_version=ours, torch_version=torch.__version__)
