"""`LocalPipeline`: the whole streaming pipeline in one process, no Ray.

The same stages as the Ray pipeline (feature batcher, deadline-ordered render queue with
cross-session batches, compositor) run in this process: the reference implementation, the
engine of tests that do not need a cluster, and a laptop mode.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.backends import Renderer, create_featurizer, create_renderer
from ray_lipsync.clock import SessionClock
from ray_lipsync.config import Settings
from ray_lipsync.errors import AtCapacity, UnknownSession
from ray_lipsync.streaming.features import FeatureBatcher, Schedule
from ray_lipsync.streaming.playout import PlayoutPolicy, policy_for_new_session
from ray_lipsync.streaming.playout import new_clock as playout_clock
from ray_lipsync.streaming.scheduler import BatchWorker, RenderQueue
from ray_lipsync.streaming.session import Session, Submitted
from ray_lipsync.types import FrameJob, RenderJob, StageSpec


def new_clock(settings: Settings) -> SessionClock:
    """A new session's clock (D_clock and t0 as the playout policy wants, see playout.py)."""
    return playout_clock(PlayoutPolicy.from_config(settings.pipeline))


def load_avatar(settings: Settings, name: str) -> Avatar:
    """Load a prepared avatar (the default one is prepared on first use)."""
    from ray_lipsync.avatar.default import load_or_prepare
    from ray_lipsync.avatar.store import AvatarStore

    return load_or_prepare(AvatarStore(settings.avatars_dir, settings.avatar_uri), name, settings.avatar)


def create_vad(settings: Settings):
    """The Silero VAD configured by `settings.audio` (onnxruntime is imported only here)."""
    from ray_lipsync.audio.vad import SpeechDetector

    return SpeechDetector.from_config(settings.audio)


@dataclass
class _Backend:
    """One backend's stages in this process."""

    batcher: FeatureBatcher
    worker: BatchWorker
    renderer: Renderer
    avatars: dict[str, Avatar] = field(default_factory=dict)


class LocalLink:
    """SessionLink to the in-process stages."""

    def __init__(self, session_id: str, clock: SessionClock, backend: _Backend,
                 pipeline: "LocalPipeline") -> None:
        self.session_id = session_id
        self._clock = clock
        self._backend = backend
        self._pipeline = pipeline

    @property
    def replica(self) -> str:
        return "local"

    async def submit(self, epoch: int, start: int, samples: np.ndarray, final: bool) -> Submitted:
        jobs = await self._backend.batcher.process(self.session_id, epoch, start, samples, final)
        speech = [j for j in jobs if j.speech]
        origin = time.monotonic() + self._clock.due_in(time.time())
        images = self._backend.worker.run(speech, origin) if speech else None
        return Submitted(epoch, [j.frame_index for j in jobs], [j.speech for j in jobs], images)

    async def interrupt(self, epoch: int, cut_frame: int) -> None:
        self._backend.worker.queue.set_epoch(self.session_id, epoch)
        await self._backend.batcher.interrupt(self.session_id, epoch, cut_frame)

    async def close(self) -> None:
        self._backend.worker.queue.forget(self.session_id)
        await self._backend.batcher.close(self.session_id)
        self._pipeline._forget(self.session_id)


class LocalPipeline:
    """Sessions served by in-process stages; capacity = settings.pipeline.sessions_per_replica."""

    def __init__(self, settings: Settings, schedule: Schedule = "streaming") -> None:
        from ray_lipsync.compositing import Compositor

        self.settings = settings
        self.schedule = schedule
        self._compositor = Compositor()
        self._backends: dict[str, _Backend] = {}
        self._sessions: dict[str, Session] = {}
        self._avatars: dict[str, Avatar] = {}  # by name, for the compositor
        self._vad = None

    def _backend(self, name: str) -> _Backend:
        if name not in self._backends:
            if self._vad is None:
                self._vad = create_vad(self.settings)
            featurizer = create_featurizer(self.settings, name)
            renderer = create_renderer(self.settings, name)
            batcher = FeatureBatcher(featurizer, self._vad, self.settings.pipeline.lookahead_ms)
            queue = RenderQueue(self.settings.pipeline.max_batch)
            worker = BatchWorker(queue, lambda jobs: self._render(renderer, jobs))
            self._backends[name] = _Backend(batcher, worker, renderer)
        return self._backends[name]

    def _render(self, renderer: Renderer, jobs: list[FrameJob]) -> Sequence[np.ndarray | None]:
        """Render + composite one cross-session batch (runs in a worker thread)."""
        avatars = [self._avatars[j.avatar] for j in jobs]
        crops = renderer.render([RenderJob(a.name, j.avatar_frame, j.features) for a, j in zip(avatars, jobs)])
        return [self._compositor.compose(a, j.avatar_frame, c) for a, j, c in zip(avatars, jobs, crops)]

    async def create_session(
        self, avatar: str = "default", backend: str | None = None, session_id: str | None = None
    ) -> Session:
        if len(self._sessions) >= self.settings.pipeline.sessions_per_replica:
            raise AtCapacity(
                f"all {self.settings.pipeline.sessions_per_replica} session slots are in use; "
                "retry later or raise pipeline.sessions_per_replica"
            )
        backend = backend or self.settings.backend
        loaded = await asyncio.to_thread(load_avatar, self.settings, avatar)
        stages = await asyncio.to_thread(self._backend, backend)
        await asyncio.to_thread(stages.renderer.load_avatar, loaded)
        session_id = session_id or uuid.uuid4().hex
        clock = new_clock(self.settings)
        stages.batcher.open(session_id, StageSpec(loaded.name, len(loaded), self.schedule))
        self._avatars[loaded.name] = loaded
        session = Session(
            session_id,
            loaded,
            backend,
            LocalLink(session_id, clock, stages, self),
            clock,
            max_queued_s=self.settings.pipeline.audio_buffer_s,
            lookahead_ms=stages.batcher.lookahead_ms,
            playout=self._playout(),
        )
        self._sessions[session_id] = session
        return session

    def _playout(self) -> PlayoutPolicy:
        """The playout policy of a new session, its first D seeded by the live sessions' needs."""
        return policy_for_new_session(self.settings.pipeline, self._sessions.values())

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSession(f"no session {session_id!r}") from None

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    async def close_session(self, session_id: str) -> None:
        await self.get(session_id).close()

    def _forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def replica_stats(self) -> list[dict]:
        """One entry per backend in use: the in-process "replica" and its render device."""
        return [
            {
                "replica": "local",
                "backend": name,
                "device": str(b.renderer.device),
                "sessions": sum(s.backend == name for s in self._sessions.values()),
                "queue_depth": len(b.worker.queue),
                **vars(b.worker.queue.stats),
            }
            for name, b in self._backends.items()
        ]

    async def shutdown(self) -> None:
        for session in list(self._sessions.values()):
            await session.close()

