"""Starting Ray for a latency-sensitive pipeline."""

from __future__ import annotations

import os
from typing import Any

import ray

# Ray settings for a real-time pipeline, as the environment variables every Ray process reads.
PIPELINE_RAY_ENV = {
    # Ray starts worker processes at niceness 15, so on a busy node the gateway (a driver or a
    # Serve replica at niceness 0) starves the feature batcher, replicas and compositors: the
    # latency tail grows and frames are dropped. Workers of a real-time pipeline run at normal
    # priority (measured: benchmarks/README.md, section "Figures behind settings in the code").
    "RAY_worker_niceness": "0",
    # A round's rendered crops (up to max_batch x 196 KB) travel inline with the task reply
    # instead of through the shared-memory object store, whose put/pin/get traffic costs the
    # raylet CPU on every round while inline replies cost it nothing (measured:
    # benchmarks/README.md, section "Figures behind settings in the code"). 4 MiB bounds what
    # may go inline (a 16-frame batch is 3 MiB).
    "RAY_max_direct_call_object_size": str(4 << 20),
    # Serve's controller reconciles every 100 ms by default, at a steady CPU cost even when
    # idle (measured: benchmarks/README.md, section "Figures behind settings in the code");
    # sessions change on a scale of seconds, so 500 ms loses nothing.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # A call in flight to an actor whose process died fails only once the caller has heard
    # why from the GCS, or after this wait (Ray's default: 1000 ms). Every frame of a round
    # to a killed replica, batcher or compositor is lost while the caller waits; with 0 the
    # call fails as soon as the connection drops and failover starts at once (measured:
    # benchmarks/README.md, section "Figures behind settings in the code").
    "RAY_timeout_ms_task_wait_for_death_info": "0",
}


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """`ray.init` that starts a *new* local Ray unless `address` is given.

    A bare `ray.init()` silently joins any local cluster already running; here the caller
    says which. PIPELINE_RAY_ENV applies to Ray instances this call starts (unless already
    set); `ray start` (cluster.yaml) exports the same variables.
    """
    for name, value in PIPELINE_RAY_ENV.items():
        os.environ.setdefault(name, value)
    ray.init(address=address or "local", **kwargs)


def serial_opencv() -> None:
    """Run OpenCV single-threaded in this process (call it in every pipeline process).

    The images here are small (256x256 crops, mouth regions, one 512x512 colour conversion per
    frame) and concurrency comes from many sessions; OpenCV's thread pool only adds its
    wake-up and busy-wait cost: more CPU per frame for the same wall time (measured:
    benchmarks/README.md, section "Figures behind settings in the code").
    """
    import cv2

    cv2.setNumThreads(1)


HEAD_NODE = {"node:__internal_head__": 0.001}  # the resource Ray gives the head node only


def on_head_node() -> dict[str, Any]:
    """Actor options that place a small stateful actor every session needs (the session
    directory, the metrics board, a CPU feature batcher) on the head node: worker nodes come
    and go with the autoscaler or a failure, the head stays. (A soft node affinity was seen to
    place such 0-CPU actors on a worker anyway.)"""
    return {"resources": dict(HEAD_NODE)}
