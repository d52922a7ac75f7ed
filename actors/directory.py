"""SessionDirectory: creates the pipeline actors, pins sessions to replicas, re-pins on failure.

One named, detached actor per cluster (namespace settings.pipeline.namespace). Replicas:
one per GPU (`num_gpus=1`) when the cluster has GPUs, else `pipeline.cpu_replicas` CPU
replicas. Every session is pinned at creation to the least-loaded live replica with a free
slot (`pipeline.sessions_per_replica`); when a replica dies its sessions are re-pinned to live
ones and a replacement replica is started.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.stages import CompositorActor, FeatureBatcherActor, InferenceReplica
from ray_lipsync.config import Settings
from ray_lipsync.errors import AtCapacity

log = logging.getLogger(__name__)

DIRECTORY_NAME = "lipsync-directory"


@dataclass
class _Replica:
    name: str
    backend: str
    handle: object
    sessions: set[str] = field(default_factory=set)
    alive: bool = True


@ray.remote(num_cpus=0)
class SessionDirectory:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._ns = settings.pipeline.namespace
        self._replicas: dict[str, _Replica] = {}
        self._pins: dict[str, str] = {}  # session -> replica name
        self._batchers: dict[str, object] = {}
        self._compositors: dict[str, object] = {}
        self._ids = itertools.count()
        self._lock = asyncio.Lock()

    # -- actors -------------------------------------------------------------------------
    def _gpus(self) -> int:
        return int(ray.cluster_resources().get("GPU", 0))

    def _start_replica(self, backend: str) -> _Replica:
        name = f"replica-{backend}-{next(self._ids)}"
        if self._gpus():
            options = {"num_gpus": 1, "num_cpus": 1}
        else:
            options = {"num_cpus": self._settings.pipeline.replica_num_cpus}
        handle = InferenceReplica.options(name=name, namespace=self._ns, lifetime="detached", **options).remote(
            self._settings, backend, name
        )
        replica = _Replica(name, backend, handle)
        self._replicas[name] = replica
        log.info("started %s (%s)", name, options)
        return replica

    def _target_replicas(self) -> int:
        return self._gpus() or self._settings.pipeline.cpu_replicas

    def _live(self, backend: str) -> list[_Replica]:
        return [r for r in self._replicas.values() if r.alive and r.backend == backend]

    def _ensure_replicas(self, backend: str) -> None:
        while len(self._live(backend)) < self._target_replicas():
            self._start_replica(backend)

    async def batcher(self, backend: str) -> object:
        """The feature batcher actor of `backend` (started on first use)."""
        if backend not in self._batchers:
            options: dict = {"num_cpus": 0}  # light: CPU is budgeted by the replicas
            if backend == "musetalk" and self._gpus():
                options["num_gpus"] = 0.1  # shares a GPU with a replica
            self._batchers[backend] = FeatureBatcherActor.options(
                name=f"batcher-{backend}", namespace=self._ns, lifetime="detached", **options
            ).remote(self._settings, backend)
        return self._batchers[backend]

    async def compositor(self, node_id: str) -> object:
        """The compositor on `node_id`, so full frames never cross nodes."""
        if node_id not in self._compositors:
            self._compositors[node_id] = CompositorActor.options(
                name=f"compositor-{node_id[:16]}",
                namespace=self._ns,
                lifetime="detached",
                num_cpus=0,  # light; pinned to its node by affinity
                # hard: the caller runs on node_id, and a soft affinity was seen to spill elsewhere
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self._settings)
        return self._compositors[node_id]

    # -- pinning ------------------------------------------------------------------------
    async def pin(self, session_id: str, backend: str) -> tuple[str, object]:
        """Pin a new session to the least-loaded live replica with room (AtCapacity if none)."""
        async with self._lock:
            self._ensure_replicas(backend)
            cap = self._settings.pipeline.sessions_per_replica
            free = [r for r in self._live(backend) if len(r.sessions) < cap]
            if not free:
                total = cap * len(self._live(backend))
                raise AtCapacity(f"all {total} session slots of the {backend} replicas are in use; retry later")
            replica = min(free, key=lambda r: (len(r.sessions), r.name))
            replica.sessions.add(session_id)
            self._pins[session_id] = replica.name
            return replica.name, replica.handle

    async def repin(self, session_id: str, dead: str) -> tuple[str, object]:
        """`dead` failed: mark it, start a replacement, move the session to a live replica."""
        async with self._lock:
            replica = self._replicas.get(dead)
            if replica is not None and replica.alive and not await self._responds(replica):
                replica.alive = False
                log.warning("replica %s is dead; re-pinning its %d sessions", dead, len(replica.sessions))
            current = self._pins.get(session_id)
            if current is not None and current != dead and self._replicas[current].alive:
                return current, self._replicas[current].handle  # already moved
            backend = replica.backend if replica else self._settings.backend
            if replica is not None:
                replica.sessions.discard(session_id)
            warm = self._live(backend)  # running replicas first: a new one needs seconds to start
            self._ensure_replicas(backend)
            target = min(warm or self._live(backend), key=lambda r: (len(r.sessions), r.name))
            target.sessions.add(session_id)
            self._pins[session_id] = target.name
            return target.name, target.handle

    async def _responds(self, replica: _Replica) -> bool:
        try:
            await asyncio.wait_for(replica.handle.ping.remote(), timeout=2.0)  # type: ignore[attr-defined]
            return True
        except Exception:
            return False

    async def unpin(self, session_id: str) -> None:
        name = self._pins.pop(session_id, None)
        if name in self._replicas:
            self._replicas[name].sessions.discard(session_id)

    async def replicas(self) -> list[dict]:
        """Replicas with their pinned session counts (for metrics and tests)."""
        return [
            {"replica": r.name, "backend": r.backend, "alive": r.alive, "sessions": len(r.sessions)}
            for r in self._replicas.values()
        ]

    async def replica_stats(self) -> list[dict]:
        out = []
        for r in self._replicas.values():
            if r.alive:
                try:
                    out.append(await asyncio.wait_for(r.handle.stats.remote(), timeout=2.0))  # type: ignore[attr-defined]
                except Exception:
                    out.append({"replica": r.name, "error": "unreachable"})
        return out


def get_directory(settings: Settings):
    """The cluster's SessionDirectory (created on first use)."""
    return SessionDirectory.options(
        name=DIRECTORY_NAME, namespace=settings.pipeline.namespace, lifetime="detached", get_if_exists=True
    ).remote(settings)
