"""Per-frame streaming latency through the whole Ray pipeline.

N sessions get real speech at real-time pace (20 ms chunks) through RayPipeline (feature
batcher -> pinned inference replica -> compositor). Per frame we record the time from the
arrival of the frame's last audio chunk to the composited frame being available in the
session (so the backend's lookahead is included). `--schedule batch16` runs the reference
design's scheduling (LiveTalking: 32 chunks of 20 ms, then 200 ms of right context, before any
inference) on the same pipeline, with a longer playout delay so it is compared on latency,
not on drops.

    python benchmarks/latency.py --sessions 4 --seconds 20 --schedule streaming --json out.json
    python benchmarks/latency.py --sweep 1,2,4,8 --seconds 15 --json sweep.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_lipsync.clock import CHUNK_SAMPLES, SAMPLE_RATE  # noqa: E402
from ray_lipsync.config import Settings  # noqa: E402

log = logging.getLogger("benchmarks.latency")
SHARED_SPEECH = Path(__file__).resolve().parents[2] / "shared" / "media" / "eng.wav"
BATCH16_PLAYOUT_MS = 1200


def load_speech(seconds: float, path: Path | None = None) -> tuple[np.ndarray, str]:
    """At least `seconds` of speech (repeated) and where it came from: the audio file `path`,
    else real English speech (../shared/media/eng.wav) when present, else offline TTS."""
    path = path or (SHARED_SPEECH if SHARED_SPEECH.exists() else None)
    if path is not None:
        from ray_lipsync.audio.decode import load_audio

        audio = load_audio(path)
        source = path.name
    else:
        from ray_lipsync.tts import Synthesizer

        text = (
            "The quick brown fox jumps over the lazy dog. We measure how long each frame "
            "takes from its audio to the finished picture. Then we pause, and speak again."
        )
        synth = Synthesizer()
        audio = np.concatenate([synth.synthesize(text), np.zeros(SAMPLE_RATE // 2, np.float32)])
        source = "espeak-ng"
    reps = int(np.ceil(seconds * SAMPLE_RATE / len(audio))) + 1
    return np.tile(audio, reps), source


async def drive_session(session, speech: np.ndarray, seconds: float, phase_s: float) -> dict:
    """Push `seconds` of speech in real time while consuming the paced output."""
    n_chunks = int(seconds * SAMPLE_RATE) // CHUNK_SAMPLES
    emitted = 0

    async def feed() -> None:
        await asyncio.sleep(phase_s)  # clients speak at independent phases, not in lock-step
        start = time.time()
        for c in range(n_chunks):
            delay = start + c * CHUNK_SAMPLES / SAMPLE_RATE - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = speech[c * CHUNK_SAMPLES : (c + 1) * CHUNK_SAMPLES]
            await session.push_audio(chunk, utterance_id="bench", final=c == n_chunks - 1)

    async def consume() -> None:
        nonlocal emitted
        async for frame in session.frames():
            emitted += 1
            session.record_sent(frame)

    consumer = asyncio.create_task(consume())
    t0 = time.time()
    await feed()
    await asyncio.sleep(session.clock.delay_s + 0.5)  # let the last frames be presented
    consumer.cancel()
    elapsed = time.time() - t0
    return {
        "latencies": session.latencies_ms(),
        "emitted": emitted,
        "dropped": session.frames_dropped,  # also those known as speech only after they went out
        "fps": emitted / elapsed,
        "replica": session.replica,
    }


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    arr = np.asarray(values)
    return {
        "p50": round(float(np.percentile(arr, 50)), 2),
        "p95": round(float(np.percentile(arr, 95)), 2),
        "p99": round(float(np.percentile(arr, 99)), 2),
        "max": round(float(arr.max()), 2),
    }


async def run_once(settings: Settings, sessions: int, seconds: float, schedule: str, speech: np.ndarray) -> dict:
    from actors.pipeline import RayPipeline

    if schedule == "batch16":
        settings = settings.model_validate(
            {**settings.model_dump(), "pipeline": {**settings.pipeline.model_dump(), "playout_delay_ms": BATCH16_PLAYOUT_MS}}
        )
    pipeline = await RayPipeline.connect(settings, schedule=schedule)  # type: ignore[arg-type]
    opened = [await pipeline.create_session() for _ in range(sessions)]
    offset = len(speech) // max(1, sessions)
    rng = np.random.default_rng(sessions)
    try:
        results = await asyncio.gather(
            *[
                drive_session(s, np.roll(speech, -i * offset), seconds, float(rng.uniform(0, 0.04)))
                for i, s in enumerate(opened)
            ]
        )
        replica_stats = await pipeline.replica_stats()
    finally:
        await pipeline.shutdown()
    latencies = [v for r in results for v in r["latencies"]]
    return {
        "schedule": schedule,
        "sessions": sessions,
        "seconds": seconds,
        "playout_delay_ms": settings.pipeline.playout_delay_ms,
        "frames": int(sum(r["emitted"] for r in results)),
        "speech_frames_measured": len(latencies),
        "latency_ms": percentiles(latencies),
        "dropped_frames": int(sum(r["dropped"] for r in results)),
        "fps_per_session": round(float(np.mean([r["fps"] for r in results])), 2),
        "replicas": replica_stats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--schedule", choices=["streaming", "batch16", "both"], default="both")
    parser.add_argument("--sweep", help="comma-separated session counts, e.g. 1,2,4,8 (streaming)")
    parser.add_argument("--backend", default="procedural")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/latency.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import ray

    from actors.runtime import init_ray

    home = Path(os.environ.get("RAY_LIPSYNC_HOME") or tempfile.mkdtemp(prefix="lipsync-bench-"))
    settings = Settings(home=home, backend=args.backend)
    init_ray(args.address, include_dashboard=False, logging_level=logging.WARNING)
    speech, source = load_speech(args.seconds)
    runs = []
    try:
        if args.sweep:
            for n in [int(x) for x in args.sweep.split(",")]:
                runs.append(asyncio.run(run_once(settings, n, args.seconds, "streaming", speech)))
                log.info("%s", {k: runs[-1][k] for k in ("sessions", "latency_ms", "dropped_frames")})
        else:
            schedules = ["streaming", "batch16"] if args.schedule == "both" else [args.schedule]
            for schedule in schedules:
                runs.append(asyncio.run(run_once(settings, args.sessions, args.seconds, schedule, speech)))
                log.info("%s", {k: runs[-1][k] for k in ("schedule", "latency_ms", "dropped_frames")})
    finally:
        ray.shutdown()
    out = {
        "benchmark": "latency",
        "backend": args.backend,
        "speech": source,
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    by_schedule = {r["schedule"]: r for r in runs if not args.sweep}
    if "streaming" in by_schedule and "batch16" in by_schedule:
        s, b = by_schedule["streaming"]["latency_ms"]["p50"], by_schedule["batch16"]["latency_ms"]["p50"]
        out["batch16_over_streaming_p50"] = round(b / s, 2) if s else None
    if len(runs) == 1:
        out.update(runs[0])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    sys.stdout.write(json.dumps({k: v for k, v in out.items() if k != "runs"} | {"runs": [
        {k: r[k] for k in ("schedule", "sessions", "latency_ms", "dropped_frames", "fps_per_session")} for r in runs
    ]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
