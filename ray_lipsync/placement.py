"""Placement: which inference replica serves which session, and how many replicas a backend wants.

A pure policy (no Ray, no clock of its own: every method that depends on time takes `now`,
seconds on a monotonic clock). The SessionDirectory actor (actors/directory.py) owns one and
does what it decides: it starts and kills replica actors, pings them, and tells this class
what it observed (a replica became ready, stopped answering, answers again, died for good).

Rules:

- **Placing.** A new session goes to the least-loaded *ready* replica of its backend with a
  free slot (ties by name). None has room: `Pending` while capacity is on its way (a replica
  starting or restarting), else `Refused` (AtCapacity; BackendUnavailable while the backend is
  held after a replica of it failed to start).
- **Failures.** A session whose replica failed moves to a ready replica with room, else it
  becomes *waiting*. A replica that died for good puts all its sessions in waiting. Waiting
  sessions are assigned, oldest first, whenever capacity returns: a slot frees, a down
  replica answers again, a new replica is ready. A new session never takes a slot while a
  session of its backend waits.
- **Leases.** Gateways renew their sessions; a gateway silent for `lease_s` loses them.
  A renewal also rebuilds the assignments after the directory restarted.
- **Scale.** `wanted(backend)` = ceil((assigned + waiting + 1) / sessions_per_replica) within
  [min_replicas, max_replicas], for starting and for removing replicas alike (the +1 keeps
  a slot free for the next session). Once GPU replicas are wanted the CPU ones drain (no new
  sessions, removed once empty). Idle ready replicas beyond `wanted` are removed after
  `idle_replica_s`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ray_lipsync.config import PipelineConfig
from ray_lipsync.errors import AtCapacity, BackendUnavailable

State = Literal["starting", "ready", "down", "draining"]

BACKEND_RETRY_S = 30.0  # a backend whose replica failed to start is refused this long


@dataclass
class Replica:
    """What placement knows of one inference replica."""

    name: str
    backend: str
    gpu: bool
    state: State = "starting"
    sessions: set[str] = field(default_factory=set)
    idle_since: float = 0.0
    drain: bool = False  # draining: kept through a down/up cycle

    @property
    def serving(self) -> bool:
        """Counts as capacity of its backend (starting, ready or restarting; not draining)."""
        return not self.drain

    def info(self) -> dict:
        return {"replica": self.name, "backend": self.backend, "resources": "gpu" if self.gpu else "cpu",
                "state": self.state, "sessions": len(self.sessions)}


@dataclass(frozen=True)
class Waiting:
    """The session has no replica right now; it gets one as soon as a slot is free.

    `position`: 1 for the oldest waiting session of its backend.
    """

    backend: str
    position: int


@dataclass(frozen=True)
class Assigned:
    """The session is (now) served by `replica`."""

    replica: str


@dataclass(frozen=True)
class Pending:
    """No room yet, but capacity is on its way: wait for a change, then `error` when out of time."""

    error: AtCapacity


@dataclass(frozen=True)
class Refused:
    """No room and none coming (or the backend is held): raise `error`."""

    error: AtCapacity


@dataclass(frozen=True)
class Move:
    """A waiting session got a replica."""

    session_id: str
    replica: str


@dataclass(frozen=True)
class Start:
    """Start `count` replicas of `backend` (on GPUs when `gpu`); `drained`: replicas now draining."""

    backend: str
    gpu: bool
    count: int
    drained: tuple[str, ...] = ()


@dataclass
class _WaitingSession:
    backend: str
    since: float


class Placement:
    """Replicas, session assignments, waiting sessions, gateway leases; see the module doc."""

    def __init__(self, config: PipelineConfig, backend_retry_s: float = BACKEND_RETRY_S) -> None:
        self._config = config
        self._retry_s = backend_retry_s
        self.replicas: dict[str, Replica] = {}
        self._pins: dict[str, str] = {}  # session -> replica name
        self._waiting: dict[str, _WaitingSession] = {}  # session -> backend (insertion: oldest first)
        self._owner: dict[str, str] = {}  # session -> gateway
        self._leases: dict[str, float] = {}  # gateway -> last renewal
        self._held: dict[str, tuple[float, str]] = {}  # backend -> (until, reason)

    # -- queries ---------------------------------------------------------------------------
    def sessions(self) -> int:
        """Sessions known: assigned or waiting."""
        return len(self._pins) + len(self._waiting)

    def assignment(self, session_id: str) -> Assigned | Waiting | None:
        """Where the session is: its replica, waiting, or None (unknown here)."""
        if session_id in self._pins:
            return Assigned(self._pins[session_id])
        if session_id in self._waiting:
            return self._waiting_marker(session_id)
        return None

    def waiting(self, backend: str | None = None) -> list[str]:
        """Waiting sessions (of `backend`, or all), oldest first."""
        return [s for s, w in self._waiting.items() if backend is None or w.backend == backend]

    def held(self, backend: str, now: float) -> str | None:
        """Why `backend` is refused right now (a replica of it failed to start), or None."""
        hold = self._held.get(backend)
        return hold[1] if hold and hold[0] > now else None

    def held_backends(self, now: float) -> list[str]:
        return sorted(b for b in self._held if self.held(b, now) is not None)

    def serving(self, backend: str) -> list[Replica]:
        """Replicas that count as capacity of `backend` (starting, ready, down; not draining)."""
        return [r for r in self.replicas.values() if r.backend == backend and r.serving]

    def free(self, backend: str) -> list[Replica]:
        """Ready, non-draining replicas of `backend` with a free slot."""
        cap = self._config.sessions_per_replica
        return [r for r in self.serving(backend) if r.state == "ready" and len(r.sessions) < cap]

    def starting(self, backend: str) -> bool:
        return any(r.state == "starting" for r in self.serving(backend))

    def wanted(self, backend: str) -> int:
        """Replicas `backend` wants: room for its sessions (assigned + waiting) and one more."""
        assigned = sum(len(r.sessions) for r in self.serving(backend))
        sessions = assigned + len(self.waiting(backend))
        need = math.ceil((sessions + 1) / self._config.sessions_per_replica)
        return min(max(need, self._config.min_replicas), self._config.max_replicas)

    def backends(self) -> set[str]:
        """Backends in use: with replicas or waiting sessions."""
        return {r.backend for r in self.replicas.values()} | {w.backend for w in self._waiting.values()}

    # -- replicas ----------------------------------------------------------------------------
    def add_replica(self, name: str, backend: str, gpu: bool, now: float, state: State = "starting") -> Replica:
        """A replica was started (state starting) or adopted after a restart (state down)."""
        replica = Replica(name, backend, gpu, state, idle_since=now)
        self.replicas[name] = replica
        return replica

    def replica_ready(self, name: str, now: float) -> list[Move]:
        """A starting replica finished its constructor: it takes sessions (waiting ones first)."""
        replica = self.replicas.get(name)
        if replica is not None and replica.state == "starting":
            replica.state = "draining" if replica.drain else "ready"
        return self.assign_waiting(now)

    def replica_failed_to_start(self, name: str, reason: str, now: float) -> list[Move]:
        """A replica's constructor failed: forget it and hold its backend for a while."""
        replica = self.replicas.get(name)
        if replica is None:
            return []
        self._held[replica.backend] = (now + self._retry_s, reason)
        return self.replica_gone(name, now)

    def mark_down(self, name: str) -> bool:
        """A replica does not answer (restarting): no new sessions until it answers again.
        Whether it is down (an unknown replica counts as down)."""
        replica = self.replicas.get(name)
        if replica is None:
            return True
        if replica.state in ("ready", "draining"):
            replica.state = "down"
        return replica.state != "ready"

    def replica_up(self, name: str, now: float) -> list[Move]:
        """A down replica answers again: it serves its sessions and takes waiting ones."""
        replica = self.replicas.get(name)
        if replica is not None and replica.state == "down":
            replica.state = "draining" if replica.drain else "ready"
        return self.assign_waiting(now)

    def replica_gone(self, name: str, now: float) -> list[Move]:
        """A replica died for good (or never started): its sessions wait for another."""
        replica = self.replicas.pop(name, None)
        if replica is None:
            return []
        for session_id in sorted(replica.sessions):
            del self._pins[session_id]
            self._waiting[session_id] = _WaitingSession(replica.backend, now)
        return self.assign_waiting(now)

    def scale(self, backend: str, gpu: bool, now: float) -> Start:
        """What to start so that `backend` has `wanted` replicas; drains CPU replicas once GPU
        ones are wanted. Nothing while the backend is held."""
        drained = []
        if gpu:
            for r in self.serving(backend):
                if not r.gpu:
                    r.drain = True
                    if r.state == "ready":
                        r.state = "draining"
                    drained.append(r.name)
        if self.held(backend, now) is not None:
            return Start(backend, gpu, 0, tuple(drained))
        count = max(0, self.wanted(backend) - len(self.serving(backend)))
        return Start(backend, gpu, count, tuple(drained))

    def retire(self, now: float) -> list[str]:
        """Replicas to remove (forgotten here; the caller kills them): empty draining ones, and
        ready ones idle longer than `idle_replica_s` beyond what their backend wants."""
        gone = [r.name for r in self.replicas.values() if r.state == "draining" and not r.sessions]
        for backend in {r.backend for r in self.replicas.values()}:
            serving = self.serving(backend)
            idle = sorted((r for r in serving if not r.sessions and r.state == "ready"
                           and now - r.idle_since > self._config.idle_replica_s), key=lambda r: r.name)
            gone += [r.name for r in idle[: max(0, len(serving) - self.wanted(backend))]]
        for name in gone:
            del self.replicas[name]
        return gone

    # -- sessions ----------------------------------------------------------------------------
    def place(self, session_id: str, backend: str, gateway: str, now: float) -> Assigned | Pending | Refused:
        """A replica for a new session of `gateway` (see the module doc)."""
        self.touch(gateway, now)
        reason = self.held(backend, now)
        if reason is not None:
            return Refused(BackendUnavailable(
                f"the {backend} backend could not start on this server (the operator finds why "
                "in the server log); retry later or use another backend"))
        self._drop(session_id, now)
        self.assign_waiting(now)  # waiting sessions go first
        free = self.free(backend)
        if free and not self.waiting(backend):
            return Assigned(self._assign(session_id, self._least_loaded(free), gateway, now))
        slots = self._config.sessions_per_replica * len(self.serving(backend))
        error = AtCapacity(f"all {slots} session slots of the {backend} replicas are in use or "
                           "still starting; retry later")
        coming = any(r.state in ("starting", "down") for r in self.serving(backend))
        return Pending(error) if coming else Refused(error)

    def reassign(self, session_id: str, failed: str, gateway: str, backend: str, now: float) -> Assigned | Waiting:
        """`failed` (down or gone) did not serve the session: its replica if it moved already,
        else a ready replica with room, else it waits. `backend`: used when neither the
        session nor `failed` is known here (after a restart)."""
        self.touch(gateway, now)
        self._owner[session_id] = gateway
        if session_id in self._waiting:
            return self._waiting_marker(session_id)
        current = self.replicas.get(self._pins.get(session_id, ""))
        if current is not None and current.name != failed and current.state in ("ready", "draining"):
            return Assigned(current.name)  # moved already
        known = current or self.replicas.get(failed)
        backend = known.backend if known is not None else backend
        self._detach(session_id, now)
        free = [r for r in self.free(backend) if r.name != failed]
        if free and not self.waiting(backend):
            return Assigned(self._assign(session_id, self._least_loaded(free), gateway, now))
        self._waiting[session_id] = _WaitingSession(backend, now)
        return self._waiting_marker(session_id)

    def unpin(self, session_id: str, now: float) -> list[Move]:
        """The session closed: its slot frees (a waiting session may take it)."""
        self._drop(session_id, now)
        return self.assign_waiting(now)

    def assign_waiting(self, now: float) -> list[Move]:
        """Give waiting sessions, oldest first, the free slots of their backend."""
        moves = []
        for session_id, waiting in list(self._waiting.items()):
            free = self.free(waiting.backend)
            if free:
                del self._waiting[session_id]
                name = self._assign(session_id, self._least_loaded(free), self._owner.get(session_id, ""), now)
                moves.append(Move(session_id, name))
        return moves

    # -- leases ----------------------------------------------------------------------------
    def touch(self, gateway: str, now: float) -> None:
        """`gateway` is alive."""
        self._leases[gateway] = now

    def renew(self, gateway: str, sessions: Mapping[str, tuple[str, str | None]], now: float) -> list[Move]:
        """A gateway's lease: its open sessions as {session: (backend, replica)} (replica None:
        still being placed). What this directory does not know (it restarted) is rebuilt: onto
        the named replica if it exists, else waiting. The gateway's other sessions are released."""
        self.touch(gateway, now)
        for session_id, (backend, name) in sessions.items():
            if name is None or session_id in self._pins or session_id in self._waiting:
                continue  # being placed, or known: this directory's assignment stands
            self._owner[session_id] = gateway
            replica = self.replicas.get(name)
            if replica is not None:
                replica.sessions.add(session_id)
                self._pins[session_id] = name
            else:
                self._waiting[session_id] = _WaitingSession(backend, now)
        for session_id in [s for s, g in self._owner.items() if g == gateway and s not in sessions]:
            self._drop(session_id, now)
        return self.assign_waiting(now)

    def expire(self, now: float) -> tuple[dict[str, int], list[Move]]:
        """Gateways silent for `lease_s` lose their sessions: ({gateway: sessions freed}, moves)."""
        expired: dict[str, int] = {}
        for gateway, renewed in list(self._leases.items()):
            if now - renewed > self._config.lease_s:
                del self._leases[gateway]
                lost = [s for s, g in self._owner.items() if g == gateway]
                for session_id in lost:
                    self._drop(session_id, now)
                expired[gateway] = len(lost)
        return expired, self.assign_waiting(now)

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _least_loaded(free: list[Replica]) -> Replica:
        return min(free, key=lambda r: (len(r.sessions), r.name))

    def _assign(self, session_id: str, replica: Replica, gateway: str, now: float) -> str:
        self._detach(session_id, now)
        replica.sessions.add(session_id)
        self._pins[session_id] = replica.name
        if gateway:
            self._owner[session_id] = gateway
        return replica.name

    def _detach(self, session_id: str, now: float) -> None:
        """Take the session off its replica (if any)."""
        replica = self.replicas.get(self._pins.pop(session_id, ""))
        if replica is not None:
            replica.sessions.discard(session_id)
            if not replica.sessions:
                replica.idle_since = now

    def _drop(self, session_id: str, now: float) -> None:
        """Forget the session (closed, released or its gateway gone)."""
        self._detach(session_id, now)
        self._waiting.pop(session_id, None)
        self._owner.pop(session_id, None)

    def _waiting_marker(self, session_id: str) -> Waiting:
        backend = self._waiting[session_id].backend
        return Waiting(backend, self.waiting(backend).index(session_id) + 1)
