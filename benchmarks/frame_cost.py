"""The CPU cost of one frame of the procedural path, render and composite (what `core.py`
reports and `output.machine_speed` reads the machine's speed from). No side effects on import."""

from __future__ import annotations

import time

import numpy as np

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.backends.procedural import ProceduralRenderer
from ray_lipsync.compositing import Compositor
from ray_lipsync.config import Settings
from ray_lipsync.types import RenderJob


def summary(ms: list[float]) -> dict[str, float]:
    median = float(np.median(ms))
    return {"median_ms": round(median, 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "frames_per_s_per_core": round(1000.0 / median, 1) if median > 0 else float("inf")}


def time_render_composite(avatar: Avatar, features: np.ndarray, repeats: int) -> dict[str, object]:
    """Per-frame cost of render, composite and both (`frame`) over the speech frames
    (features > 0), after a warm-up of the per-frame geometry and blend caches."""
    renderer, compositor = ProceduralRenderer(Settings()), Compositor()
    renderer.load_avatar(avatar)
    compositor.load_avatar(avatar)
    speech = np.flatnonzero(features.max(axis=1) > 0)
    for k in speech[: 2 * len(avatar)]:  # warm the per-frame geometry / blend caches
        source = avatar.cycle_index(int(k))
        compositor.compose(avatar, source, renderer.render([RenderJob(avatar.name, source, features[k])])[0])
    render_ms, composite_ms = [], []
    for _ in range(repeats):
        for k in speech:
            source = avatar.cycle_index(int(k))
            t0 = time.perf_counter()
            crop = renderer.render([RenderJob(avatar.name, source, features[k])])[0]
            t1 = time.perf_counter()
            compositor.compose(avatar, source, crop)
            t2 = time.perf_counter()
            render_ms.append((t1 - t0) * 1000)
            composite_ms.append((t2 - t1) * 1000)
    frame_ms = [r + c for r, c in zip(render_ms, composite_ms)]
    return {"render": summary(render_ms), "composite": summary(composite_ms), "frame": summary(frame_ms),
            "frames_timed": len(render_ms)}
