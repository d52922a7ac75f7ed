"""What a session needs of its engine (`SessionLink`) and what it reports (`SessionStats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ray_lipsync.streaming.engine import RoundResult
from ray_lipsync.types import AudioPush


class SessionLink(Protocol):
    """The engine side of one session: its pinned replica (or the in-process engine)."""

    @property
    def replica(self) -> str: ...

    @property
    def waiting(self) -> bool:
        """True while the session's replica is gone and no other has room (frames show idle)."""
        ...

    async def submit(self, push: AudioPush) -> RoundResult: ...

    async def interrupt(self, epoch: int, cut_frame: int) -> None: ...

    async def close(self) -> None: ...


@dataclass
class SessionStats:
    session_id: str
    replica: str
    epoch: int
    speaking: bool
    state: str  # "streaming", or "waiting_for_replica" while its replica is gone and none has room
    frames_sent: int
    frames_dropped: int
    drops: dict[str, int]
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None
    queued_audio_s: float
