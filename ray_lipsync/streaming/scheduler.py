"""Cross-session batching for an inference replica: oldest deadline first, up to max_batch.

The one place where render batches form. Jobs from all sessions of a replica wait in one
heap ordered by presentation deadline (on this process's monotonic clock, see
clock.frame_deadline). A step takes up to `max_batch` of them: jobs of an older epoch than
their session's current one are discarded (`stale_epoch`), and so are jobs already past their
deadline (`shed`: the session shows an idle frame for them anyway), so an overloaded replica
sheds work instead of falling further behind. Batches grow with load, never by waiting.
A discarded job resolves to its DropReason; the session counts it (streaming/drops.py).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ray_lipsync.clock import frame_deadline
from ray_lipsync.streaming.drops import DropReason
from ray_lipsync.types import FrameJob

log = logging.getLogger(__name__)


@dataclass(order=True)
class _Entry:
    deadline: float
    seq: int
    job: FrameJob = field(compare=False)
    future: asyncio.Future = field(compare=False)


@dataclass
class QueueStats:
    batches: int = 0
    frames: int = 0
    dropped_stale: int = 0
    dropped_late: int = 0
    max_batch_seen: int = 0


class RenderQueue:
    """Deadline-ordered queue of frame jobs with epoch- and deadline-based dropping."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._epochs: dict[str, int] = {}
        self.stats = QueueStats()

    def __len__(self) -> int:
        return len(self._heap)

    def set_epoch(self, session_id: str, epoch: int) -> None:
        self._epochs[session_id] = max(epoch, self._epochs.get(session_id, 0))

    def forget(self, session_id: str) -> None:
        """A closed session: everything still queued for it is stale."""
        self._epochs[session_id] = 1 << 62

    def submit(self, jobs: Sequence[FrameJob], origin: float) -> list[asyncio.Future]:
        """Queue `jobs` of one session whose frame 0 is presented at monotonic time `origin`."""
        loop = asyncio.get_running_loop()
        futures = []
        for job in jobs:
            future = loop.create_future()
            deadline = frame_deadline(origin, job.frame_index)
            heapq.heappush(self._heap, _Entry(deadline, next(self._seq), job, future))
            futures.append(future)
        return futures

    def next_batch(self, now: float | None = None) -> list[_Entry]:
        """Pop up to max_batch live jobs, oldest deadline first; resolve discarded ones to
        their DropReason."""
        now = time.monotonic() if now is None else now
        batch: list[_Entry] = []
        while self._heap and len(batch) < self.max_batch:
            entry = heapq.heappop(self._heap)
            if entry.job.epoch < self._epochs.get(entry.job.session_id, 0):
                self.stats.dropped_stale += 1
                _resolve(entry.future, DropReason.STALE_EPOCH)
            elif entry.deadline < now:
                self.stats.dropped_late += 1
                _resolve(entry.future, DropReason.SHED)
            else:
                batch.append(entry)
        return batch


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


class BatchWorker:
    """Runs `render` on batches from a RenderQueue, one batch at a time, off the event loop."""

    def __init__(
        self,
        queue: RenderQueue,
        render: Callable[[list[FrameJob]], Sequence[np.ndarray | None]],
    ) -> None:
        self.queue = queue
        self._render = render
        self._runner: asyncio.Task | None = None

    async def run(self, jobs: Sequence[FrameJob], origin: float) -> list[np.ndarray | DropReason]:
        """Queue `jobs` (frame 0 at monotonic `origin`) and wait for their crops or drop reasons."""
        futures = self.queue.submit(jobs, origin)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._loop())
        return list(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        while len(self.queue):
            batch = self.queue.next_batch()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self._render, [e.job for e in batch])
            except Exception:
                log.exception("render batch of %d frames failed", len(batch))
                for entry in batch:
                    _resolve(entry.future, DropReason.STAGE_ERROR)
                continue
            stats = self.queue.stats
            stats.batches += 1
            stats.frames += len(batch)
            stats.max_batch_seen = max(stats.max_batch_seen, len(batch))
            for entry, result in zip(batch, results):
                _resolve(entry.future, DropReason.STAGE_ERROR if result is None else result)

