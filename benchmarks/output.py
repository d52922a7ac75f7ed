"""Where a benchmark's result goes: the JSON file it was asked for (its folder made), the
commit it was measured on, and how fast the machine ran that day (`machine_speed`)."""

from __future__ import annotations

import json
import subprocess
import time
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


def machine_speed(seconds: float = 1.5) -> dict[str, float]:
    """How fast this machine runs now: ms of one thread per 512x512 procedural frame (render
    of a synthetic face plus compositing, as `core.py` times them), median of the frames
    rendered in `seconds`. The VM this project is measured on does not run at one speed
    (benchmarks/README.md); a result that depends on CPU headroom is read against this."""
    import cv2
    import numpy as np

    from ray_lipsync.backends.procedural import ProceduralRenderer, synthetic_avatar
    from ray_lipsync.compositing import Compositor
    from ray_lipsync.config import Settings
    from ray_lipsync.types import RenderJob

    avatar = synthetic_avatar(size=(512, 512))
    renderer, compositor = ProceduralRenderer(Settings()), Compositor()
    renderer.load_avatar(avatar)
    compositor.load_avatar(avatar)
    poses = np.array([[0.8, 0.3, 0.1], [0.4, 0.6, 0.0], [0.6, 0.1, 0.7]], np.float32)
    times: list[float] = []
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # per core, as core.py
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            k = len(times)
            t0 = time.perf_counter()
            crop = renderer.render([RenderJob(avatar.name, k % len(avatar), poses[k % len(poses)])])[0]
            compositor.compose(avatar, k % len(avatar), crop)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        cv2.setNumThreads(threads)
    return {"ms_per_frame_512": round(float(np.median(times[len(times) // 10:])), 3),
            "frames": len(times)}
