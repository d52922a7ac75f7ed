"""A gateway's background work: once a second the load sample admission needs (and shedding
when it says so), and closing the sessions that expired (`session_entry.expiry_reason`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ray_lipsync.admission import AdmissionPolicy, LoadSample
from ray_lipsync.api.load import HostCpu, LoopLag, host_cores
from ray_lipsync.api.metrics import GatewayMetrics
from ray_lipsync.api.session_entry import SessionEntry, expiry_reason
from ray_lipsync.config import Settings

logger = logging.getLogger(__name__)

LATE_REASONS = ("late", "sender_backpressure")  # drops that say the host is not keeping up
LOAD_SAMPLE_S = 1.0


class Housekeeping:
    """Runs while the gateway has had a session: `start()` (idempotent) on the running loop,
    `stop()` at shutdown. `entries` lists the open sessions, `close(entry, reason)` closes one."""

    def __init__(self, settings: Settings, admission: AdmissionPolicy, metrics: GatewayMetrics,
                 entries: Callable[[], list[SessionEntry]],
                 close: Callable[[SessionEntry, str], Awaitable[None]]) -> None:
        self._settings = settings
        self._admission = admission
        self._metrics = metrics
        self._entries = entries
        self._close = close
        self._loop_lag = LoopLag()
        self._tasks: list[asyncio.Task] = []
        self.load: dict[str, float] = {}  # the last load sample (metrics, autoscaling)

    @property
    def running(self) -> bool:
        return any(not task.done() for task in self._tasks)

    def start(self) -> None:
        if self._tasks and not any(task.done() for task in self._tasks):
            return
        self.stop()
        self._loop_lag.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reap()), loop.create_task(self._sample_load())]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self._loop_lag.stop()

    async def _sample_load(self) -> None:
        """Once a second: what admission needs (admission.py), and shedding when it says so."""
        host, own = HostCpu(), time.process_time()
        while True:
            await asyncio.sleep(LOAD_SAMPLE_S)
            entries = self._entries()
            sent = late = talking = 0
            for entry in entries:
                drops = entry.session.drops.by_reason()
                counts = (entry.session.frames_sent, sum(drops.get(r, 0) for r in LATE_REASONS))
                sent += counts[0] - entry.counted[0]
                late += counts[1] - entry.counted[1]
                entry.counted = counts
                talking += entry.session.speaking()
            busy, lag = host.busy_cores(), self._loop_lag.take_ms()
            cpu = time.process_time()
            gateway_cores, own = (cpu - own) / LOAD_SAMPLE_S, cpu
            now = time.monotonic()
            self._admission.observe(LoadSample(now, len(entries), talking, sent, late, lag, busy, host_cores()))
            self.load = {"busy_cores": busy, "loop_lag_ms": lag, "talk_cores": self._admission.talk_cores,
                         "gateway_cores": gateway_cores}
            if entries and self._admission.should_shed(now):
                newest = max(entries, key=lambda e: e.created)
                self._metrics.sessions_shed += 1
                logger.warning("shedding session %s: its sessions lost frames for %.0f s",
                               newest.public_id, self._settings.serve.admission.shed_after_s)
                await self._close(newest, "shed: the service was overloaded (newest session first)")

    async def _reap(self) -> None:
        serve, webrtc = self._settings.serve, self._settings.webrtc
        period = min(1.0, serve.idle_timeout_s / 4, webrtc.connect_timeout_s / 4, serve.offer_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for entry in self._entries():
                reason = expiry_reason(entry, now, self._settings)
                if reason is not None:
                    await self._close(entry, reason)
