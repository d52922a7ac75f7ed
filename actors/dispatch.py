"""Dispatcher: one round of actor calls per tick for all sessions of this process.

Each session hands its newly released audio to the dispatcher; at the next tick (a global
grid of `tick_s`) all pending pushes go out together: one feature-batcher call per backend,
then one render call per inference replica and one compositor call for the speech frames
of all sessions pinned there. On a small node the per-call overhead of Ray (serialisation,
scheduling, object store) costs far more CPU than the lip-sync work itself, so coalescing the
calls of concurrent sessions is what lets one node carry more of them; the price is at most
one tick of extra latency (20 ms on average with the default 40 ms tick). The default tick
is one frame period: every session releases audio about once per frame, so each round
carries a frame of every talking session and the number of calls per second stays fixed
(3 per tick) as sessions are added; a 20 ms tick doubled them for ~10 ms less latency,
a bad trade on a node whose cores are already busy (an empty actor call costs ~3 ms of CPU,
both sides, on the 2-core dev VM).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ray_lipsync.compositing import Patch
from ray_lipsync.streaming.session import Submitted
from ray_lipsync.types import FrameJob

if TYPE_CHECKING:
    from actors.pipeline import RayLink


@dataclass
class _Push:
    link: "RayLink"
    epoch: int
    start: int
    samples: np.ndarray
    final: bool
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Dispatcher:
    """Coalesces the submits of every session of this process, tick by tick."""

    def __init__(self, compositor, tick_s: float) -> None:
        self._compositor = compositor
        self._tick_s = tick_s
        self._pending: list[_Push] = []
        self._round: asyncio.Task | None = None
        self.rounds = 0

    async def submit(self, link: "RayLink", epoch: int, start: int, samples: np.ndarray, final: bool) -> Submitted:
        push = _Push(link, epoch, start, samples, final)
        self._pending.append(push)
        if self._round is None or self._round.done():
            self._round = asyncio.create_task(self._next_round())
        return await push.future

    async def _next_round(self) -> None:
        if self._tick_s > 0:
            await asyncio.sleep(self._tick_s - time.time() % self._tick_s)
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._dispatch(batch)
            except Exception as exc:  # every session of the round learns of the failure
                for push in batch:
                    if not push.future.done():
                        push.future.set_exception(exc)
            self.rounds += 1

    async def _dispatch(self, batch: list[_Push]) -> None:
        by_batcher: dict[str, list[_Push]] = {}  # one feature batcher per backend
        for push in batch:
            by_batcher.setdefault(push.link.backend, []).append(push)
        groups = list(by_batcher.values())
        results = await asyncio.gather(
            *(
                g[0].link.batcher.process_many.remote(
                    [(p.link.session_id, p.epoch, p.start, p.samples, p.final) for p in g]
                )
                for g in groups
            )
        )
        by_replica: dict[str, list[tuple[Submitted, _Push, list[FrameJob]]]] = {}
        done: list[tuple[_Push, Submitted]] = []
        for group, jobs_per_push in zip(groups, results):
            for push, jobs in zip(group, jobs_per_push):
                submitted = Submitted(push.epoch, [j.frame_index for j in jobs], [j.speech for j in jobs], None)
                done.append((push, submitted))
                speech = [j for j in jobs if j.speech]
                if speech:
                    by_replica.setdefault(push.link.replica, []).append((submitted, push, speech))
        for replica, entries in by_replica.items():
            self._render(replica, entries)
        for push, submitted in done:
            push.future.set_result(submitted)

    def _render(self, replica: str, entries: list[tuple[Submitted, _Push, list[FrameJob]]]) -> None:
        """One render call on `replica` and one compositor call for all its sessions' frames."""
        jobs = [j for _, _, speech in entries for j in speech]
        crops = entries[0][1].link.replica_handle.render.remote(jobs)
        patches = self._compositor.patch_many.remote(
            [(push.link.avatar_name, j.avatar_frame) for _, push, speech in entries for j in speech], crops
        )
        shared = asyncio.ensure_future(_await(patches))
        offset = 0
        for submitted, push, speech in entries:
            submitted.images = push.link.images(replica, shared, offset, len(speech))
            offset += len(speech)


async def _await(ref) -> list[Patch | None]:
    return await ref

