"""Core CPU cost per frame of the procedural path: features, render, composite, and offline render.

Pinned to one thread (OMP/OpenBLAS/MKL env, cv2.setNumThreads(1), torch if loaded) so the
numbers read as "per core". Sizes: the default avatar (512x512, astronaut) and the yongen.mp4
size (704x1216, prepared from ../shared/media/yongen.mp4 when present, else a synthetic face
of that size). Audio: ../shared/media/eng.wav when present, else synthetic vowels.

    .venv/bin/python benchmarks/core.py [--json benchmarks/results/core.json] [--seconds 20]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from ray_lipsync.avatar.model import Avatar  # noqa: E402
from ray_lipsync.backends.procedural import ProceduralFeaturizer, synthetic_avatar  # noqa: E402
from ray_lipsync.clock import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_in_samples, ms_to_samples  # noqa: E402
from ray_lipsync.config import AvatarConfig, Settings  # noqa: E402
from ray_lipsync.render import encode_mp4, render_frames  # noqa: E402
from ray_lipsync.types import FeatureRequest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frame_cost import summary, time_render_composite  # noqa: E402

log = logging.getLogger("benchmarks.core")
MEDIA = Path(__file__).resolve().parents[1] / ".." / "shared" / "media"


def pin_threads() -> None:
    cv2.setNumThreads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def synthetic_speech(seconds: float) -> np.ndarray:
    """Vowel-like syllables of varying loudness and colour with pauses."""
    rng = np.random.default_rng(0)
    parts, total = [], 0
    while total < seconds * SAMPLE_RATE:
        n = int(rng.uniform(0.12, 0.35) * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        f0, f1 = rng.uniform(100, 200), rng.choice([300.0, 500.0, 700.0])
        tone = np.sin(2 * np.pi * f0 * t) + 0.6 * np.sin(2 * np.pi * f1 * t) + 0.3 * np.sin(2 * np.pi * 2300 * t)
        parts += [(rng.uniform(0.05, 0.5) * np.hanning(n) * tone).astype(np.float32)]
        parts += [np.zeros(int(rng.uniform(0.03, 0.3) * SAMPLE_RATE), np.float32)]
        total += len(parts[-1]) + n
    return np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]


def load_speech(seconds: float) -> tuple[np.ndarray, str]:
    path = MEDIA / "eng.wav"
    if path.is_file():
        from ray_lipsync.audio import load_audio

        return load_audio(path)[: int(seconds * SAMPLE_RATE)], str(path.resolve())
    return synthetic_speech(seconds), "synthetic vowels"


def default_avatar(home: Path) -> tuple[Avatar, str]:
    from ray_lipsync.avatar.default import ensure_default_avatar
    from ray_lipsync.avatar.store import AvatarStore

    return ensure_default_avatar(AvatarStore(home), AvatarConfig()), "default (skimage astronaut, prepared)"


def yongen_avatar(max_frames: int) -> tuple[Avatar, str]:
    path = MEDIA / "yongen.mp4"
    if path.is_file():
        from ray_lipsync.avatar.prepare import prepare_video

        avatar, _ = prepare_video(path, "yongen", AvatarConfig(max_frames=max_frames), progress=False)
        return avatar, f"prepared from {path.resolve()} ({len(avatar)} frames)"
    return synthetic_avatar("yongen", size=(704, 1216), n_frames=8), "synthetic face 704x1216 (yongen.mp4 absent)"


def time_features(samples: np.ndarray) -> tuple[dict[str, object], np.ndarray]:
    """Per-frame cost: one request per frame (streaming) and one request for the clip."""
    featurizer = ProceduralFeaturizer(Settings())
    n = frames_in_samples(len(samples))
    lookahead = ms_to_samples(featurizer.lookahead_ms)
    state, per_frame = featurizer.new_state(), []
    for k in range(n):
        lo, hi = k * SAMPLES_PER_FRAME, min(len(samples), (k + 1) * SAMPLES_PER_FRAME + lookahead)
        t0 = time.perf_counter()
        featurizer.featurize([FeatureRequest(state, samples[lo:hi], lo, range(k, k + 1))])
        per_frame.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    features = featurizer.featurize([FeatureRequest(featurizer.new_state(), samples, 0, range(n))])[0]
    whole_ms = (time.perf_counter() - t0) * 1000 / n
    return {"streaming_one_frame_per_request": summary(per_frame),
            "whole_clip_amortised_ms": round(whole_ms, 4)}, features


def time_offline(avatar: Avatar, samples: np.ndarray, out_dir: Path) -> dict[str, object]:
    """Offline render speed (features + render + composite + H.264/AAC encode) vs real time.

    Every frame is treated as speech (no VAD) to measure the worst case.
    """
    n = frames_in_samples(len(samples))
    t0 = time.perf_counter()
    frames = render_frames(samples, avatar, Settings(), speech=np.ones(n, bool))
    codec = encode_mp4(frames, samples, out_dir / f"{avatar.name}.mp4", avatar.size, progress=False)
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()  # idle frames only: what the encoding alone costs
    idle = render_frames(samples, avatar, Settings(), speech=np.zeros(n, bool))
    encode_mp4(idle, samples, out_dir / f"{avatar.name}-idle.mp4", avatar.size, progress=False)
    encode_wall = time.perf_counter() - t0
    seconds = len(samples) / SAMPLE_RATE
    return {"audio_seconds": round(seconds, 2), "wall_seconds": round(wall, 3),
            "realtime_factor": round(seconds / wall, 2), "video_encoder": codec, "frames": n,
            "encode_only_ms_per_frame": round(encode_wall * 1000 / n, 2)}


def bench_size(label: str, avatar: Avatar, source: str, samples: np.ndarray, features: np.ndarray,
               feature_ms: float, repeats: int, out_dir: Path) -> dict[str, object]:
    rc = time_render_composite(avatar, features, repeats)
    total = feature_ms + rc["render"]["median_ms"] + rc["composite"]["median_ms"]
    result = {"avatar": source, "width": avatar.size[0], "height": avatar.size[1], **rc,
              "features_ms": round(feature_ms, 4),
              "sum": {"median_ms": round(total, 4), "frames_per_s_per_core": round(1000 / total, 1)},
              "offline_render": time_offline(avatar, samples, out_dir)}
    log.info("%s: features+render+composite %.3f ms/frame = %.0f frames/s per core; offline %.1fx real time",
             label, total, 1000 / total, result["offline_render"]["realtime_factor"])
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "core.json")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio length used (s)")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the speech frames")
    parser.add_argument("--yongen-frames", type=int, default=50, help="yongen.mp4 frames to prepare")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pin_threads()
    samples, audio_source = load_speech(args.seconds)
    feature_stats, features = time_features(samples)
    feature_ms = feature_stats["streaming_one_frame_per_request"]["median_ms"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        sizes = {}
        for label, (avatar, source) in (("512x512", default_avatar(tmp_dir / "avatars")),
                                        ("704x1216", yongen_avatar(args.yongen_frames))):
            sizes[label] = bench_size(label, avatar, source, samples, features, feature_ms, args.repeats, tmp_dir)
    result = {
        "benchmark": "core", "backend": "procedural", "threads": 1,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "opencv": cv2.__version__},
        "audio": {"source": audio_source, "seconds": round(len(samples) / SAMPLE_RATE, 2),
                  "speech_frames_rendered": int((features.max(axis=1) > 0).sum())},
        "features": feature_stats, "sizes": sizes,
        "target": {"frames_per_s_per_core_at_512": 200,
                   "met": sizes["512x512"]["sum"]["frames_per_s_per_core"] >= 200},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", args.json)
    return result


if __name__ == "__main__":
    main()
