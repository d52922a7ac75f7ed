"""Avatar states: how much the picture changes at a clip switch, and what a silent frame costs.

1. Switches. An avatar with clips is prepared through the real `avatar prepare` path (the
   default portrait with procedural head motion, `avatar.motion.SAMPLE_MOTIONS`; and, when
   ../shared/media/yongen.mp4 is present, three segments of that recording as main video,
   `listening` and `wave`). A `ClipPlayer` takes a fixed random schedule of state and action
   requests; for every output frame that shows another clip than the frame before, the change
   between the two full frames is measured (mean absolute difference over all pixels, and the
   largest mean over a 32x32 block; through a cross-fade, the largest step of the frames
   around the switch), and compared with the same measures between consecutive frames inside
   each clip, and with a naive switch (the new clip's first frame, at once). Also the frames
   from each request to its switch (waiting for a close frame, or for an action to end).
2. CPU of silent frames. (a) The per-frame decision and image lookup, called in a loop:
   before this feature, `avatar.frames[mirror_index(k, len(avatar))]` (the old
   `Avatar.cycle_index`); now
   `player.silent_image(k)` (what the session calls) in the idle state and in a state clip
   after switches (past its cross-fade).
   (b) A real LocalPipeline session whose frames are read for a few seconds: this process's
   CPU time per frame, idle state vs a state clip, runs alternated.

    python benchmarks/avatar_states.py --json benchmarks/results/avatar_states.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from output import git_commit, write_json  # noqa: E402

from ray_lipsync.avatar.model import IDLE, Avatar, mirror_index  # noqa: E402
from ray_lipsync.avatar.motion import sample_portrait, sample_videos, write_video  # noqa: E402
from ray_lipsync.avatar.prepare import run_prepare  # noqa: E402
from ray_lipsync.avatar.store import AvatarStore  # noqa: E402
from ray_lipsync.config import Settings  # noqa: E402
from ray_lipsync.streaming.local import LocalPipeline  # noqa: E402
from ray_lipsync.streaming.sources import FADE_FRAMES, ClipPlayer  # noqa: E402

log = logging.getLogger("avatar_states")
MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
YONGEN_SEGMENTS = {"main": (0, 75), "listening": (75, 125), "wave": (125, 175)}  # frames [start, stop)
BLOCK = 32


# -- preparing the avatars -------------------------------------------------------------------


def prepare(settings: Settings, name: str, videos: dict[str, Path]) -> Avatar:
    videos = dict(videos)
    run_prepare(settings, image=None, video=videos.pop("main"), name=name, progress=False, clips=videos)
    return AvatarStore(settings.avatars_dir).load(name, mmap=False)


def yongen_videos(folder: Path) -> dict[str, Path]:
    """YONGEN_SEGMENTS of ../shared/media/yongen.mp4 as separate videos."""
    import av

    stop = max(s for _, s in YONGEN_SEGMENTS.values())
    frames = []
    with av.open(str(MEDIA / "yongen.mp4")) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == stop:
                break
    return {name: write_video(folder / f"yongen_{name}.mp4", frames[a:b])
            for name, (a, b) in YONGEN_SEGMENTS.items()}


# -- 1. switches ---------------------------------------------------------------------------


def change(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean absolute difference, largest BLOCKxBLOCK block mean) between two frames."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=2)
    h, w = (diff.shape[0] // BLOCK) * BLOCK, (diff.shape[1] // BLOCK) * BLOCK
    blocks = diff[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(1, 3))
    return float(diff.mean()), float(blocks.max())


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": round(float(np.median(values)), 3), "max": round(float(np.max(values)), 3)}


def switches(avatar: Avatar, requests: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    player = ClipPlayer(avatar)
    clips = [c for c in player.clips if c != IDLE]
    k, naive, waited = 1, [], []
    for _ in range(requests):
        k += int(rng.integers(8, 40))
        kind = "action" if rng.random() < 0.4 else "state"
        name = str(rng.choice(clips if kind == "action" else player.clips))
        target = avatar.clip_frames(name)
        naive.append(change(avatar.frames[player.source(k - 1)], avatar.frames[target.start]))
        first = player.play(name, k)[0] if kind == "action" else player.set_state(name, k)
        waited.append(first - k)
        k = first
    names = [player.clip_at(i) for i in range(k + 60)]
    at = [i for i in range(1, len(names)) if names[i] != names[i - 1]]
    # each switch, through its cross-fade if it has one: the largest change of the frames around it
    measured = []
    for i in at:
        shown = [player.silent_image(j)[0] for j in range(i - 1, i + FADE_FRAMES + 1)]
        steps = [change(a, b) for a, b in zip(shown, shown[1:])]
        measured.append((max(m for m, _ in steps), max(b for _, b in steps)))
    fades = sum(player.plan.segment(i).fade for i in at)
    own = [change(avatar.frames[i], avatar.frames[i + 1])
           for r in (avatar.idle_frames, *avatar.clips.values()) for i in range(r.start, r.stop - 1)]
    return {
        "frames": {"main": len(avatar.idle_frames), **{c: len(r) for c, r in avatar.clips.items()}},
        "size": list(avatar.size),
        "requests": requests,
        "clip_changes": len(at),
        "cross_faded": fades,
        "switch_mean_abs_diff": summary([m for m, _ in measured]),
        "switch_block_max": summary([b for _, b in measured]),
        "within_clips_mean_abs_diff": summary([m for m, _ in own]),
        "within_clips_block_max": summary([b for _, b in own]),
        "naive_switch_mean_abs_diff": summary([m for m, _ in naive]),
        "naive_switch_block_max": summary([b for _, b in naive]),
        "frames_from_request_to_switch": summary([float(w) for w in waited]),
    }


# -- 2. CPU of silent frames ---------------------------------------------------------------


def per_frame_ns(avatar: Avatar, calls: int, repeats: int) -> dict:
    """ns per frame of the decision + image lookup, before and with clips."""
    idle = ClipPlayer(avatar)
    in_state = ClipPlayer(avatar)
    listening = next(iter(avatar.clips))
    in_state.play(listening, 10)
    in_state.set_state(listening, 20)
    frames = avatar.frames
    ways = {
        "before (the old Avatar.cycle_index body)": lambda k: frames[mirror_index(k, len(avatar))],
        "idle state: player.silent_image": idle.silent_image,
        f"state {listening!r} after an action: player.silent_image": in_state.silent_image,
    }
    out = {}
    for name, way in ways.items():
        runs = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            for k in range(1000, 1000 + calls):
                way(k)
            runs.append((time.perf_counter_ns() - start) / calls)
        out[name] = {"median_ns": round(float(np.median(runs)), 1), "worst_ns": round(float(max(runs)), 1)}
    return out


async def session_cpu(settings: Settings, name: str, state: str, seconds: float) -> float:
    """This process's CPU time (us) per frame while a silent session's frames are read."""
    pipeline = LocalPipeline(settings)
    try:
        session = await pipeline.create_session(avatar=name)
        if state != IDLE:
            session.change_avatar_state(state)
        frames = session.frames()
        for _ in range(5):  # past the switch and the first frame's setup
            await anext(frames)
        count, cpu = 0, time.process_time()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await anext(frames)
            count += 1
        cpu = time.process_time() - cpu
        await frames.aclose()
        return cpu / count * 1e6
    finally:
        await pipeline.shutdown()


def session_cpu_runs(settings: Settings, name: str, state: str, seconds: float, repeats: int) -> dict:
    runs: dict[str, list[float]] = {IDLE: [], state: []}
    for _ in range(repeats):  # alternated, so drifting machine load hits both alike
        for which in runs:
            runs[which].append(asyncio.run(session_cpu(settings, name, which, seconds)))
    return {which: {"median_us": round(float(np.median(v)), 1), "worst_us": round(float(max(v)), 1),
                    "runs_us": [round(x, 1) for x in v]} for which, v in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--requests", type=int, default=300, help="state/action requests per avatar")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0, help="per session CPU run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict = {"commit": git_commit(), "machine": platform.platform(), "avatars": {}}
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), serve={"admission": {"enabled": False}})
        face, _ = sample_portrait()
        avatars = {"procedural": prepare(settings, "procedural", sample_videos(face, Path(home)))}
        if (MEDIA / "yongen.mp4").is_file():
            avatars["yongen"] = prepare(settings, "yongen", yongen_videos(Path(home)))
        else:
            log.info("../shared/media/yongen.mp4 absent: the procedural avatar only")
        for name, avatar in avatars.items():
            log.info("switches of %s", name)
            result["avatars"][name] = {"switches": switches(avatar, args.requests, seed=0)}
        avatar = avatars["procedural"]
        result["per_frame_lookup"] = per_frame_ns(avatar, 200_000, args.repeats)
        log.info("session CPU, %d x %.0f s per state", args.repeats, args.seconds)
        result["session_cpu_per_silent_frame"] = session_cpu_runs(
            settings, "procedural", "listening", args.seconds, args.repeats)
    print(json.dumps(result, indent=2))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
