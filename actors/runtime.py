"""Starting Ray for a latency-sensitive pipeline."""

from __future__ import annotations

import os
from typing import Any

import ray

# Ray starts worker processes at niceness 15, so on a busy node the gateway (a driver or a
# Serve replica at niceness 0) starves the feature batcher, replicas and compositors: on the
# 2-core dev VM this alone moved 4-session p99 latency from ~200 ms to ~95 ms and dropped
# frames from dozens to 0. Workers of a real-time pipeline run at normal priority.
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """`ray.init` that starts a *new* local Ray unless `address` is given.

    A bare `ray.init()` silently joins any local cluster already running; here the caller
    says which. The worker niceness applies to Ray instances this call starts; for `ray start`
    (cluster.yaml) export RAY_worker_niceness=0 the same way.
    """
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    ray.init(address=address or "local", **kwargs)


def serial_opencv() -> None:
    """Run OpenCV single-threaded in this process (call it in every pipeline process).

    The images here are small (256x256 crops, mouth regions, one 512x512 colour conversion per
    frame) and concurrency comes from many sessions; OpenCV's thread pool only adds its
    wake-up and busy-wait cost: render + composite + RGB->I420 of one 512x512 frame took ~2.6 ms
    of CPU with its default pool against ~1.7-2.1 ms single-threaded, at the same wall time.
    """
    import cv2

    cv2.setNumThreads(1)
