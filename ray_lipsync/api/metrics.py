"""Per-replica counters and their Prometheus rendering for the whole deployment.

Each gateway replica keeps a `GatewayMetrics`; its `snapshot()` is a plain dict. Snapshots of
all replicas (pushed to the `MetricsBoard` actor in a cluster, or taken directly in one
process) are rendered by `render_prometheus` with a `replica` label on every sample.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ray_lipsync.streaming.drops import DropReason

LATENCY_BUCKETS_MS: tuple[float, ...] = (40, 80, 120, 160, 200, 250, 300, 400, 600, 1000, 2000)


class GatewayMetrics:
    """Counters of one gateway replica (sessions, frames, per-frame latency histogram)."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.sessions_created = 0
        self.sessions_closed = 0
        self.sessions_refused = 0  # admission said no (503)
        self.sessions_shed = 0  # closed to relieve an overload
        self.frames_sent = 0
        self._closed_drops: dict[str, int] = {}  # drops of sessions already closed, by reason
        self._bucket_counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._latency_sum_ms = 0.0

    def frame_sent(self, latency_ms: float | None) -> None:
        self.frames_sent += 1
        if latency_ms is not None:
            self._bucket_counts[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
            self._latency_sum_ms += latency_ms

    def session_closed(self, drops: Mapping[str, int]) -> None:
        """Keep a closing session's drop counts (the open ones are read from their sessions)."""
        self.sessions_closed += 1
        for reason, n in drops.items():
            self._closed_drops[reason] = self._closed_drops.get(reason, 0) + n

    def snapshot(self, *, sessions: int, speaking: int, queued_audio_s: float,
                 queued_events: int, load: Mapping[str, float] | None = None,
                 open_drops: Iterable[Mapping[str, int]] = ()) -> dict[str, Any]:
        """A picklable view of the counters plus the replica's current gauges (`load`: the last
        load sample's figures, gauges of their own)."""
        drops = {reason.value: 0 for reason in DropReason} | self._closed_drops
        for session_drops in open_drops:
            for reason, n in session_drops.items():
                drops[reason] = drops.get(reason, 0) + n
        return {
            "replica": self.replica,
            "time": time.time(),
            "sessions": sessions,
            "speaking": speaking,
            "queued_audio_s": queued_audio_s,
            "queued_events": queued_events,
            "sessions_created": self.sessions_created,
            "sessions_closed": self.sessions_closed,
            "sessions_refused": self.sessions_refused,
            "sessions_shed": self.sessions_shed,
            "frames_sent": self.frames_sent,
            **dict(load or {}),
            "drops": drops,
            "latency_buckets": list(self._bucket_counts),
            "latency_sum_ms": self._latency_sum_ms,
        }


class MetricsBoard:
    """Latest snapshot of every gateway replica; stale replicas (gone) expire.

    Wrapped as a named Ray actor by serve/board.py; plain class so it is testable without Ray.
    """

    def __init__(self, ttl_s: float = 30.0) -> None:
        self._ttl_s = ttl_s
        self._snapshots: dict[str, dict[str, Any]] = {}

    def put(self, snapshot: dict[str, Any]) -> None:
        self._snapshots[snapshot["replica"]] = {**snapshot, "received": time.monotonic()}

    def pid(self) -> int:
        return os.getpid()

    def get(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        self._snapshots = {r: s for r, s in self._snapshots.items()
                           if now - s["received"] <= self._ttl_s}
        return list(self._snapshots.values())


class _SnapshotCollector:
    def __init__(self, snapshots: Iterable[Mapping[str, Any]]) -> None:
        self._snapshots = list(snapshots)

    def collect(self):  # noqa: ANN201 - prometheus_client collector protocol
        gauges = {
            "sessions": ("lipsync_sessions", "Open sessions."),
            "speaking": ("lipsync_sessions_speaking", "Sessions currently speaking."),
            "queued_audio_s": ("lipsync_queued_audio_seconds", "Audio queued ahead of playback."),
            "queued_events": ("lipsync_queued_events", "Server-sent events waiting for clients."),
            # the gateway's last load sample (absent until it took one)
            "busy_cores": ("lipsync_host_busy_cores", "CPU busy on the gateway's host, in cores."),
            "loop_lag_ms": ("lipsync_gateway_loop_lag_ms", "Worst event-loop lag of the gateway in the last second."),
            "talk_cores": ("lipsync_talking_session_cores", "Measured CPU of one talking session, in cores."),
            "gateway_cores": ("lipsync_gateway_cores", "CPU of the gateway process, in cores."),
        }
        counters = {
            "sessions_created": ("lipsync_sessions_created", "Sessions created."),
            "sessions_closed": ("lipsync_sessions_closed", "Sessions closed."),
            "sessions_refused": ("lipsync_sessions_refused", "Sessions refused by admission (503)."),
            "sessions_shed": ("lipsync_sessions_shed", "Sessions closed to relieve an overload (newest first)."),
            "frames_sent": ("lipsync_frames_sent", "Video frames sent to peers."),
        }
        for key, (name, doc) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["replica"])
            for snap in self._snapshots:
                if key in snap:
                    family.add_metric([snap["replica"]], float(snap[key]))
            yield family
        for key, (name, doc) in counters.items():
            family = CounterMetricFamily(name, doc, labels=["replica"])
            for snap in self._snapshots:
                family.add_metric([snap["replica"]], float(snap.get(key, 0)))
            yield family
        dropped = CounterMetricFamily(
            "lipsync_frames_dropped",
            "Frames dropped, by reason (late, shed, stage_unavailable, stage_error, "
            "sender_backpressure; stale_epoch = work cut by an interrupt, not a visible drop).",
            labels=["replica", "reason"])
        for snap in self._snapshots:
            for reason, n in sorted(snap.get("drops", {}).items()):
                dropped.add_metric([snap["replica"], reason], float(n))
        yield dropped
        yield from _inference_families(self._snapshots)
        hist = HistogramMetricFamily(
            "lipsync_frame_latency_ms",
            "Per-frame latency: arrival of the frame's last audio chunk to its composited image (ms).",
            labels=["replica"],
        )
        for snap in self._snapshots:
            cumulative, buckets = 0, []
            bounds = [str(b) for b in LATENCY_BUCKETS_MS] + ["+Inf"]
            for bound, count in zip(bounds, snap["latency_buckets"]):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            hist.add_metric([snap["replica"]], buckets, float(snap["latency_sum_ms"]))
        yield hist


_INFERENCE = {
    "sessions": ("lipsync_replica_sessions", "Sessions pinned to the inference replica.", GaugeMetricFamily),
    "queue_depth": ("lipsync_replica_queue_depth", "Frames waiting in the replica's queue.", GaugeMetricFamily),
    "batches": ("lipsync_replica_batches", "Render batches run.", CounterMetricFamily),
    "frames": ("lipsync_replica_frames_rendered", "Frames rendered.", CounterMetricFamily),
    "max_batch_seen": ("lipsync_replica_max_batch", "Largest cross-session batch so far.", GaugeMetricFamily),
    "dropped_late": ("lipsync_replica_frames_shed", "Frames shed because already late.", CounterMetricFamily),
}


def _inference_families(snapshots: list[Mapping[str, Any]]):
    """Inference replica stats (every gateway reports them; the freshest report wins)."""
    latest: dict[str, Mapping[str, Any]] = {}
    for snap in sorted(snapshots, key=lambda s: s.get("received", 0)):
        for stats in snap.get("inference", ()):
            if "error" not in stats:
                latest[stats["replica"]] = stats
    for key, (name, doc, kind) in _INFERENCE.items():
        family = kind(name, doc, labels=["inference_replica"])
        for replica, stats in sorted(latest.items()):
            family.add_metric([replica], float(stats.get(key, 0)))
        yield family
    device = GaugeMetricFamily(
        "lipsync_replica_device", "Device the inference replica renders on (1 per replica).",
        labels=["inference_replica", "device"],
    )
    for replica, stats in sorted(latest.items()):
        if "device" in stats:
            device.add_metric([replica, str(stats["device"])], 1.0)
    yield device


def render_prometheus(snapshots: Iterable[Mapping[str, Any]]) -> bytes:
    """Prometheus text exposition of all replicas' snapshots."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshots))
    return generate_latest(registry)
