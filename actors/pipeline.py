"""RayPipeline: the session API (ray_lipsync.streaming.session) on Ray actors.

Per tick (actors/dispatch.py), the audio every session released goes to the feature batcher
in one call; the speech frames that became ready go to each session's pinned inference
replica, whose crops go (as an ObjectRef, never through this process) to the compositor on
this node; this process fetches only the blended mouth patches and pastes them into its own
(memory-mapped) avatar frames. If a replica dies, its
sessions are re-pinned and keep streaming.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Awaitable

import numpy as np
import ray
from ray.exceptions import RayActorError

from actors.directory import get_directory
from actors.dispatch import Dispatcher
from ray_lipsync.avatar.model import Avatar
from ray_lipsync.compositing import Patch
from ray_lipsync.config import Settings
from ray_lipsync.errors import AtCapacity, UnknownSession
from ray_lipsync.streaming.features import Schedule
from ray_lipsync.streaming.local import load_avatar, new_clock
from ray_lipsync.streaming.session import Session, Submitted

log = logging.getLogger(__name__)

try:  # newer Ray raises this while an actor restarts or is unreachable
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover
    ActorUnavailableError = RayActorError  # type: ignore[misc, assignment]

REPLICA_FAILURES = (RayActorError, ActorUnavailableError)
REPLICA_START_TIMEOUT_S = 120.0  # a replica that cannot be placed must not hang create_session


class RayLink:
    """SessionLink of one session: its batcher, pinned replica and local compositor."""

    def __init__(
        self, session_id: str, avatar: Avatar, backend: str, directory, batcher, dispatcher: Dispatcher
    ) -> None:
        self.session_id = session_id
        self.backend = backend
        self.avatar_name = avatar.name
        self._avatar = avatar
        self.batcher = batcher
        self.replica_handle = None
        self._directory = directory
        self._dispatcher = dispatcher
        self._replica_name = ""
        self._epoch = 0
        self._repin_lock = asyncio.Lock()  # several failed renders of one replica: one re-pin

    @property
    def replica(self) -> str:
        return self._replica_name

    async def attach(self, name: str, handle) -> None:
        """Use replica `name` (after pinning or re-pinning) and register this session there."""
        await handle.open_session.remote(self.session_id, self.avatar_name)
        if self._epoch:
            await handle.set_epoch.remote(self.session_id, self._epoch)
        self._replica_name, self.replica_handle = name, handle

    async def submit(self, epoch: int, start: int, samples: np.ndarray, final: bool) -> Submitted:
        return await self._dispatcher.submit(self, epoch, start, samples, final)

    async def images(self, replica: str, patches: Awaitable[list[Patch | None]], offset: int,
                     n: int) -> list[np.ndarray | None]:
        """This session's frames of one dispatch round: its `n` patches from `offset` in the
        round's compositor result, pasted into the avatar's frames; re-pin if its replica died."""
        try:
            mine = (await patches)[offset : offset + n]
        except REPLICA_FAILURES + (ray.exceptions.RayTaskError,) as exc:
            if replica == self._replica_name and _replica_failed(exc):
                await self._repin(replica)
            return [None] * n
        frames = self._avatar.frames
        return [None if p is None else p.apply(frames[p.avatar_frame]) for p in mine]

    async def _repin(self, dead: str) -> None:
        async with self._repin_lock:
            if dead != self._replica_name:
                return  # a concurrent failure already moved this session
            name, handle = await self._directory.repin.remote(self.session_id, dead)
            if name != self._replica_name:
                await self.attach(name, handle)
                log.warning("session %s re-pinned from %s to %s", self.session_id, dead, name)

    async def interrupt(self, epoch: int, cut_frame: int) -> None:
        self._epoch = epoch
        await asyncio.gather(
            self.batcher.interrupt.remote(self.session_id, epoch, cut_frame),
            self.replica_handle.set_epoch.remote(self.session_id, epoch),
            return_exceptions=True,
        )

    async def close(self) -> None:
        await asyncio.gather(
            self.batcher.close.remote(self.session_id),
            self.replica_handle.close_session.remote(self.session_id),
            self._directory.unpin.remote(self.session_id),
            return_exceptions=True,
        )


def _replica_failed(exc: BaseException) -> bool:
    """A failure of the replica actor itself (directly or as the compositor's input)."""
    if isinstance(exc, REPLICA_FAILURES):
        return True
    cause = getattr(exc, "cause", None)
    return isinstance(cause, REPLICA_FAILURES)


class RayPipeline:
    """Sessions served by the cluster's actors. Create with `await RayPipeline.connect(...)`."""

    def __init__(self, settings: Settings, schedule: Schedule = "streaming") -> None:
        self.settings = settings
        self.schedule = schedule
        self._directory = get_directory(settings)
        self._sessions: dict[str, Session] = {}
        self._avatars: dict[str, Avatar] = {}
        self._node_id = ray.get_runtime_context().get_node_id()
        self._dispatcher: Dispatcher | None = None
        self._batchers: dict[str, object] = {}

    @classmethod
    async def connect(cls, settings: Settings, schedule: Schedule = "streaming") -> "RayPipeline":
        """Attach to (or create) the cluster's pipeline actors. Ray must be initialised."""
        if not ray.is_initialized():
            raise RuntimeError("ray.init() first (or run inside a Ray Serve replica)")
        return cls(settings, schedule)

    async def _avatar(self, name: str) -> Avatar:
        if name not in self._avatars:
            self._avatars[name] = await asyncio.to_thread(load_avatar, self.settings, name)
        return self._avatars[name]

    async def create_session(
        self, avatar: str = "default", backend: str | None = None, session_id: str | None = None
    ) -> Session:
        backend = backend or self.settings.backend
        loaded = await self._avatar(avatar)
        session_id = session_id or uuid.uuid4().hex
        directory = self._directory
        if backend not in self._batchers:
            self._batchers[backend] = await directory.batcher.remote(backend)
        batcher = self._batchers[backend]
        if self._dispatcher is None:
            compositor = await directory.compositor.remote(self._node_id)
            self._dispatcher = Dispatcher(compositor, self.settings.pipeline.dispatch_tick_ms / 1000)
        name, replica = await directory.pin.remote(session_id, backend)
        link = RayLink(session_id, loaded, backend, directory, batcher, self._dispatcher)
        clock = new_clock(self.settings)
        try:
            await asyncio.wait_for(link.attach(name, replica), timeout=REPLICA_START_TIMEOUT_S)
            await batcher.open.remote(session_id, clock, len(loaded), self.schedule)
            lookahead = await batcher.lookahead_ms.remote()
        except asyncio.TimeoutError:
            await link.close()
            raise AtCapacity(
                f"inference replica {name} did not start within {REPLICA_START_TIMEOUT_S:.0f} s "
                "(not enough CPU/GPU in the cluster?); retry later"
            ) from None
        except Exception:
            await link.close()
            raise
        session = Session(
            session_id,
            loaded,
            backend,
            link,
            clock,
            max_queued_s=self.settings.pipeline.audio_buffer_s,
            lookahead_ms=lookahead,
        )
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.closed:
            raise UnknownSession(f"no session {session_id!r}")
        return session

    def sessions(self) -> list[Session]:
        return [s for s in self._sessions.values() if not s.closed]

    async def close_session(self, session_id: str) -> None:
        session = self.get(session_id)
        await session.close()
        self._sessions.pop(session_id, None)

    async def replicas(self) -> list[dict]:
        return await self._directory.replicas.remote()

    async def replica_stats(self) -> list[dict]:
        return await self._directory.replica_stats.remote()

    async def shutdown(self) -> None:
        for session_id in list(self._sessions):
            await self._sessions.pop(session_id).close()
