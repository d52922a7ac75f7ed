"""SessionRouter: the Serve request router of the gateway deployment.

Where a request's session comes from:

1. `PendingRequest.metadata.session_id` (public, `header_session`): what Serve's HTTP proxy
   takes from an `x-session-id` request header (RAY_SERVE_SESSION_ID_HEADER_KEY), or a handle
   caller from `handle.options(session_id=...)`. Advisory: it routes only when it names one
   of the replicas (other software may send that header with ids of its own).
2. `PendingRequest.kwargs["session_id"]` (public, `request_session`): handle calls;
   ServeClient passes every GatewayAPI argument as a keyword, session methods' `session_id`
   among them.
3. The path of an HTTP request from the proxy (/v1/sessions/{id}/..., `request_session`):
   see `_proxy_http_path`, the one place that reads a Serve-internal object, and why it must.
"""

from __future__ import annotations

import pickle
import re
import time
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ray_lipsync.api.session_ids import names_gateway

_SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)")
RECENT_TTL_S = 5.0  # a replica's stats not refreshed for this long: forget what was sent since
# A replica Serve could not reach (ActorUnavailableError) is nobody's home for this long; one
# that died (ActorDiedError) for longer, until the controller has dropped it from the set
UNREACHABLE_S = 2.0
DEAD_S = 60.0


def header_session(pending: PendingRequest | None) -> str | None:
    """The `x-session-id` header (or handle option) of a request; None if absent. Never raises."""
    session_id = getattr(getattr(pending, "metadata", None), "session_id", None)
    return session_id if isinstance(session_id, str) and session_id else None


def request_session(pending: PendingRequest | None) -> Any:
    """The session a call is for: its `session_id` keyword, or the id in its HTTP path; None
    for requests of no session (or unreadable ones). Never raises."""
    if pending is None:
        return None
    kwargs = getattr(pending, "kwargs", None)
    session_id = kwargs.get("session_id") if isinstance(kwargs, dict) else None
    if session_id is not None:
        return session_id
    path = _proxy_http_path(pending)
    match = _SESSION_PATH.match(path) if path else None
    return match.group(1) if match else None


def _proxy_http_path(pending: PendingRequest) -> str | None:
    """The URL path of an HTTP request the Serve proxy sends; None for anything else. Never raises.

    Why a private object: in Ray Serve 2.60 a RequestRouter gets no public field with an HTTP
    request's path. `metadata.route` is the matched route *pattern*, for metrics
    ("/v1/sessions/{session_id}/offer", ProxyRouter.match_route_pattern), and
    `metadata.session_id` is set only from an `x-session-id` header, which browsers, the
    LiveTalking clients and curl users of /v1/sessions/{id}/... do not send. The proxy's one
    argument is the request itself, pickled: `pickle.dumps(StreamingHTTPRequest(asgi_scope))`
    (ray.serve._private.proxy_request_response.ASGIProxyRequest.serialized_replica_arg), which
    the replica unpickles the same way. Should a Ray release change that, this returns None:
    such requests then go to the least loaded gateway, whose HomeClient forwards session
    calls home (one more hop, same answers).
    """
    metadata = getattr(pending, "metadata", None)
    if getattr(metadata, "is_http_request", True) is False:
        return None  # a handle call, or gRPC: no HTTP path to read
    args = getattr(pending, "args", None)
    if not args or not isinstance(args[0], (bytes, bytearray)):
        return None
    try:
        scope = getattr(pickle.loads(args[0]), "asgi_scope", None)  # the proxy's own bytes
        path = scope.get("path") if isinstance(scope, dict) else None
        return path if isinstance(path, str) else None
    except Exception:  # noqa: BLE001 - not a request from the proxy, or another Ray's format
        return None


def _home(replicas: list[RunningReplica], session_id: Any) -> list[RunningReplica]:
    return [r for r in replicas if names_gateway(session_id, r.replica_id.unique_id)]


@dataclass
class _Recent:
    """Requests of no session sent to one replica since its routing stats `stats` arrived."""

    stats: Any
    since: float
    sent: int = 0


class SessionRouter(RequestRouter):
    """Pins each session's calls to the replica its id names; new sessions to the least loaded.

    Session ids name their home replica ("<replica unique_id>.<random>", or for LiveTalking's
    integer ids a 6-digit replica code in the leading digits). Calls without a session go to
    the replica with the fewest sessions (from `record_routing_stats`, refreshed about once a
    second, plus what this router sent each replica since its last refresh, so a burst of new
    sessions spreads). Consistent hashing is not used: it remaps sessions on scale-up.

    A replica that Serve found dead or unreachable is left out of the candidates for a while
    (`UNREACHABLE_S`, `DEAD_S`): until the controller drops a killed gateway from the set, Serve
    retries a request on the replica this router picks, and a session's home would be picked
    again and again (a client's request hung until its own timeout). Its sessions' calls go to
    another replica instead, which answers "unknown session" (404) at once.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._recent: dict[str, _Recent] = {}
        self._unreachable: dict[str, float] = {}  # replica unique_id -> until (monotonic)

    def on_replica_actor_unavailable(self, replica_id: ReplicaID) -> None:
        self._unreachable[replica_id.unique_id] = time.monotonic() + UNREACHABLE_S
        super().on_replica_actor_unavailable(replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._unreachable[replica_id.unique_id] = time.monotonic() + DEAD_S
        super().on_replica_actor_died(replica_id)

    def _reachable(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """`replicas` less those left out (module doc); all of them if that leaves none."""
        now = time.monotonic()
        for key in [k for k, until in self._unreachable.items() if until <= now]:
            del self._unreachable[key]
        reachable = [r for r in replicas if r.replica_id.unique_id not in self._unreachable]
        return reachable or replicas

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        candidate_replicas = self._reachable(candidate_replicas)
        header = header_session(pending_request)
        home = _home(candidate_replicas, header) if header is not None else []
        if home:
            return [home]
        session_id = request_session(pending_request)
        if session_id is not None:
            home = _home(candidate_replicas, session_id)
            if home:
                return [home]
            # Home replica gone: any replica answers "unknown session" (404).
            return [candidate_replicas[:1]] if candidate_replicas else []
        ranked = sorted(candidate_replicas, key=self._load)
        if ranked:
            self._recent_of(ranked[0]).sent += 1
        return [[r] for r in ranked]

    def _load(self, replica: RunningReplica) -> float:
        stats = replica.routing_stats or {}
        return float(stats.get("sessions", 0)) + self._recent_of(replica).sent

    def _recent_of(self, replica: RunningReplica) -> _Recent:
        key, now = replica.replica_id.unique_id, time.monotonic()
        recent = self._recent.get(key)
        if recent is None or recent.stats is not replica.routing_stats or now - recent.since > RECENT_TTL_S:
            recent = self._recent[key] = _Recent(replica.routing_stats, now)
        return recent
