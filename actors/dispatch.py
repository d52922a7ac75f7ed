"""Dispatcher: one round per tick, one call per inference replica, for all sessions here.

Each session hands its newly released audio to the dispatcher; at the next tick (a global
grid of `tick_s`) the pending pushes go out together: one `InferenceReplica.round` call per
replica, carrying the pushes of every session of this process pinned there. The replica does
the rest (features, render, patches) and answers with mouth patches only. On a small node the
per-call overhead of Ray costs far more CPU than the lip-sync work itself, so coalescing the
calls of concurrent sessions is what lets one node carry more of them; the price is at most
one tick of extra latency (tick/2 on average). The default tick is one frame period: every
session releases audio about once per frame, so each round carries a frame of every talking
session and the number of calls per second stays fixed as sessions are added.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray

from ray_lipsync.clock import SAMPLES_PER_FRAME, frame_deadline
from ray_lipsync.streaming.engine import RoundResult
from ray_lipsync.types import AudioPush

if TYPE_CHECKING:
    from actors.pipeline import RayLink

log = logging.getLogger(__name__)

ROUND_MARGIN_S = 0.1  # a round not back this long after its last frame was due has failed...
ROUND_SLOW_FACTOR = 4.0  # ... nor one that takes this many times the replica's usual (p95) round
ROUND_MIN_TIMEOUT_S = 0.45  # above the replica's own stage timeout: its fallbacks get to answer
ROUND_HISTORY = 200


@dataclass
class _Pending:
    link: "RayLink"
    push: AudioPush
    made: float = field(default_factory=time.monotonic)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Dispatcher:
    """Coalesces the pushes of every session of this process, tick by tick, per replica."""

    def __init__(self, tick_s: float) -> None:
        self._tick_s = tick_s
        self._pending: list[_Pending] = []
        self._round: asyncio.Task | None = None
        self._calls: set[asyncio.Task] = set()
        self._durations: dict[str, collections.deque[float]] = {}  # replica -> recent round times

    async def submit(self, link: "RayLink", push: AudioPush) -> RoundResult:
        pending = _Pending(link, push)
        self._pending.append(pending)
        if self._round is None or self._round.done():
            self._round = asyncio.create_task(self._next_round())
        return await pending.future

    async def _next_round(self) -> None:
        if self._tick_s > 0:
            await asyncio.sleep(self._tick_s - time.time() % self._tick_s)
        while self._pending:
            batch, self._pending = self._pending, []
            by_replica: dict[str, list[_Pending]] = {}
            for pending in batch:
                by_replica.setdefault(pending.link.replica, []).append(pending)
            for group in by_replica.values():
                task = asyncio.create_task(self._call(group))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)

    async def _call(self, group: list[_Pending]) -> None:
        """One round call; every session of the group learns its result or the failure."""
        now = time.monotonic()
        pushes = [p.push.aged(now - p.made) for p in group]  # budgets as of sending
        # the round is useless once its last frame is past due: do not wait longer than that
        last_due = max(frame_deadline(push.due_in_s, -(-push.stop // SAMPLES_PER_FRAME)) for push in pushes)
        replica, handle = group[0].link.replica, group[0].link.replica_handle
        ref = handle.round.remote(pushes)
        started = time.monotonic()
        try:
            results = await asyncio.wait_for(ref, self._timeout(replica, last_due))
        except Exception as exc:  # noqa: BLE001 - failed or too late: the sessions count the drops
            if isinstance(exc, asyncio.TimeoutError):
                # a round queued for a replica that is restarting must not run later, after
                # the session's newer audio went elsewhere
                ray.cancel(ref)
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        self._durations.setdefault(replica, collections.deque(maxlen=ROUND_HISTORY)).append(
            time.monotonic() - started)
        for pending, result in zip(group, results):
            if not pending.future.done():
                pending.future.set_result(result)

    def _timeout(self, replica: str, last_due: float) -> float:
        """How long a round may take: until its frames are due, and, once the replica has a
        history, no more than a few times its usual round (a dead replica is found sooner)."""
        timeout = max(last_due, 0.0) + ROUND_MARGIN_S
        history = self._durations.get(replica)
        if history and len(history) >= 20:
            usual = sorted(history)[int(0.95 * (len(history) - 1))]
            timeout = min(timeout, max(ROUND_MIN_TIMEOUT_S, ROUND_SLOW_FACTOR * usual))
        return timeout
