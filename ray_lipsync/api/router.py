"""Ray Serve glue for gateways: the session-affine request router and the autoscaling policy.

Session ids name their home replica ("<replica unique_id>.<random>", or for LiveTalking's
integer ids a 6-digit replica code in the leading digits), so every call for a session is
sent to the replica holding its peer, whatever replicas are added later: handle calls by
their `session_id` argument, HTTP requests from the proxy by the id in /v1/sessions/{id}. Calls without a
session (create_session) go to the replica with the fewest sessions (from
`record_routing_stats`, refreshed about once a second, plus what this router sent each
replica since its last refresh, so a burst of new sessions spreads instead of piling onto the
replica the stale figures favour). Consistent hashing is not used: it remaps sessions on
scale-up.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import time
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ray_lipsync.api.gateway import names_replica

logger = logging.getLogger(__name__)


_SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)")
RECENT_TTL_S = 5.0  # a replica's stats not refreshed for this long: forget what was sent since


def _session_arg(pending: PendingRequest | None) -> Any:
    """The session a request is for: the `session_id` of a handle call, or the id in the path
    of an HTTP request from the Serve proxy; None for requests of no session (or unknown)."""
    if pending is None:
        return None
    session_id = pending.kwargs.get("session_id")
    return session_id if session_id is not None else _http_session(pending.args)


def _http_session(args: Any) -> str | None:
    # The proxy passes an HTTP request as one argument: the pickled request with its ASGI
    # scope (Ray Serve's StreamingHTTPRequest, as the replica itself unpickles it).
    if not args or not isinstance(args[0], bytes):
        return None
    try:
        scope = getattr(pickle.loads(args[0]), "asgi_scope", None)
    except Exception:  # noqa: BLE001 - not an HTTP request from the proxy
        return None
    match = _SESSION_PATH.match(scope.get("path", "")) if isinstance(scope, dict) else None
    return match.group(1) if match else None


@dataclass
class _Recent:
    """Requests of no session sent to one replica since its routing stats `stats` arrived."""

    stats: Any
    since: float
    sent: int = 0


class SessionRouter(RequestRouter):
    """Pins each session's calls to the replica its id names; new sessions to the least loaded."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._recent: dict[str, _Recent] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        session_id = _session_arg(pending_request)
        if session_id is not None:
            home = [r for r in candidate_replicas if names_replica(session_id, r.replica_id.unique_id)]
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


class SessionsAutoscalingPolicy:
    """Gateways needed for the open sessions: ceil(sessions / target), within min..max.

    Serve instantiates it once with `policy_kwargs`; it reads the `sessions` custom metric
    each gateway reports from `record_autoscaling_stats`.
    """

    def __init__(self, target_sessions_per_gateway: int = 8) -> None:
        if target_sessions_per_gateway <= 0:
            raise ValueError("target_sessions_per_gateway must be positive")
        self.target = target_sessions_per_gateway

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        per_replica = (ctx.aggregated_metrics or {}).get("sessions", {})
        sessions = float(sum(per_replica.values()))
        desired = math.ceil(sessions / self.target)
        desired = min(max(desired, ctx.capacity_adjusted_min_replicas, 1),
                      ctx.capacity_adjusted_max_replicas)
        return desired, {}
