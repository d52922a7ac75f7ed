"""RayPipeline: the session API (ray_lipsync.streaming.session) on Ray actors.

Per tick (actors/dispatch.py) this process makes one call per inference replica it uses,
carrying the audio its sessions released; it gets back only mouth patches and pastes them
into its own (memory-mapped) avatar frames. Sessions are pinned by the SessionDirectory;
every few seconds this process renews the pins of its open sessions (a lease: if it dies,
their slots free up). When a round fails or comes back too late the session counts the
frames as dropped (`stage_unavailable`) and asks the directory whether to move to another
replica.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import numpy as np
import ray

from actors.directory import LEASE_RENEW_S, get_directory
from actors.dispatch import Dispatcher
from actors.stages import STAGE_FAILURES, RoundResult
from ray_lipsync.avatar.model import Avatar
from ray_lipsync.config import Settings
from ray_lipsync.errors import AtCapacity, LipsyncError, StageUnavailable, UnknownSession
from ray_lipsync.streaming.drops import DropReason
from ray_lipsync.streaming.features import Schedule
from ray_lipsync.streaming.local import load_avatar, new_clock
from ray_lipsync.streaming.playout import policy_for_new_session
from ray_lipsync.streaming.session import Session, Submitted
from ray_lipsync.types import AudioPush, StageSpec

log = logging.getLogger(__name__)

DIRECTORY_TIMEOUT_S = 5.0  # a directory call slower than this: the directory is unavailable


class RayLink:
    """SessionLink of one session: its pinned replica, through this process's dispatcher."""

    def __init__(self, session_id: str, avatar: Avatar, backend: str, schedule: Schedule,
                 clock, pipeline: "RayPipeline") -> None:
        self.session_id = session_id
        self.backend = backend
        self._avatar = avatar
        self._spec = StageSpec(avatar.name, len(avatar), schedule)
        self._clock = clock
        self._pipeline = pipeline
        self.replica = ""
        self.replica_handle = None
        self._moving: asyncio.Task | None = None

    def attach(self, name: str, handle) -> None:
        self.replica, self.replica_handle = name, handle

    def audio_push(self, epoch: int, start: int, samples: np.ndarray, final: bool, now: float) -> AudioPush:
        """The push as sent at wall time `now` (its deadline as a budget from `now`)."""
        return AudioPush(self.session_id, epoch, start, samples, final, self._spec, self._clock.due_in(now))

    async def submit(self, epoch: int, start: int, samples: np.ndarray, final: bool) -> Submitted:
        replica = self.replica
        try:
            result = await self._pipeline.dispatcher.submit(self, epoch, start, samples, final)
        except STAGE_FAILURES + (ray.exceptions.RayTaskError,) as exc:
            self._replica_failed(replica, exc)
            raise
        return Submitted(epoch, result.frames, result.speech, self._images(result))

    async def _images(self, result: RoundResult) -> list[np.ndarray | DropReason]:
        frames = self._avatar.frames
        return [p if isinstance(p, DropReason) else p.apply(frames[p.avatar_frame]) for p in result.patches]

    def _replica_failed(self, replica: str, exc: BaseException) -> None:
        if replica == self.replica and (self._moving is None or self._moving.done()):
            log.warning("session %s: replica %s failed a round (%s)", self.session_id, replica,
                        type(exc).__name__)
            self._moving = asyncio.get_running_loop().create_task(self._repin(replica))

    async def _repin(self, failed: str) -> None:
        try:
            moved = await asyncio.wait_for(
                self._pipeline.directory.repin.remote(self.session_id, failed, self._pipeline.gateway_id),
                DIRECTORY_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the directory is restarting: try on the next failure
            log.warning("session %s: could not ask the directory to re-pin", self.session_id, exc_info=True)
            return
        if moved is not None and moved[0] != self.replica:
            name, handle = moved
            self.attach(name, handle)  # its rounds carry the session's epoch: nothing to replay
            log.warning("session %s re-pinned from %s to %s", self.session_id, failed, name)

    async def interrupt(self, epoch: int, cut_frame: int) -> None:
        try:
            await asyncio.wait_for(self.replica_handle.interrupt.remote(self.session_id, epoch, cut_frame),
                                   DIRECTORY_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the next round carries the epoch anyway
            log.warning("session %s: interrupt did not reach %s", self.session_id, self.replica)

    async def close(self) -> None:
        self._pipeline.forget(self.session_id)
        await asyncio.gather(
            asyncio.wait_for(self.replica_handle.close_session.remote(self.session_id), DIRECTORY_TIMEOUT_S),
            asyncio.wait_for(self._pipeline.directory.unpin.remote(self.session_id), DIRECTORY_TIMEOUT_S),
            return_exceptions=True,
        )


class RayPipeline:
    """Sessions served by the cluster's actors. Create with `await RayPipeline.connect(...)`."""

    def __init__(self, settings: Settings, schedule: Schedule = "streaming") -> None:
        self.settings = settings
        self.schedule = schedule
        self.directory = get_directory(settings)
        self.gateway_id = uuid.uuid4().hex[:12]
        self.dispatcher = Dispatcher(settings.pipeline.dispatch_tick_ms / 1000)
        self._sessions: dict[str, Session] = {}
        self._links: dict[str, RayLink] = {}
        self._avatars: dict[str, Avatar] = {}
        self._lease: asyncio.Task | None = None
        self._pinning: dict[str, str] = {}  # sessions being created -> backend (held by the lease)

    @classmethod
    async def connect(cls, settings: Settings, schedule: Schedule = "streaming") -> "RayPipeline":
        """Attach to (or create) the cluster's pipeline actors. Ray must be initialised."""
        if not ray.is_initialized():
            raise RuntimeError("ray.init() first (or run inside a Ray Serve replica)")
        pipeline = cls(settings, schedule)
        # The default backend's replicas start now, and the gateway is ready once one of them
        # is (at most replica_wait_s): the first session is as fast as the later ones.
        wait_s = settings.pipeline.replica_wait_s
        try:
            if not await asyncio.wait_for(pipeline.directory.warm.remote(settings.backend, wait_s),
                                          wait_s + DIRECTORY_TIMEOUT_S):
                log.warning("no %s replica ready after %.0f s; the first session waits for one",
                            settings.backend, wait_s)
        except Exception:  # noqa: BLE001 - the first session will start them
            log.warning("could not warm the pipeline", exc_info=True)
        try:
            await pipeline._avatar(settings.avatar.name)
        except Exception:  # noqa: BLE001 - a session on it will say why
            log.warning("could not load the default avatar", exc_info=True)
        return pipeline

    async def _avatar(self, name: str) -> Avatar:
        if name not in self._avatars:
            self._avatars[name] = await asyncio.to_thread(load_avatar, self.settings, name)
        return self._avatars[name]

    async def _directory_call(self, method: str, *args, timeout: float = DIRECTORY_TIMEOUT_S):
        try:
            return await asyncio.wait_for(getattr(self.directory, method).remote(*args), timeout)
        except STAGE_FAILURES:
            raise StageUnavailable("the session directory is not answering (restarting?); "
                                   "retry in a few seconds") from None
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, LipsyncError):
                raise error.cause from None  # AtCapacity, BackendUnavailable: typed for the API
            raise

    async def create_session(
        self, avatar: str = "default", backend: str | None = None, session_id: str | None = None
    ) -> Session:
        backend = backend or self.settings.backend
        loaded = await self._avatar(avatar)
        session_id = session_id or uuid.uuid4().hex
        self._ensure_lease()
        self._pinning[session_id] = backend
        try:
            return await self._create(session_id, loaded, backend)
        finally:
            self._pinning.pop(session_id, None)

    async def _create(self, session_id: str, loaded: Avatar, backend: str) -> Session:
        wait = self.settings.pipeline.replica_wait_s + DIRECTORY_TIMEOUT_S
        for attempt in range(2):
            name, replica = await self._directory_call("pin", session_id, backend, self.gateway_id,
                                                       timeout=wait)
            try:
                lookahead_ms = await asyncio.wait_for(replica.prepare.remote(loaded.name), wait)
                break
            except Exception:  # noqa: BLE001 - it died since it was pinned: pin again, once
                await self._directory_call("unpin", session_id)
                await self._directory_call("suspect", name)
        else:
            raise AtCapacity("no inference replica can take the session right now; retry later")
        clock = new_clock(self.settings)
        link = RayLink(session_id, loaded, backend, self.schedule, clock, self)
        link.attach(name, replica)
        session = Session(
            session_id, loaded, backend, link, clock,
            max_queued_s=self.settings.pipeline.audio_buffer_s,
            lookahead_ms=lookahead_ms,
            playout=policy_for_new_session(self.settings.pipeline, self.sessions()),
        )
        self._sessions[session_id] = session
        self._links[session_id] = link
        return session

    # -- leases --------------------------------------------------------------------------
    def _ensure_lease(self) -> None:
        if self._lease is None or self._lease.done():
            self._lease = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            pins: dict[str, tuple[str, str | None]] = {sid: (b, None) for sid, b in self._pinning.items()}
            pins.update({sid: (link.backend, link.replica) for sid, link in self._links.items()})
            try:
                await asyncio.wait_for(self.directory.renew.remote(self.gateway_id, pins), DIRECTORY_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the directory restarts; the next renewal rebuilds
                log.warning("could not renew the session leases", exc_info=True)
            await asyncio.sleep(LEASE_RENEW_S)

    # -- sessions ------------------------------------------------------------------------
    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.closed:
            raise UnknownSession(f"no session {session_id!r}")
        return session

    def sessions(self) -> list[Session]:
        return [s for s in self._sessions.values() if not s.closed]

    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._links.pop(session_id, None)

    async def close_session(self, session_id: str) -> None:
        await self.get(session_id).close()

    async def replicas(self) -> list[dict]:
        return await self._directory_call("replicas")

    async def replica_stats(self) -> list[dict]:
        return await self._directory_call("replica_stats")

    async def health(self) -> list[str]:
        """Names of the stages unavailable right now (empty: all well)."""
        try:
            return (await self._directory_call("health"))["degraded"]
        except StageUnavailable:
            return ["session directory"]

    async def shutdown(self) -> None:
        if self._lease is not None:
            self._lease.cancel()
        for session in list(self._sessions.values()):
            await session.close()
