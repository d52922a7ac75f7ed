"""RayPipeline: the session API (ray_lipsync.streaming.session) on Ray actors.

Per tick (actors/dispatch.py) this process makes one call per inference replica it uses,
carrying the audio its sessions released; it gets back only mouth patches and pastes them
into its own (memory-mapped) avatar frames. Sessions are pinned by the SessionDirectory;
every few seconds this process renews the pins of its open sessions (a lease: if it dies,
their slots free up). When a round fails or comes back too late the session counts the
frames as lost, sends their audio again (streaming/session.py) and this link asks the
directory to move it to another replica; when none has room the session waits, visibly
(`waiting_for_replica`), until one has. Where the replicas run on CPUs this gateway keeps a
warm standby engine of its own that serves such sessions meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import ray

from actors.directory import LEASE_RENEW_S, get_directory
from actors.dispatch import Dispatcher
from actors.stages import STAGE_FAILURES
from ray_lipsync.config import Settings
from ray_lipsync.errors import AtCapacity, LipsyncError, StageUnavailable
from ray_lipsync.streaming.engine import AvatarCache, Engine, RoundResult
from ray_lipsync.streaming.features import Schedule
from ray_lipsync.streaming.local import new_clock
from ray_lipsync.streaming.pipeline import SessionRegistry
from ray_lipsync.streaming.playout import policy_for_new_session
from ray_lipsync.streaming.session import Session
from ray_lipsync.streaming.sources import warm_switches
from ray_lipsync.types import AudioPush

log = logging.getLogger(__name__)

DIRECTORY_TIMEOUT_S = 5.0  # a directory call slower than this: the directory is unavailable
WAITING_POLL_S = 2.0  # a waiting session's question to the directory: answered by then
RECOVERY_RETRY_S = 0.5  # a link whose directory call failed asks again after this


class RayLink:
    """SessionLink of one session: its pinned replica, through this process's dispatcher.

    When the replica fails a round the link recovers in one task: it asks the directory to
    move the session (or to confirm that the replica answers), then, if no replica has room,
    waits visibly for one. Meanwhile pushes go to this gateway's standby engine when it has
    one (`RayPipeline.standby`), else they fail and their frames show idle.
    """

    def __init__(self, session_id: str, backend: str, pipeline: "RayPipeline") -> None:
        self.session_id = session_id
        self.backend = backend
        self._pipeline = pipeline
        self.replica = ""
        self.replica_handle = None
        self.waiting = False
        self.session: Session | None = None  # told when `waiting` changes
        self._recovery: asyncio.Task | None = None

    @property
    def recovering(self) -> bool:
        return self._recovery is not None and not self._recovery.done()

    def attach(self, name: str, handle) -> None:
        self.replica, self.replica_handle = name, handle
        self._set_waiting(False)

    def _set_waiting(self, waiting: bool) -> None:
        if waiting != self.waiting:
            self.waiting = waiting
            if self.session is not None:
                self.session.link_state_changed()

    async def submit(self, push: AudioPush) -> RoundResult:
        if self.recovering:
            standby = self._pipeline.standby(self.backend)
            if standby is not None:
                (result,) = await standby.round([push])
                return result
            if self.waiting:
                raise StageUnavailable("no inference replica has room for this session yet")
            await asyncio.wait({self._recovery}, timeout=DIRECTORY_TIMEOUT_S)  # not to the failed one
        replica = self.replica
        try:
            return await self._pipeline.dispatcher.submit(self, push)
        except STAGE_FAILURES + (ray.exceptions.RayTaskError,) as exc:
            self._replica_failed(replica, exc)
            raise

    def _replica_failed(self, replica: str, exc: BaseException) -> None:
        if replica == self.replica and not self.recovering:
            log.warning("session %s: replica %s failed a round (%s)", self.session_id, replica,
                        type(exc).__name__)
            # its process is gone (not merely slow): the directory need not ping it again
            gone = isinstance(exc, ray.exceptions.RayActorError)
            self._recovery = asyncio.get_running_loop().create_task(self._recover(replica, gone))

    async def _recover(self, failed: str, gone: bool) -> None:
        """Until the session has a replica that answers: ask the directory to move it (it may
        be restarting itself), then, with no room anywhere, wait for one."""
        directory = self._pipeline.directory
        while self.session is None or not self.session.closed:
            try:
                moved = await asyncio.wait_for(directory.repin.remote(
                    self.session_id, failed, self._pipeline.gateway_id, gone), DIRECTORY_TIMEOUT_S)
                break
            except Exception:  # noqa: BLE001 - the directory is restarting: ask again
                log.warning("session %s: the directory does not answer; asking again", self.session_id)
                await asyncio.sleep(RECOVERY_RETRY_S)
        else:
            return
        if moved is None:
            return  # the replica answers: it stays
        name, handle = moved
        if handle is not None:
            if name != failed:
                log.warning("session %s re-pinned from %s to %s", self.session_id, failed, name)
            self.attach(name, handle)  # its rounds carry the session's epoch: nothing to replay
            return
        log.warning("session %s: replica %s is gone and no replica has room; waiting", self.session_id, failed)
        self._set_waiting(True)
        while self.waiting and (self.session is None or not self.session.closed):
            try:  # the directory answers as soon as the session has a replica, or after WAITING_POLL_S
                found = await asyncio.wait_for(directory.assignment.remote(self.session_id, WAITING_POLL_S),
                                               WAITING_POLL_S + DIRECTORY_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - restarting directory: ask again
                await asyncio.sleep(RECOVERY_RETRY_S)
                continue
            if found is not None and found[1] is not None:
                log.warning("session %s resumes on replica %s", self.session_id, found[0])
                self.attach(*found)

    async def interrupt(self, epoch: int, cut_frame: int) -> None:
        standby = self._pipeline.standby(self.backend)
        if standby is not None:
            await standby.interrupt(self.session_id, epoch, cut_frame)
        if self.waiting:
            return  # the next round carries the epoch
        try:
            await asyncio.wait_for(self.replica_handle.interrupt.remote(self.session_id, epoch, cut_frame),
                                   DIRECTORY_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the next round carries the epoch anyway
            log.warning("session %s: interrupt did not reach %s", self.session_id, self.replica)

    async def close(self) -> None:
        self._pipeline.forget(self.session_id)
        if self._recovery is not None:
            self._recovery.cancel()
        standby = self._pipeline.standby(self.backend)
        if standby is not None:
            await standby.close_session(self.session_id)
        calls = [self._pipeline.directory.unpin.remote(self.session_id)]
        if self.replica_handle is not None:
            calls.append(self.replica_handle.close_session.remote(self.session_id))
        await asyncio.gather(*(asyncio.wait_for(c, DIRECTORY_TIMEOUT_S) for c in calls), return_exceptions=True)


class RayPipeline:
    """Sessions served by the cluster's actors. Create with `await RayPipeline.connect(...)`."""

    def __init__(self, settings: Settings, schedule: Schedule = "streaming") -> None:
        self.settings = settings
        self.schedule = schedule
        self.directory = get_directory(settings)
        self.gateway_id = uuid.uuid4().hex[:12]
        self.dispatcher = Dispatcher(settings.pipeline.dispatch_tick_ms / 1000)
        self._registry = SessionRegistry()
        self._links: dict[str, RayLink] = {}
        self._avatars = AvatarCache(settings)
        self._standby: dict[str, Engine] = {}  # backend -> warm in-process engine (CPU backends)
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
            await pipeline._avatars.get(settings.avatar.name)
            await pipeline._start_standby(settings.backend, settings.avatar.name)
        except Exception:  # noqa: BLE001 - a session on it will say why
            log.warning("could not load the default avatar", exc_info=True)
        return pipeline

    def standby(self, backend: str) -> Engine | None:
        """This gateway's warm in-process engine for `backend`, if it keeps one: it serves a
        session whose replica failed until the session has a replica again."""
        return self._standby.get(backend)

    async def _start_standby(self, backend: str, avatar: str) -> None:
        """Build the standby engine of `backend` (when the settings want one) and load `avatar`
        into it, so a failover pays no start."""
        if not self.settings.pipeline.wants_standby(backend):
            return
        if backend not in self._standby:
            self._standby[backend] = await asyncio.to_thread(Engine, self.settings, backend, "standby")
        await self._standby[backend].prepare(avatar)

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

    async def create_session(self, avatar: str = "default", backend: str | None = None,
                             session_id: str | None = None) -> Session:
        backend = backend or self.settings.backend
        loaded = await self._avatars.get(avatar)
        await asyncio.to_thread(warm_switches, loaded)
        await self._start_standby(backend, loaded.name)
        session_id = session_id or uuid.uuid4().hex
        self._ensure_lease()
        self._pinning[session_id] = backend
        try:
            link, lookahead_ms = await self._pin(session_id, loaded.name, backend)
        finally:
            self._pinning.pop(session_id, None)
        session = Session(
            session_id, loaded, backend, link, new_clock(self.settings),
            max_queued_s=self.settings.pipeline.audio_buffer_s,
            lookahead_ms=lookahead_ms,
            playout=policy_for_new_session(self.settings.pipeline, self._registry),
            schedule=self.schedule,
        )
        link.session = session
        self._registry.add(session)
        self._links[session_id] = link
        return session

    async def _pin(self, session_id: str, avatar: str, backend: str) -> tuple[RayLink, int]:
        """Pin the new session to a replica that has loaded its avatar: (link, lookahead ms)."""
        wait = self.settings.pipeline.replica_wait_s + DIRECTORY_TIMEOUT_S
        for _ in range(2):
            name, replica = await self._directory_call("pin", session_id, backend, self.gateway_id,
                                                       timeout=wait)
            try:
                lookahead_ms = await asyncio.wait_for(replica.prepare.remote(avatar), wait)
            except Exception:  # noqa: BLE001 - it died since it was pinned: pin again, once
                await self._directory_call("unpin", session_id)
                await self._directory_call("suspect", name)
                continue
            link = RayLink(session_id, backend, self)
            link.attach(name, replica)
            return link, lookahead_ms
        raise AtCapacity("no inference replica can take the session right now; retry later")

    # -- leases --------------------------------------------------------------------------
    def _ensure_lease(self) -> None:
        if self._lease is None or self._lease.done():
            self._lease = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            pins: dict[str, tuple[str, str | None]] = {sid: (b, None) for sid, b in self._pinning.items()}
            # a waiting session names the replica it lost (a restarted directory rebuilds it)
            pins.update({sid: (link.backend, link.replica) for sid, link in self._links.items()})
            try:
                await asyncio.wait_for(self.directory.renew.remote(self.gateway_id, pins), DIRECTORY_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the directory restarts; the next renewal rebuilds
                log.warning("could not renew the session leases", exc_info=True)
            await asyncio.sleep(LEASE_RENEW_S)

    # -- sessions ------------------------------------------------------------------------
    def get(self, session_id: str) -> Session:
        return self._registry.get(session_id)

    def sessions(self) -> list[Session]:
        return self._registry.sessions()

    def forget(self, session_id: str) -> None:
        self._registry.forget(session_id)
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
        await self._registry.close_all()
