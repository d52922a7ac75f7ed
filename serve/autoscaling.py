"""How many gateway replicas the open sessions need (a Serve custom autoscaling policy)."""

from __future__ import annotations

import math
from typing import Any


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
