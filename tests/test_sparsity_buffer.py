"""SampleBuffer: bounded memory, a uniform reservoir, rows kept whole, bit-packing round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polar_dist.errors import UserError
from polar_dist.sparsity.buffer import SampleBuffer

_ID_BITS = 15  # labels carry each row's id in 15 bits (not a multiple of 8: packbits pads the last byte)


def _rows(start: int, count: int, hidden_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose x and labels both encode the row id (x[:, 0] * 1000 + x[:, 1]; exact in float16)."""
    ids = torch.arange(start, start + count)
    x = torch.zeros(count, hidden_size)
    x[:, 0], x[:, 1] = ids // 1000, ids % 1000
    labels = (ids.unsqueeze(1) >> torch.arange(_ID_BITS)) & 1 == 1  # (count, 15) bool
    return x, labels


def _ids_of(x: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    from_x = (x[:, 0] * 1000 + x[:, 1]).long().numpy()
    from_labels = (labels.long() << torch.arange(_ID_BITS)).sum(1).numpy()
    return from_x, from_labels


def _fill(buf: SampleBuffer, total: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    start = 0
    while start < total:
        count = min(int(rng.integers(1, 700)), total - start)
        buf.add(*_rows(start, count))
        start += count


def test_bounded_memory_and_packed_storage() -> None:
    buf = SampleBuffer(500, hidden_size=4, num_labels=_ID_BITS)
    assert SampleBuffer.bytes_per_row(4, _ID_BITS) == 2 * 4 + 2  # float16 x + 15 bits in 2 bytes
    _fill(buf, 30_000, seed=0)
    assert len(buf) == 500 and buf.num_seen == 30_000
    assert buf.nbytes == 500 * SampleBuffer.bytes_per_row(4, _ID_BITS)


def test_with_budget_sizes_capacity() -> None:
    buf = SampleBuffer.with_budget(1 << 20, hidden_size=576, num_labels=1536)
    assert buf.capacity == (1 << 20) // (2 * 576 + 192)
    x = torch.randn(3000, 576)
    buf.add(x, torch.rand(3000, 1536) > 0.5)
    assert buf.nbytes <= 1 << 20
    with pytest.raises(UserError, match="budget"):
        SampleBuffer.with_budget(100, hidden_size=576, num_labels=1536)


def test_rows_stay_whole_and_labels_round_trip() -> None:
    buf = SampleBuffer(300, hidden_size=4, num_labels=_ID_BITS, seed=3)
    _fill(buf, 5000, seed=3)
    x, labels = buf.tensors()
    assert x.dtype == torch.float32 and labels.dtype == torch.bool and labels.shape == (300, _ID_BITS)
    from_x, from_labels = _ids_of(x, labels)
    assert np.array_equal(from_x, from_labels)  # each held x row kept its own labels
    assert len(set(from_x.tolist())) == 300  # no row held twice


def test_under_capacity_keeps_everything_in_order() -> None:
    buf = SampleBuffer(1000, hidden_size=4, num_labels=_ID_BITS)
    _fill(buf, 700, seed=4)
    from_x, _ = _ids_of(*buf.tensors())
    assert from_x.tolist() == list(range(700))


def test_reservoir_sample_is_uniform() -> None:
    total, capacity, bins = 20_000, 2_000, 10
    buf = SampleBuffer(capacity, hidden_size=4, num_labels=_ID_BITS, seed=11)
    _fill(buf, total, seed=11)
    from_x, _ = _ids_of(*buf.tensors())
    counts = np.bincount(from_x * bins // total, minlength=bins)
    expected = capacity / bins
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.88, counts  # 9 degrees of freedom, p = 0.001
    # Position within a batch must not matter either: early and late rows of each batch alike.
    assert abs(from_x.mean() - (total - 1) / 2) < 4 * total / np.sqrt(12 * capacity)


def test_add_checks_shapes_and_range() -> None:
    buf = SampleBuffer(10, hidden_size=4, num_labels=3)
    with pytest.raises(ValueError, match="labels must be bool"):
        buf.add(torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="float16"):
        buf.add(torch.full((2, 4), 1e6), torch.zeros(2, 3, dtype=torch.bool))
