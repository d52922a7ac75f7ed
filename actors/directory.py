"""SessionDirectory: inference capacity, and the one place where a session is pinned.

One named, detached, restartable actor per settings *generation* (a hash of the settings, so
a redeploy with other settings never gets the actors of the old ones). It starts the
feature batchers and inference replicas, pins every session to the least-loaded ready replica
with a free slot, and follows demand:

- **Leases.** Gateways renew their sessions' pins every `LEASE_RENEW_S`; a gateway silent
  for `pipeline.lease_s` (it died) loses its pins, so its slots free up. The renewals also
  rebuild the pins after the directory itself restarted.
- **Scale.** Replicas wanted = ceil((pinned sessions + 1) / sessions_per_replica), within
  `pipeline.min_replicas..max_replicas`: the +1 keeps a slot ready for the next session. A
  replica asks `num_gpus` where GPUs are wanted (so a pending replica is what makes the Ray
  autoscaler add a GPU node); in `auto` mode CPU replicas are drained (no new pins, removed
  once empty) as soon as the cluster has GPUs. Idle replicas above the wanted count are
  removed after `pipeline.idle_replica_s`.
- **Failures.** A replica that failed in its constructor is forgotten and its backend is
  refused for `BACKEND_RETRY_S` (503, not 500); one that cannot be placed is never pinned
  and a session waits at most `pipeline.replica_wait_s` for capacity (then 503 +
  Retry-After). A replica that does not answer is marked down and its sessions move to
  ready replicas as their gateways report it (`repin`); Ray restarts it meanwhile.
- **Stale generations.** A directory no gateway has talked to for `ORPHAN_S` removes its
  actors and itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import ray

from actors.runtime import on_head_node
from actors.stages import RESTARTABLE, ActorUnavailableError, FeatureBatcherActor, InferenceReplica
from ray_lipsync.config import Settings
from ray_lipsync.errors import AtCapacity, BackendUnavailable

log = logging.getLogger(__name__)

LEASE_RENEW_S = 2.0
BACKEND_RETRY_S = 30.0
ORPHAN_S = 120.0
MAINTAIN_S = 1.0
PING_TIMEOUT_S = 0.3  # a live replica answers a ping in milliseconds, even while it renders

State = Literal["starting", "ready", "down", "draining"]


def generation_of(settings: Settings) -> str:
    """A short hash naming the actors made for these settings."""
    return hashlib.sha1(settings.model_dump_json().encode()).hexdigest()[:10]


@dataclass
class _Replica:
    name: str
    backend: str
    gpu: bool
    handle: object
    state: State = "starting"
    sessions: set[str] = field(default_factory=set)
    idle_since: float = field(default_factory=time.monotonic)

    def info(self) -> dict:
        return {"replica": self.name, "backend": self.backend, "resources": "gpu" if self.gpu else "cpu",
                "state": self.state, "sessions": len(self.sessions)}


@ray.remote(num_cpus=0, **{**RESTARTABLE, "max_task_retries": -1})
class SessionDirectory:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._p = settings.pipeline
        self._ns = settings.pipeline.namespace
        self._gen = generation_of(settings)
        self._replicas: dict[str, _Replica] = {}
        self._pins: dict[str, str] = {}  # session -> replica name
        self._owner: dict[str, str] = {}  # session -> gateway
        self._leases: dict[str, float] = {}  # gateway -> last renewal (monotonic)
        self._batchers: dict[str, object] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # backend -> (until, reason)
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
        """After a restart: take back this generation's replicas and batchers (by name)."""
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
            replica = _Replica(name, backend, gpu, handle, state="down")
            self._replicas[name] = replica
            self._seq = max(self._seq, int(seq) + 1 if seq.isdigit() else 0)
        if self._replicas:
            log.info("directory %s adopted %d replicas", self._gen, len(self._replicas))

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

    def _start_replica(self, backend: str, gpu: bool) -> _Replica:
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
        replica = _Replica(name, backend, gpu, handle)
        self._replicas[name] = replica
        asyncio.get_running_loop().create_task(self._await_ready(replica))
        log.info("starting %s (%s)", name, options)
        return replica

    async def _await_ready(self, replica: _Replica) -> None:
        """A new replica becomes pinnable once its constructor ran (it may wait for a node)."""
        try:
            await replica.handle.ready.remote()  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - its constructor failed
            self._replicas.pop(replica.name, None)
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"
            self._failed[replica.backend] = (time.monotonic() + BACKEND_RETRY_S, reason)
            log.error("replica %s failed to start: %s", replica.name, exc)
        else:
            if replica.state == "starting":
                replica.state = "ready"
        async with self._changed:
            self._changed.notify_all()

    def _kill(self, replica: _Replica) -> None:
        self._replicas.pop(replica.name, None)
        try:
            ray.kill(replica.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        log.info("removed %s", replica.name)

    # -- capacity ---------------------------------------------------------------------------
    def _serving(self, backend: str) -> list[_Replica]:
        """Replicas that count as capacity (ready, starting, or restarting)."""
        return [r for r in self._replicas.values() if r.backend == backend and r.state != "draining"]

    def _scale(self, backend: str) -> None:
        """Start replicas so that the sessions of `backend` (+1) have slots; drain CPU ones
        once GPUs are wanted."""
        if backend in self._failed and self._failed[backend][0] > time.monotonic():
            return
        gpu = self._want_gpu()
        for r in self._serving(backend):
            if r.gpu != gpu and gpu:
                r.state = "draining"
                log.info("draining %s: GPU replicas replace it", r.name)
        cap = self._p.sessions_per_replica
        sessions = sum(len(r.sessions) for r in self._replicas.values() if r.backend == backend)
        wanted = min(max(math.ceil((sessions + 1) / cap), self._p.min_replicas), self._p.max_replicas)
        for _ in range(wanted - len(self._serving(backend))):
            self._start_replica(backend, gpu)

    def _free(self, backend: str) -> list[_Replica]:
        cap = self._p.sessions_per_replica
        return [r for r in self._replicas.values()
                if r.backend == backend and r.state == "ready" and len(r.sessions) < cap]

    def _check_backend(self, backend: str) -> None:
        failed = self._failed.get(backend)
        if failed and failed[0] > time.monotonic():
            raise BackendUnavailable(
                f"the {backend} backend could not start on this server (the operator finds why "
                "in the server log); retry later or use another backend")

    # -- pinning (the one place where a session is pinned) -------------------------------
    async def pin(self, session_id: str, backend: str, gateway: str) -> tuple[str, object]:
        """Pin a new session to the least-loaded ready replica with room, waiting up to
        `replica_wait_s` for capacity being added (AtCapacity / BackendUnavailable after)."""
        self._touch(gateway)
        deadline = time.monotonic() + self._p.replica_wait_s
        async with self._changed:
            while True:
                self._check_backend(backend)
                self._scale(backend)  # first: it drains CPU replicas once GPUs are wanted
                free = self._free(backend)
                if free:
                    replica = min(free, key=lambda r: (len(r.sessions), r.name))
                    self._assign(session_id, replica, gateway)
                    self._scale(backend)
                    return replica.name, replica.handle
                self._scale(backend)
                coming = any(r.state in ("starting", "down") for r in self._serving(backend))
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not coming:  # no capacity is on its way: do not wait
                    total = self._p.sessions_per_replica * len(self._serving(backend))
                    raise AtCapacity(f"all {total} session slots of the {backend} replicas are in "
                                     "use or still starting; retry later")
                await self._wait_for_change(remaining)

    async def _wait_for_change(self, timeout: float) -> None:
        """Until a replica changes state or `timeout` passes (hold `self._changed`)."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _assign(self, session_id: str, replica: _Replica, gateway: str) -> None:
        old = self._pins.get(session_id)
        if old in self._replicas:
            self._replicas[old].sessions.discard(session_id)
        replica.sessions.add(session_id)
        self._pins[session_id] = replica.name
        self._owner[session_id] = gateway

    async def suspect(self, name: str) -> bool:
        """A caller saw replica `name` fail: unless it answers a ping, it is marked down (no
        pins) until it answers again. Whether it is down."""
        replica = self._replicas.get(name)
        if replica is None:
            return True
        if replica.state in ("ready", "draining"):
            if await self._responds(replica):
                return False
            if name in self._replicas:
                replica.state = "down"
            log.warning("replica %s does not answer; moving its sessions", name)
        return True

    async def repin(self, session_id: str, failed: str, gateway: str) -> tuple[str, object] | None:
        """`failed` did not serve a round of the session: if it does not answer a ping, mark it
        down and move the session to a ready replica with room. None: the session stays."""
        self._touch(gateway)
        replica = self._replicas.get(failed)
        if not await self.suspect(failed):
            return None
        current = self._replicas.get(self._pins.get(session_id, ""))
        if current is not None and current.name != failed and current.state == "ready":
            return current.name, current.handle  # moved already
        backend = replica.backend if replica else self._settings.backend
        async with self._changed:
            free = self._free(backend)
            if not free:
                self._scale(backend)
                return None  # nowhere to go yet: it stays; Ray restarts the replica
            target = min(free, key=lambda r: (len(r.sessions), r.name))
            self._assign(session_id, target, gateway)
            self._scale(backend)
            return target.name, target.handle

    async def unpin(self, session_id: str) -> None:
        name = self._pins.pop(session_id, None)
        self._owner.pop(session_id, None)
        if name in self._replicas:
            replica = self._replicas[name]
            replica.sessions.discard(session_id)
            if not replica.sessions:
                replica.idle_since = time.monotonic()
        async with self._changed:
            self._changed.notify_all()

    async def renew(self, gateway: str, sessions: dict[str, tuple[str, str | None]]) -> None:
        """A gateway's lease: its open sessions as {session: (backend, replica)} (replica None:
        still being created); the gateway's other pins are released."""
        self._touch(gateway)
        for session_id, (backend, name) in sessions.items():
            if name is None or self._pins.get(session_id) == name:
                continue
            replica = self._replicas.get(name)
            if replica is not None:  # after a directory restart: rebuild the pin
                self._assign(session_id, replica, gateway)
        for session_id in [s for s, g in self._owner.items() if g == gateway and s not in sessions]:
            await self.unpin(session_id)

    def _touch(self, gateway: str) -> None:
        self._ensure_upkeep()
        now = time.monotonic()
        self._leases[gateway] = now
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
        now = time.monotonic()
        for gateway, renewed in list(self._leases.items()):
            if now - renewed > self._p.lease_s:
                del self._leases[gateway]
                lost = [s for s, g in self._owner.items() if g == gateway]
                for session_id in lost:
                    await self.unpin(session_id)
                if lost:
                    log.warning("gateway %s stopped renewing; freed %d slots", gateway, len(lost))
        down = [r for r in self._replicas.values() if r.state == "down"]
        for replica, ok in zip(down, await asyncio.gather(*(self._responds(r) for r in down))):
            if ok and replica.state == "down":
                replica.state = "ready"
                log.info("replica %s answers again", replica.name)
        for replica in list(self._replicas.values()):
            if replica.state == "draining" and not replica.sessions:
                self._kill(replica)
        for backend in {r.backend for r in self._replicas.values()}:
            self._scale_down(backend, now)
        async with self._changed:
            self._changed.notify_all()
        if not self._pins and now - self._last_seen > ORPHAN_S:
            self._retire()

    def _scale_down(self, backend: str, now: float) -> None:
        cap = self._p.sessions_per_replica
        serving = self._serving(backend)
        sessions = sum(len(r.sessions) for r in serving)
        wanted = max(math.ceil((sessions + 1) / cap), self._p.min_replicas)
        idle = sorted((r for r in serving if not r.sessions and r.state == "ready"
                       and now - r.idle_since > self._p.idle_replica_s), key=lambda r: r.name)
        for replica in idle[: max(0, len(serving) - wanted)]:
            self._kill(replica)

    def _retire(self) -> None:
        """No gateway of this generation is left: remove its actors, then this directory."""
        log.info("directory %s has no gateways left; removing its actors", self._gen)
        for replica in list(self._replicas.values()):
            self._kill(replica)
        for handle in self._batchers.values():
            ray.kill(handle, no_restart=True)
        ray.actor.exit_actor()

    async def _responds(self, replica: _Replica) -> bool:
        """Whether `replica` answers a ping; one that died for good (killed without restart,
        or its restarts exhausted) is forgotten, so a replacement starts."""
        try:
            await asyncio.wait_for(replica.handle.ping.remote(), PING_TIMEOUT_S)  # type: ignore[attr-defined]
            return True
        except (ActorUnavailableError, asyncio.TimeoutError):
            return False  # restarting, or its node is not reachable (yet)
        except Exception:  # noqa: BLE001 - ActorDiedError: gone for good
            if self._replicas.pop(replica.name, None) is not None:
                log.warning("replica %s died for good; its sessions move", replica.name)
                self._scale(replica.backend)
            return False

    # -- introspection ------------------------------------------------------------------------
    async def replicas(self) -> list[dict]:
        """Replicas with state and pinned session counts (metrics, health, tests)."""
        return [r.info() for r in self._replicas.values()]

    async def replica_stats(self) -> list[dict]:
        live = [r for r in self._replicas.values() if r.state in ("ready", "draining")]

        async def one(r: _Replica) -> dict:
            try:
                stats = await asyncio.wait_for(r.handle.stats.remote(), PING_TIMEOUT_S)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                return {**r.info(), "error": "unreachable"}
            return {**r.info(), **stats}

        return list(await asyncio.gather(*(one(r) for r in live)))

    async def health(self) -> dict:
        """What is unavailable right now: {"degraded": [stage names]}."""
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
        degraded += [f"replica {r.name}" for r in self._replicas.values() if r.state == "down"]
        now = time.monotonic()
        degraded += [f"{b} backend (failed to start)" for b, (until, _) in self._failed.items() if until > now]
        return {"degraded": sorted(set(degraded))}

    def pid(self) -> int:
        return os.getpid()

    async def warm(self, backend: str, wait_s: float = 0.0) -> bool:
        """Start the replicas `backend` wants before its first session asks (no cold start);
        wait up to `wait_s` for one to be ready. True when one is."""
        self._ensure_upkeep()
        deadline = time.monotonic() + wait_s
        async with self._changed:
            self._scale(backend)
            while not self._free(backend):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not any(r.state == "starting" for r in self._serving(backend)):
                    return False
                await self._wait_for_change(remaining)
            return True


def get_directory(settings: Settings):
    """The SessionDirectory of these settings (created by whoever asks first)."""
    return SessionDirectory.options(
        name=f"lipsync-directory-{generation_of(settings)}", namespace=settings.pipeline.namespace,
        lifetime="detached", get_if_exists=True, **on_head_node(),
    ).remote(settings)
