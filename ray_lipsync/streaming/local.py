"""`LocalPipeline`: the whole streaming pipeline in one process, no Ray.

One `Engine` per backend (streaming/engine.py, the same class an inference replica actor
runs) serves every session: the reference implementation, the engine of tests that do not
need a cluster, and a laptop mode.
"""

from __future__ import annotations

import asyncio
import uuid

from ray_lipsync.clock import SessionClock
from ray_lipsync.config import Settings
from ray_lipsync.errors import AtCapacity
from ray_lipsync.streaming.engine import AvatarCache, Engine, RoundResult
from ray_lipsync.streaming.features import Schedule
from ray_lipsync.streaming.pipeline import SessionRegistry
from ray_lipsync.streaming.playout import PlayoutPolicy, policy_for_new_session
from ray_lipsync.streaming.playout import new_clock as playout_clock
from ray_lipsync.streaming.session import Session
from ray_lipsync.streaming.sources import warm_switches
from ray_lipsync.types import AudioPush

__all__ = ["LocalPipeline", "new_clock"]


def new_clock(settings: Settings) -> SessionClock:
    """A new session's clock (D_clock and t0 as the playout policy wants, see playout.py)."""
    return playout_clock(PlayoutPolicy.from_config(settings.pipeline))


class LocalLink:
    """SessionLink to an in-process engine."""

    replica = "local"
    waiting = False

    def __init__(self, session_id: str, engine: Engine, registry: SessionRegistry) -> None:
        self.session_id = session_id
        self._engine = engine
        self._registry = registry

    async def submit(self, push: AudioPush) -> RoundResult:
        (result,) = await self._engine.round([push])
        return result

    async def interrupt(self, epoch: int, cut_frame: int) -> None:
        await self._engine.interrupt(self.session_id, epoch, cut_frame)

    async def close(self) -> None:
        self._registry.forget(self.session_id)
        await self._engine.close_session(self.session_id)


class LocalPipeline:
    """Sessions served by in-process engines; capacity = settings.pipeline.sessions_per_replica."""

    def __init__(self, settings: Settings, schedule: Schedule = "streaming") -> None:
        self.settings = settings
        self.schedule = schedule
        self._engines: dict[str, Engine] = {}
        self._registry = SessionRegistry()
        self._avatars = AvatarCache(settings)

    def _engine(self, backend: str) -> Engine:
        if backend not in self._engines:
            self._engines[backend] = Engine(self.settings, backend)
        return self._engines[backend]

    async def create_session(self, avatar: str = "default", backend: str | None = None,
                             session_id: str | None = None) -> Session:
        if len(self._registry) >= self.settings.pipeline.sessions_per_replica:
            raise AtCapacity(
                f"all {self.settings.pipeline.sessions_per_replica} session slots are in use; "
                "retry later or raise pipeline.sessions_per_replica"
            )
        backend = backend or self.settings.backend
        loaded = await self._avatars.get(avatar)
        await asyncio.to_thread(warm_switches, loaded)
        engine = await asyncio.to_thread(self._engine, backend)
        lookahead_ms = await engine.prepare(loaded.name)
        session_id = session_id or uuid.uuid4().hex
        session = Session(
            session_id, loaded, backend, LocalLink(session_id, engine, self._registry),
            new_clock(self.settings),
            max_queued_s=self.settings.pipeline.audio_buffer_s,
            lookahead_ms=lookahead_ms,
            playout=policy_for_new_session(self.settings.pipeline, self._registry),
            schedule=self.schedule,
        )
        self._registry.add(session)
        return session

    def get(self, session_id: str) -> Session:
        return self._registry.get(session_id)

    def sessions(self) -> list[Session]:
        return self._registry.sessions()

    async def close_session(self, session_id: str) -> None:
        await self.get(session_id).close()

    async def replica_stats(self) -> list[dict]:
        """One entry per backend in use: its in-process engine."""
        return [engine.stats().as_dict() for engine in self._engines.values()]

    async def health(self) -> list[str]:
        return []  # everything runs in this process: if it answers, it is up

    async def shutdown(self) -> None:
        await self._registry.close_all()
