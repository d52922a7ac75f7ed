"""SessionDirectory: inference capacity, and the one place where a session is pinned.

One named, detached, restartable actor per settings *generation* (a hash of the settings, so
a redeploy with other settings never gets the actors of the old ones). It is the Ray shell of
`ray_lipsync.placement.Placement`, which decides everything (which replica serves a session,
waiting sessions, leases, how many replicas, which to remove; see its module doc). This actor
does what it decides and tells it what it observes:

- it starts the feature batchers and inference replicas (a replica asks `num_gpus` where GPUs
  are wanted, so a pending replica is what makes the Ray autoscaler add a GPU node), and kills
  the ones placement removes;
- it pings replicas: one that does not answer is down (Ray restarts it), one that answers again
  is up, one that died for good is forgotten (its sessions wait; a replacement starts); a
  replica that failed in its constructor holds its backend for `BACKEND_RETRY_S` (503, not 500);
- after a restart it adopts this generation's named replicas (as down until they answer);
  the gateways' lease renewals (every `LEASE_RENEW_S`) rebuild the pins;
- a new session waits at most `pipeline.replica_wait_s` for capacity being added (then 503 +
  Retry-After); a session whose replica failed and finds no room *waits*: `repin` answers
  `(WAITING, None)`, and the gateway polls `assignment` until it has a replica again;
- a directory no gateway has talked to for `ORPHAN_S` removes its actors and itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time

import ray

from actors.runtime import on_head_node
from actors.stages import RESTARTABLE, ActorUnavailableError, FeatureBatcherActor, InferenceReplica
from ray_lipsync.config import Settings
from ray_lipsync.placement import (BACKEND_RETRY_S, Assigned, Move, Placement, Refused, Replica,
                                   Waiting)

log = logging.getLogger(__name__)

__all__ = ["BACKEND_RETRY_S", "LEASE_RENEW_S", "WAITING", "SessionDirectory", "generation_of",
           "get_directory"]

LEASE_RENEW_S = 2.0
ORPHAN_S = 120.0
MAINTAIN_S = 1.0
PING_TIMEOUT_S = 0.3  # a live replica answers a ping in milliseconds, even while it renders
WAITING = "waiting"  # `repin`/`assignment` answer (WAITING, None) for a session without a replica

Where = tuple[str, object]  # (replica name, its actor handle), or (WAITING, None)


def generation_of(settings: Settings) -> str:
    """A short hash naming the actors made for these settings."""
    return hashlib.sha1(settings.model_dump_json().encode()).hexdigest()[:10]


@ray.remote(num_cpus=0, **{**RESTARTABLE, "max_task_retries": -1})
class SessionDirectory:
    """Public methods (all async but `pid`):

    - `pin(session, backend, gateway) -> (replica, handle)`: a new session's replica; raises
      AtCapacity / BackendUnavailable.
    - `repin(session, failed, gateway) -> (replica, handle) | (WAITING, None) | None`: `failed`
      did not serve a round. None: it answers, the session stays; (replica, handle): the
      session's replica (moved, or moved already); (WAITING, None): no replica has room, poll
      `assignment`.
    - `assignment(session, wait_s=0) -> (replica, handle) | (WAITING, None) | None`: where the
      session is (while it waits, waiting up to `wait_s` for a replica); None: unknown here
      (the directory restarted and no renewal named it yet).
    - `unpin(session)`, `renew(gateway, {session: (backend, replica | None)})`,
      `suspect(replica) -> down?`, `warm(backend, wait_s) -> ready?`, `replicas()`,
      `replica_stats()`, `health()`, `pid()`.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._p = settings.pipeline
        self._ns = settings.pipeline.namespace
        self._gen = generation_of(settings)
        self._placement = Placement(settings.pipeline, BACKEND_RETRY_S)
        self._handles: dict[str, object] = {}  # replica name -> actor handle
        self._batchers: dict[str, object] = {}
        self._changed = asyncio.Condition()
        self._last_seen = time.monotonic()
        self._seq = 0
        self._upkeep: asyncio.Task | None = None
        self._adopt()

    def _ensure_upkeep(self) -> None:
        """Start the upkeep loop (from the actor's event loop, on its first call)."""
        if self._upkeep is None or self._upkeep.done():
            self._upkeep = asyncio.get_running_loop().create_task(self._maintain())

    # -- actors ---------------------------------------------------------------------------
    def _adopt(self) -> None:
        """After a restart: take back this generation's replicas (by name), as down until they
        answer a ping."""
        prefix = f"replica-{self._gen}-"
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name, namespace = entry["name"], entry["namespace"]
            if namespace != self._ns or not name.startswith(prefix):
                continue
            try:
                handle = ray.get_actor(name, namespace=self._ns)
            except ValueError:
                continue
            backend, _, seq = name[len(prefix):].rpartition("-")
            gpu = backend.endswith("-gpu")
            backend = backend.removesuffix("-gpu").removesuffix("-cpu")
            self._placement.add_replica(name, backend, gpu, time.monotonic(), state="down")
            self._handles[name] = handle
            self._seq = max(self._seq, int(seq) + 1 if seq.isdigit() else 0)
        if self._handles:
            log.info("directory %s adopted %d replicas", self._gen, len(self._handles))

    def _want_gpu(self) -> bool:
        device = self._p.replica_device
        if device != "auto":
            return device == "gpu"
        return ray.cluster_resources().get("GPU", 0) > 0

    def _batcher(self, backend: str) -> object:
        if backend not in self._batchers:
            options: dict = {"num_cpus": 0}  # light: CPU is budgeted by the replicas
            if backend == "musetalk" and self._want_gpu():
                options["num_gpus"] = self._p.batcher_gpus  # on a GPU node
            else:
                options.update(on_head_node())
            self._batchers[backend] = FeatureBatcherActor.options(
                name=f"batcher-{self._gen}-{backend}", namespace=self._ns, lifetime="detached",
                get_if_exists=True, **options,
            ).remote(self._settings, backend)
        return self._batchers[backend]

    def _start_replica(self, backend: str, gpu: bool) -> None:
        name = f"replica-{self._gen}-{backend}-{'gpu' if gpu else 'cpu'}-{self._seq}"
        self._seq += 1
        if gpu:
            share = self._p.batcher_gpus if backend == "musetalk" else 0.0
            options = {"num_gpus": 1.0 - share, "num_cpus": 1}
        else:
            options = {"num_cpus": self._p.replica_num_cpus}
        handle = InferenceReplica.options(
            name=name, namespace=self._ns, lifetime="detached", **options,
        ).remote(self._settings, backend, name, self._gen, self._batcher(backend))
        self._handles[name] = handle
        self._placement.add_replica(name, backend, gpu, time.monotonic())
        asyncio.get_running_loop().create_task(self._await_ready(name, handle))
        log.info("starting %s (%s)", name, options)

    async def _await_ready(self, name: str, handle: object) -> None:
        """A new replica takes sessions once its constructor ran (it may wait for a node)."""
        try:
            await handle.ready.remote()  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - its constructor failed
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"
            self._handles.pop(name, None)
            self._moved(self._placement.replica_failed_to_start(name, reason, time.monotonic()))
            log.error("replica %s failed to start: %s", name, exc)
        else:
            self._moved(self._placement.replica_ready(name, time.monotonic()))
        await self._notify()

    def _kill(self, name: str) -> None:
        handle = self._handles.pop(name, None)
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        log.info("removed %s", name)

    def _scale(self, backend: str) -> None:
        """Start the replicas placement wants for `backend` (it drains CPU ones once GPUs are
        wanted)."""
        start = self._placement.scale(backend, self._want_gpu(), time.monotonic())
        for name in start.drained:
            log.info("draining %s: GPU replicas replace it", name)
        for _ in range(start.count):
            self._start_replica(backend, start.gpu)

    def _moved(self, moves: list[Move]) -> None:
        for move in moves:
            log.warning("session %s (waiting) assigned to %s", move.session_id, move.replica)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_for_change(self, timeout: float) -> None:
        """Until a replica or assignment changes or `timeout` passes (hold `self._changed`)."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _answer(self, where: Assigned | Waiting | None) -> Where | None:
        if isinstance(where, Assigned):
            return where.replica, self._handles.get(where.replica)
        return (WAITING, None) if isinstance(where, Waiting) else None

    # -- pinning (the one place where a session is pinned) -------------------------------
    async def pin(self, session_id: str, backend: str, gateway: str) -> tuple[str, object]:
        """Pin a new session to the least-loaded ready replica with room, waiting up to
        `replica_wait_s` for capacity being added (AtCapacity / BackendUnavailable after)."""
        self._touch(gateway)
        deadline = time.monotonic() + self._p.replica_wait_s
        async with self._changed:
            while True:
                self._scale(backend)  # first: it drains CPU replicas once GPUs are wanted
                decision = self._placement.place(session_id, backend, gateway, time.monotonic())
                if isinstance(decision, Assigned):
                    self._scale(backend)
                    return decision.replica, self._handles[decision.replica]
                remaining = deadline - time.monotonic()
                if isinstance(decision, Refused) or remaining <= 0:
                    raise decision.error
                await self._wait_for_change(remaining)

    async def suspect(self, name: str) -> bool:
        """A caller saw replica `name` fail: unless it answers a ping, it is marked down (no
        new sessions) until it answers again. Whether it is down."""
        replica = self._placement.replicas.get(name)
        if replica is None:
            return True
        if replica.state in ("ready", "draining"):
            if await self._responds(replica):
                return False
            if self._placement.mark_down(name):
                log.warning("replica %s does not answer; moving its sessions", name)
        return True

    async def repin(self, session_id: str, failed: str, gateway: str, unresponsive: bool = False) -> Where | None:
        """`failed` did not serve a round of the session. None: it answers a ping, the session
        stays. Else it is marked down and the session goes to a ready replica with room:
        (replica, handle); or, with no room, it waits: (WAITING, None) (poll `assignment`).
        A session already moved or waiting gets that answer without a ping; so does a caller
        that found `failed` `unresponsive` itself (its process died, or its ping timed out)."""
        self._touch(gateway)
        where = self._placement.assignment(session_id)
        current = self._placement.replicas.get(where.replica) if isinstance(where, Assigned) else None
        if isinstance(where, Waiting) or (
                current is not None and current.name != failed and current.state in ("ready", "draining")):
            return self._answer(where)  # waiting already, or moved already
        failed_replica = self._placement.replicas.get(failed)
        if unresponsive:
            if self._placement.mark_down(failed):
                log.warning("replica %s does not answer its gateway; moving its sessions", failed)
        elif not await self.suspect(failed):
            return None
        backend = failed_replica.backend if failed_replica else self._settings.backend
        where = self._placement.reassign(session_id, failed, gateway, backend, time.monotonic())
        if isinstance(where, Waiting):
            log.warning("session %s waits for a %s replica (position %d)", session_id, where.backend,
                        where.position)
        self._scale(backend)
        await self._notify()
        return self._answer(where)

    async def assignment(self, session_id: str, wait_s: float = 0.0) -> Where | None:
        """Where the session is: (replica, handle); (WAITING, None) while it waits (answered
        once it has a replica or `wait_s` passed); None: unknown here (this directory restarted
        and no lease renewal named the session yet; the next renewal rebuilds it)."""
        self._ensure_upkeep()
        deadline = time.monotonic() + wait_s
        async with self._changed:
            while True:
                where = self._placement.assignment(session_id)
                remaining = deadline - time.monotonic()
                if not isinstance(where, Waiting) or remaining <= 0:
                    return self._answer(where)
                await self._wait_for_change(remaining)

    async def unpin(self, session_id: str) -> None:
        self._moved(self._placement.unpin(session_id, time.monotonic()))
        await self._notify()

    async def renew(self, gateway: str, sessions: dict[str, tuple[str, str | None]]) -> None:
        """A gateway's lease: its open sessions as {session: (backend, replica)} (replica None:
        still being created; a waiting session names its last replica). Rebuilds what this
        directory does not know (after its restart); the gateway's other sessions are released."""
        self._touch(gateway)
        moves = self._placement.renew(gateway, sessions, time.monotonic())
        self._moved(moves)
        if moves or self._placement.waiting():
            for backend in self._placement.backends():
                self._scale(backend)
        await self._notify()

    def _touch(self, gateway: str) -> None:
        self._ensure_upkeep()
        now = time.monotonic()
        self._placement.touch(gateway, now)
        self._last_seen = now

    # -- upkeep ------------------------------------------------------------------------------
    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTAIN_S)
            try:
                await self._maintain_once()
            except Exception:  # noqa: BLE001 - keep the loop alive
                log.exception("directory upkeep failed")

    async def _maintain_once(self) -> None:
        placement = self._placement
        expired, moves = placement.expire(time.monotonic())
        for gateway, lost in expired.items():
            if lost:
                log.warning("gateway %s stopped renewing; freed %d slots", gateway, lost)
        self._moved(moves)
        down = [r for r in placement.replicas.values() if r.state == "down"]
        for replica, ok in zip(down, await asyncio.gather(*(self._responds(r) for r in down))):
            if ok and replica.state == "down":
                log.info("replica %s answers again", replica.name)
                self._moved(placement.replica_up(replica.name, time.monotonic()))
        self._moved(placement.assign_waiting(time.monotonic()))
        for name in placement.retire(time.monotonic()):
            self._kill(name)
        for backend in placement.backends():
            self._scale(backend)
        await self._notify()
        if not placement.sessions() and time.monotonic() - self._last_seen > ORPHAN_S:
            self._retire()

    def _retire(self) -> None:
        """No gateway of this generation is left: remove its actors, then this directory."""
        log.info("directory %s has no gateways left; removing its actors", self._gen)
        for name in list(self._handles):
            self._kill(name)
        for handle in self._batchers.values():
            ray.kill(handle, no_restart=True)
        ray.actor.exit_actor()

    async def _responds(self, replica: Replica) -> bool:
        """Whether `replica` answers a ping; one that died for good (killed without restart,
        or its restarts exhausted) is forgotten: its sessions wait and a replacement starts."""
        handle = self._handles.get(replica.name)
        try:
            await asyncio.wait_for(handle.ping.remote(), PING_TIMEOUT_S)  # type: ignore[attr-defined]
            return True
        except (ActorUnavailableError, asyncio.TimeoutError):
            return False  # restarting, or its node is not reachable (yet)
        except Exception:  # noqa: BLE001 - ActorDiedError: gone for good
            if self._handles.pop(replica.name, None) is not None:
                log.warning("replica %s died for good; its sessions move", replica.name)
                self._moved(self._placement.replica_gone(replica.name, time.monotonic()))
                self._scale(replica.backend)
            return False

    # -- introspection ------------------------------------------------------------------------
    def _info(self, replica: Replica) -> dict:
        """A replica's state and session count, and how many sessions of its backend wait."""
        return {**replica.info(), "waiting": len(self._placement.waiting(replica.backend))}

    async def replicas(self) -> list[dict]:
        """Replicas with state, pinned session counts and waiting sessions of their backend."""
        return [self._info(r) for r in self._placement.replicas.values()]

    async def replica_stats(self) -> list[dict]:
        live = [r for r in self._placement.replicas.values() if r.state in ("ready", "draining")]

        async def one(r: Replica) -> dict:
            handle = self._handles.get(r.name)
            try:
                stats = await asyncio.wait_for(handle.stats.remote(), PING_TIMEOUT_S)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                return {**self._info(r), "error": "unreachable"}
            return {**self._info(r), **stats}

        return list(await asyncio.gather(*(one(r) for r in live)))

    async def health(self) -> dict:
        """What is unavailable right now: {"degraded": [stage names], "waiting": sessions
        waiting for a replica}."""
        degraded = []
        stats = await self.replica_stats()
        for s in stats:
            if "error" in s:
                degraded.append(f"replica {s['replica']}")
            else:
                if s.get("batcher_down"):
                    degraded.append(f"feature batcher ({s['backend']})")
                if s.get("compositor_down"):
                    degraded.append(f"compositor ({s['replica']})")
        degraded += [f"replica {r.name}" for r in self._placement.replicas.values() if r.state == "down"]
        degraded += [f"{b} backend (failed to start)" for b in self._placement.held_backends(time.monotonic())]
        waiting = len(self._placement.waiting())
        if waiting:
            degraded.append(f"{waiting} session(s) waiting for an inference replica")
        return {"degraded": sorted(set(degraded)), "waiting": waiting}

    def pid(self) -> int:
        return os.getpid()

    async def warm(self, backend: str, wait_s: float = 0.0) -> bool:
        """Start the replicas `backend` wants before its first session asks (no cold start);
        wait up to `wait_s` for one to be ready. True when one is."""
        self._ensure_upkeep()
        deadline = time.monotonic() + wait_s
        async with self._changed:
            self._scale(backend)
            while not self._placement.free(backend):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._placement.starting(backend):
                    return False
                await self._wait_for_change(remaining)
            return True


def get_directory(settings: Settings):
    """The SessionDirectory of these settings (created by whoever asks first)."""
    return SessionDirectory.options(
        name=f"lipsync-directory-{generation_of(settings)}", namespace=settings.pipeline.namespace,
        lifetime="detached", get_if_exists=True, **on_head_node(),
    ).remote(settings)
