"""Where a benchmark's result goes: the JSON file it was asked for (its folder made), the
commit it was measured on, and how fast the machine ran that day (`machine_speed`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The checkout's short commit, "+changes" when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return (sha or "unknown") + ("+changes" if dirty else "")
    except OSError:
        return "unknown"


def write_json(path: str | None, result: dict) -> None:
    """Write `result` to `path` as indented JSON; nothing when `path` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))


def machine_speed(frames: int = 600) -> dict[str, float]:
    """How fast this machine runs now: ms of one thread per 512x512 procedural frame (render
    of a synthetic face plus compositing, `frame_cost.time_render_composite` as `core.py`
    times it), median over `frames`. The VM this project is measured on does not run at one
    speed (benchmarks/README.md); a result that depends on CPU headroom is read against this."""
    import cv2
    import numpy as np

    from frame_cost import time_render_composite
    from ray_lipsync.backends.procedural import synthetic_avatar

    poses = np.array([[0.8, 0.3, 0.1], [0.4, 0.6, 0.0], [0.6, 0.1, 0.7]], np.float32)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # per core, as core.py
    try:
        timed = time_render_composite(synthetic_avatar(size=(512, 512)), poses[np.arange(frames) % len(poses)], 1)
    finally:
        cv2.setNumThreads(threads)
    return {"ms_per_frame_512": round(timed["frame"]["median_ms"], 3), "frames": timed["frames_timed"]}
