"""A growable sample buffer addressed by absolute sample index on a session timeline."""

from __future__ import annotations

import numpy as np


class SampleBuffer:
    """Samples [start, end) of a timeline; reads outside that range are zeros.

    Appends are amortised O(1) (capacity doubles); `trim_before` forgets old samples (copying
    only when more than half the storage is dead) so a long session keeps what it needs.
    """

    def __init__(self, start: int = 0, dtype: type = np.float32) -> None:
        self._data = np.zeros(4096, dtype=dtype)
        self._head = 0  # _data[_head] holds absolute sample `start`
        self._start = start
        self._len = 0

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._start + self._len

    def write(self, at: int, samples: np.ndarray) -> None:
        """Write `samples` at absolute index `at` >= start; a gap before it is zero-filled."""
        if at < self._start:
            raise ValueError(f"write at {at} before buffer start {self._start}")
        offset = at - self._start
        needed = offset + len(samples)
        if self._head + needed > len(self._data):
            grown = np.zeros(max(needed, 2 * self._len, 4096), dtype=self._data.dtype)
            grown[: self._len] = self._data[self._head : self._head + self._len]
            self._data, self._head = grown, 0
        base = self._head
        if offset > self._len:
            self._data[base + self._len : base + offset] = 0
        self._data[base + offset : base + needed] = samples
        self._len = max(self._len, needed)

    def truncate(self, at: int) -> None:
        """Forget samples from absolute index `at` on."""
        self._len = max(0, min(self._len, at - self._start))

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of samples [start, stop), zeros where the buffer holds nothing."""
        out = np.zeros(max(0, stop - start), dtype=self._data.dtype)
        lo, hi = max(start, self._start), min(stop, self.end)
        if hi > lo:
            src = self._head + lo - self._start
            out[lo - start : hi - start] = self._data[src : src + hi - lo]
        return out

    def trim_before(self, at: int) -> None:
        """Drop samples before absolute index `at` (later indices stay valid)."""
        drop = min(max(0, at - self._start), self._len)
        self._head += drop
        self._start += drop
        self._len -= drop

    def reset(self, start: int) -> None:
        """Empty the buffer and restart it at absolute index `start`."""
        self._start, self._len, self._head = start, 0, 0
