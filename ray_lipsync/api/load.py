"""What a gateway measures for admission (ray_lipsync/admission.py): the host's busy CPU and the
lag of its own event loop, once a second (`LoadMeter`)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
TICK_S = 0.1  # the loop-lag probe's sleep


def host_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class HostCpu:
    """Busy CPU of the whole host between two reads, in cores (Linux /proc/stat; elsewhere
    this process's own CPU, which is all that can be read without more dependencies)."""

    def __init__(self) -> None:
        self._last = self._read()

    def busy_cores(self) -> float:
        now = self._read()
        (busy0, total0, wall0), (busy1, total1, wall1) = self._last, now
        self._last = now
        if PROC_STAT.exists():
            return host_cores() * (busy1 - busy0) / max(1e-9, total1 - total0)
        return (busy1 - busy0) / max(1e-9, wall1 - wall0)

    @staticmethod
    def _read() -> tuple[float, float, float]:
        wall = time.monotonic()
        try:
            fields = [float(x) for x in PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return time.process_time(), wall, wall
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields) - idle, sum(fields), wall


class LoopLag:
    """The worst lateness of a `TICK_S` sleep on this event loop since the last `take()`."""

    def __init__(self) -> None:
        self._worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._probe(), name="loop-lag")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def take_ms(self) -> float:
        worst, self._worst = self._worst, 0.0
        return 1000 * worst

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(TICK_S)
            self._worst = max(self._worst, loop.time() - t - TICK_S)
