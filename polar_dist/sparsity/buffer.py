"""SampleBuffer: a bounded, uniform sample of one layer's router training rows.

Calibration streams (router input, labels) rows out of the model, one batch at a time. The
buffer keeps at most `capacity` of them, chosen by reservoir sampling (Vitter's algorithm R):
after n rows have been offered, every one of them is held with the same probability
capacity / n, whatever the order and batch sizes they came in. Memory therefore depends on
the capacity, not on the corpus (the authors' memmaps grew to 13 GB of labels per layer).

Storage per row: x as float16 (2 * d bytes; router inputs are normed hidden states, far
inside float16 range) and labels bit-packed with numpy.packbits (ceil(L / 8) bytes, 8x less
than bool). Arrays grow by doubling up to the capacity, so a short corpus costs little.

    buf = SampleBuffer.with_budget(256 << 20, hidden_size=576, num_labels=1536)
    for x, y in batches:   # x (T, d) float, y (T, L) bool
        buf.add(x, y)
    x, y = buf.tensors()   # (n, d) float32, (n, L) bool
"""

from __future__ import annotations

import numpy as np
import torch

from polar_dist.errors import UserError

_MIN_ROWS_ALLOCATED = 1024  # first allocation; later ones double


class SampleBuffer:
    """Up to `capacity` rows of (x float16 (d,), labels packed (ceil(L / 8),) uint8), a uniform sample."""

    def __init__(self, capacity: int, hidden_size: int, num_labels: int, *, seed: int = 0) -> None:
        if capacity < 1 or hidden_size < 1 or num_labels < 1:
            raise ValueError(f"SampleBuffer needs capacity, hidden_size and num_labels >= 1, got {capacity}, "
                             f"{hidden_size}, {num_labels}")
        self.capacity = capacity
        self.hidden_size = hidden_size
        self.num_labels = num_labels
        self.num_seen = 0  # rows offered so far (the reservoir's n)
        self._rng = np.random.default_rng(seed)
        self._x = np.empty((0, hidden_size), dtype=np.float16)  # (rows allocated, d)
        self._labels = np.empty((0, self.packed_width), dtype=np.uint8)  # (rows allocated, ceil(L / 8))

    @classmethod
    def with_budget(cls, budget_bytes: int, hidden_size: int, num_labels: int, *, seed: int = 0) -> SampleBuffer:
        """The largest buffer whose storage fits in `budget_bytes`."""
        row_bytes = cls.bytes_per_row(hidden_size, num_labels)
        capacity = budget_bytes // row_bytes
        if capacity < 1:
            raise UserError(f"router sample budget of {budget_bytes} bytes holds no row of {row_bytes} bytes "
                            f"(hidden_size {hidden_size}, {num_labels} labels); raise the budget")
        return cls(capacity, hidden_size, num_labels, seed=seed)

    @staticmethod
    def bytes_per_row(hidden_size: int, num_labels: int) -> int:
        return 2 * hidden_size + (num_labels + 7) // 8

    @property
    def packed_width(self) -> int:
        return (self.num_labels + 7) // 8

    @property
    def nbytes(self) -> int:
        """Bytes of row storage allocated now (at most capacity * bytes_per_row)."""
        return self._x.nbytes + self._labels.nbytes

    def __len__(self) -> int:
        return min(self.num_seen, self.capacity)

    def add(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Offer rows x (T, d) and labels (T, L) bool; each row ends up held with probability capacity / n."""
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"SampleBuffer.add: x must be (T, {self.hidden_size}), got {tuple(x.shape)}")
        if labels.shape != (x.shape[0], self.num_labels) or labels.dtype != torch.bool:
            raise ValueError(f"SampleBuffer.add: labels must be bool (T, {self.num_labels}) with T = {x.shape[0]}, "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        num_rows = x.shape[0]
        position = self.num_seen + np.arange(num_rows)  # (T,) each row's 0-based index in the stream
        # Algorithm R: row i fills slot i while the reservoir has room; later it draws
        # j uniform in [0, i] and replaces slot j when j < capacity.
        slot = np.where(position < self.capacity, position,
                        self._rng.integers(0, position + 1, size=num_rows))  # (T,)
        keep = slot < self.capacity  # (T,)
        rows = np.flatnonzero(keep)
        slots = slot[keep]
        # When two rows of this batch draw the same slot, the later one must win, as when the
        # rows arrive one by one; numpy does not promise an order for repeated indices.
        unique_slots, first_in_reversed = np.unique(slots[::-1], return_index=True)
        kept_rows = torch.from_numpy(rows[::-1][first_in_reversed].copy())  # (n_kept,)

        # Only kept rows leave the device: once the reservoir is full, few of a batch are.
        x16 = x.detach()[kept_rows.to(x.device)].to(device="cpu", dtype=torch.float16).numpy()  # (n_kept, d)
        if not np.isfinite(x16).all():
            raise ValueError("SampleBuffer.add: router inputs overflow float16 (or are not finite); "
                             "store the normed hidden state that enters attention")
        kept_labels = labels.detach()[kept_rows.to(labels.device)].cpu().numpy()  # (n_kept, L) bool
        packed = np.packbits(kept_labels, axis=1)  # (n_kept, ceil(L / 8)) uint8

        self.num_seen += num_rows
        self._reserve(len(self))
        self._x[unique_slots] = x16
        self._labels[unique_slots] = packed

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held rows: x (n, d) float32 and labels (n, L) bool, in slot order."""
        n = len(self)
        x = torch.from_numpy(self._x[:n].astype(np.float32))  # (n, d)
        labels = np.unpackbits(self._labels[:n], axis=1, count=self.num_labels).astype(bool)  # (n, L)
        return x, torch.from_numpy(labels)

    def _reserve(self, rows: int) -> None:
        allocated = self._x.shape[0]
        if rows <= allocated:
            return
        new_rows = min(self.capacity, max(rows, 2 * allocated, _MIN_ROWS_ALLOCATED))
        x = np.empty((new_rows, self.hidden_size), dtype=np.float16)
        labels = np.empty((new_rows, self.packed_width), dtype=np.uint8)
        x[:allocated] = self._x
        labels[:allocated] = self._labels
        self._x, self._labels = x, labels
