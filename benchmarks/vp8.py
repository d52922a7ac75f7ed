"""WebRTC video encode cost per frame: the session's `Vp8Stream` vs aiortc's own VP8 encoder.

Both encode the same talking frames (the default avatar rendered by the procedural backend
from speech: ../shared/media/eng.wav when present, else offline TTS) at 1 Mbit/s, one
thread, including the RGB -> yuv420p conversion each path does. Reported: median ms per
frame, the ratio, bitrate, and the mean absolute error of the decoded frames (all pixels, and
the region that moves) so the speed-up is not bought with quality.

    .venv/bin/python benchmarks/vp8.py [--json benchmarks/results/vp8.json] [--frames 250]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.latency import load_speech  # noqa: E402
from ray_lipsync.clock import SAMPLE_RATE, video_pts  # noqa: E402
from ray_lipsync.config import Settings  # noqa: E402
from ray_lipsync.render import render_frames  # noqa: E402
from ray_lipsync.streaming.engine import load_avatar  # noqa: E402
from ray_lipsync.webrtc.encoder import VIDEO_TIME_BASE, Vp8Stream  # noqa: E402
from ray_lipsync.yuv import to_i420  # noqa: E402

log = logging.getLogger("benchmarks.vp8")
BITRATE = 1_000_000  # both encoders at one rate (the session's follows the link in service)
ROUNDS = 3


def talking_frames(n: int) -> np.ndarray:
    """`n` frames of the default avatar talking (procedural backend)."""
    settings = Settings()
    seconds = n / settings.media.fps
    samples = load_speech(seconds)[0][: int(seconds * SAMPLE_RATE)]
    frames = [np.array(f.image) for f in render_frames(samples, load_avatar(settings, "default"), settings)]
    return np.stack((frames * (n // len(frames) + 1))[:n])


def aiortc_encode(frames: np.ndarray) -> tuple[list[float], list[bytes]]:
    """aiortc's encoder; returns the VP8 frames (RTP payload descriptors stripped)."""
    from aiortc.codecs.vpx import Vp8Encoder, VpxPayloadDescriptor

    encoder = Vp8Encoder()
    encoder.target_bitrate = BITRATE  # aiortc clamps to 250k..1.5M
    times, payloads = [], []
    for k, image in enumerate(frames):
        t = time.perf_counter()
        frame = av.VideoFrame.from_ndarray(to_i420(image), format="yuv420p")
        frame.pts, frame.time_base = video_pts(k), VIDEO_TIME_BASE
        rtp_payloads = encoder.encode(frame)[0]
        times.append(time.perf_counter() - t)
        payloads.append(b"".join(VpxPayloadDescriptor.parse(p)[1] for p in rtp_payloads))
    return times, payloads


def stream_encode(frames: np.ndarray) -> tuple[list[float], list[av.Packet]]:
    stream = Vp8Stream(bitrate=BITRATE)
    times, packets = [], []
    for k, image in enumerate(frames):
        t = time.perf_counter()
        packets.append(stream.encode(image, video_pts(k)))
        times.append(time.perf_counter() - t)
    return times, packets


def decode_error(frames: np.ndarray, packets: list, moving: tuple[slice, slice]) -> dict:
    decoder = av.CodecContext.create("libvpx", "r")
    whole, region = [], []
    for image, packet in zip(frames, packets):
        packet = packet if isinstance(packet, av.Packet) else av.Packet(packet)
        out = decoder.decode(packet)[0].to_ndarray(format="rgb24").astype(np.int16)
        diff = np.abs(out - image.astype(np.int16))
        whole.append(diff.mean())
        region.append(diff[moving].mean())
    return {"mean_abs_error": round(float(np.mean(whole)), 3),
            "mean_abs_error_moving_region": round(float(np.mean(region)), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--json", type=Path, help="write the result here (default: stdout)")
    args = parser.parse_args(argv)
    if args.frames < 10:
        parser.error("--frames must be >= 10")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cv2.setNumThreads(1)
    frames = talking_frames(args.frames)
    changed = np.abs(frames.astype(np.int16) - frames[0].astype(np.int16)).max(axis=(0, 3)) > 8
    ys, xs = np.nonzero(changed) if changed.any() else (np.array([0]), np.array([0]))
    moving = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    theirs, ours = [], []
    for _ in range(ROUNDS):  # interleaved, so both see the same machine load
        times, payloads = aiortc_encode(frames)
        theirs += times
        times, packets = stream_encode(frames)
        ours += times
    seconds = len(frames) / 25
    result = {
        "frames": len(frames),
        "size": list(frames.shape[1:3]),
        "aiortc_vp8_ms_per_frame_p50": round(float(np.median(theirs)) * 1000, 3),
        "vp8stream_ms_per_frame_p50": round(float(np.median(ours)) * 1000, 3),
        "speedup": round(float(np.median(theirs) / np.median(ours)), 2),
        "aiortc_vp8_kbit_s": round(sum(map(len, payloads)) * 8 / seconds / 1000),
        "vp8stream_kbit_s": round(sum(p.size for p in packets) * 8 / seconds / 1000),
        "aiortc_vp8_quality": decode_error(frames, payloads, moving),
        "vp8stream_quality": decode_error(frames, packets, moving),
        "vp8stream_keyframes": sum(p.is_keyframe for p in packets),
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
