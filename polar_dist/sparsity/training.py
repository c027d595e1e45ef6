"""Training one router on collected (x, labels) rows.

The recipe is the paper's: AdamW (lr 1e-4, weight decay 0.01), multi-label binary
cross-entropy with negatives down-weighted, a held-out split, the best epoch kept. Head
routers train for 5 epochs at batch 512 and are judged by top-k recall; neuron routers train
for up to 20 epochs at batch 64 and are judged by F1 at probability 0.5.

Training runs on a float32 copy of the router, on the device of `x`; the best epoch's weights
are copied back into the router passed in (in its own dtype). Given the same router weights,
data and config, the result is the same: the split and the batch order come from `cfg.seed`.

    metrics = train_router(HeadRouter(576, 3), x, y, HEAD_ROUTER_TRAINING, RouterSelect.TOPK, k=2)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from polar_dist.errors import UserError

# Added to the negatives' weight so that they still count when positives are very rare.
_NEGATIVE_WEIGHT_FLOOR = 0.005
# Rows per forward pass when scoring the held-out split (bounds memory for wide neuron routers).
_EVAL_CHUNK_ROWS = 4096


class RouterSelect(Enum):
    """How a router's scores become a selection, and so how it is judged."""

    TOPK = "topk"  # heads: the k best groups per token; judged by recall of the true top-k
    THRESHOLD = "threshold"  # neurons: probability > 0.5 per neuron; judged by F1


@dataclass(frozen=True, kw_only=True)
class RouterTrainConfig:
    epochs: int
    batch_size: int
    lr: float = 1e-4
    weight_decay: float = 0.01
    holdout_fraction: float = 0.05  # the authors' 95/5 split
    seed: int = 0
    early_stop_patience: int | None = 5  # stop after this many epochs without a better holdout score

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError(f"router training epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise UserError(f"router training holdout_fraction = {self.holdout_fraction} must be in (0, 1)")
        if self.lr <= 0.0 or self.weight_decay < 0.0:
            raise UserError(f"router training lr ({self.lr}) must be > 0 and weight_decay ({self.weight_decay}) >= 0")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise UserError(f"router training early_stop_patience = {self.early_stop_patience} must be >= 1 "
                            "or None (no early stop)")


HEAD_ROUTER_TRAINING = RouterTrainConfig(epochs=5, batch_size=512)
NEURON_ROUTER_TRAINING = RouterTrainConfig(epochs=20, batch_size=64)


@dataclass(frozen=True, kw_only=True)
class RouterMetrics:
    """Held-out quality of the kept epoch (recall, precision, f1 as in `RouterScores`)."""

    recall: float
    precision: float
    f1: float | None  # THRESHOLD only
    best_epoch: int  # 0-based
    epochs_run: int
    holdout_rows: int


def train_router(
    router: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RouterTrainConfig,
    select: RouterSelect | str,
    k: int | None = None,
) -> RouterMetrics:
    """Train `router` (scores (T, L) from x (T, d)) on labels y (T, L) bool; keep the best epoch.

    select TOPK needs `k`, the number of groups picked per token at run time. The weights of
    the epoch with the best held-out score (recall for TOPK, F1 for THRESHOLD) end in `router`.
    """
    select = RouterSelect(select)
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or y.dtype != torch.bool:
        raise ValueError(f"train_router: x (T, d) and bool y (T, L) expected, got {tuple(x.shape)}, "
                         f"{y.dtype} {tuple(y.shape)}")
    if select is RouterSelect.TOPK and (k is None or not 1 <= k <= y.shape[1]):
        raise ValueError(f"train_router: select TOPK needs k in [1, {y.shape[1]}], got {k}")
    device = x.device
    train_rows, holdout_rows = split_rows(x.shape[0], cfg.holdout_fraction, cfg.seed)
    x_train, y_train = x[train_rows.to(device)].float(), y[train_rows.to(device)]
    x_hold, y_hold = x[holdout_rows.to(device)].float(), y[holdout_rows.to(device)]
    generator = torch.Generator().manual_seed(cfg.seed + 1)  # batch order

    # Labels are imbalanced (a few percent of neurons fire; half the groups are picked). Weighting
    # each negative by the positive rate (+ a floor) gives both classes about the same total
    # weight, and tilts the router toward recall: a missed active neuron or head costs accuracy,
    # an extra one only costs time.
    negative_weight = y_train.float().mean().item() + _NEGATIVE_WEIGHT_FLOOR

    model = copy.deepcopy(router).to(device=device, dtype=torch.float32).requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_score, best_epoch, best_state, best_metrics = -1.0, -1, None, None
    epochs_run = 0
    for epoch in range(cfg.epochs):
        model.train()
        batches = torch.randperm(x_train.shape[0], generator=generator).to(device).split(cfg.batch_size)
        for rows in batches:
            logits = model(x_train[rows])  # (b, L)
            target = y_train[rows]
            weight = torch.where(target, 1.0, negative_weight)  # (b, L)
            loss = F.binary_cross_entropy_with_logits(logits, target.float(), weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epochs_run = epoch + 1

        metrics = evaluate_router(model, x_hold, y_hold, select, k)
        score = metrics.recall if select is RouterSelect.TOPK else metrics.f1
        if score > best_score:
            best_score, best_epoch, best_metrics = score, epoch, metrics
            best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        elif cfg.early_stop_patience is not None and epoch - best_epoch >= cfg.early_stop_patience:
            break

    router.load_state_dict(best_state)  # copies into the router's own dtype and device
    return RouterMetrics(recall=best_metrics.recall, precision=best_metrics.precision, f1=best_metrics.f1,
                         best_epoch=best_epoch, epochs_run=epochs_run, holdout_rows=len(holdout_rows))


def split_rows(num_rows: int, holdout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, holdout) row indices, int64: a seeded shuffle, the first ceil(fraction * rows) held out."""
    num_holdout = math.ceil(holdout_fraction * num_rows)
    if num_rows - num_holdout < 1:
        raise UserError(f"router training has {num_rows} rows, too few for a {holdout_fraction} holdout; "
                        "calibrate on more text")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))  # (T,)
    return order[num_holdout:], order[:num_holdout]


@dataclass(frozen=True, kw_only=True)
class RouterScores:
    """TOPK: recall = mean over tokens of |true ∩ predicted top-k| / |true|, precision = the same
    hits over all predictions. THRESHOLD: recall, precision and f1 over all (token, neuron) pairs."""

    recall: float
    precision: float
    f1: float | None  # THRESHOLD only


@torch.no_grad()
def evaluate_router(
    router: nn.Module, x: torch.Tensor, y: torch.Tensor, select: RouterSelect | str, k: int | None = None,
) -> RouterScores:
    """Scores of `router` on rows x (T, d), labels y (T, L) bool, as `RouterMetrics` defines them."""
    select = RouterSelect(select)
    if select is RouterSelect.TOPK and k is None:
        raise ValueError("evaluate_router: select TOPK needs k")
    was_training = router.training
    router.eval()
    hits = predicted = true = 0.0
    recall_sum = 0.0  # TOPK: per-token recall, summed
    for x_chunk, y_chunk in zip(x.split(_EVAL_CHUNK_ROWS), y.split(_EVAL_CHUNK_ROWS)):
        logits = router(x_chunk)  # (t, L) float32
        if select is RouterSelect.TOPK:
            top = torch.topk(logits, k, dim=1, sorted=False).indices  # (t, k)
            pred = torch.zeros_like(y_chunk).scatter_(1, top, True)  # (t, L)
        else:
            pred = logits > 0.0  # sigmoid(logit) > 0.5
        hit = (pred & y_chunk).sum(dim=1).float()  # (t,)
        num_true = y_chunk.sum(dim=1).float()  # (t,)
        recall_sum += torch.where(num_true > 0, hit / num_true.clamp(min=1), 1.0).sum().item()
        hits += hit.sum().item()
        predicted += pred.sum().item()
        true += num_true.sum().item()
    router.train(was_training)
    if select is RouterSelect.TOPK:
        recall = recall_sum / x.shape[0]
        return RouterScores(recall=recall, precision=hits / max(predicted, 1.0), f1=None)
    recall = hits / true if true else 1.0
    precision = hits / predicted if predicted else 1.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return RouterScores(recall=recall, precision=precision, f1=f1)
