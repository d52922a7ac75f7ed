"""How many gateway replicas the open sessions need (a Serve custom autoscaling policy)."""

from __future__ import annotations

import math
from typing import Any


class GatewayLoadAutoscalingPolicy:
    """Gateways for the work they do: enough that each runs at most `target_gateway_cores` of
    CPU (a gateway is one Python process, so one core is its ceiling; the margin absorbs bursts
    such as keyframes and offers) and holds at most `target_sessions_per_gateway` sessions;
    within min..max.

    Serve instantiates it once with `policy_kwargs`; it reads the custom metrics each gateway
    reports from `record_autoscaling_stats`: `sessions` and `gateway_cores` (the CPU its
    process used over the last second).
    """

    def __init__(self, target_sessions_per_gateway: int = 8, target_gateway_cores: float = 0.6) -> None:
        if target_sessions_per_gateway <= 0 or target_gateway_cores <= 0:
            raise ValueError("target_sessions_per_gateway and target_gateway_cores must be positive")
        self.target_sessions = target_sessions_per_gateway
        self.target_cores = target_gateway_cores

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        sessions = float(sum(metrics.get("sessions", {}).values()))
        cores = float(sum(metrics.get("gateway_cores", {}).values()))
        desired = max(math.ceil(sessions / self.target_sessions), math.ceil(cores / self.target_cores))
        desired = min(max(desired, ctx.capacity_adjusted_min_replicas, 1),
                      ctx.capacity_adjusted_max_replicas)
        return desired, {"sessions": sessions, "gateway_cores": round(cores, 3)}
