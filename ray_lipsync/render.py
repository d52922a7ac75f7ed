"""Offline render: an audio file -> a lip-synced MP4 of an avatar.

Pipeline (the same stages the streaming service runs, in one process):
decode to 16 kHz mono -> VAD per 20 ms chunk -> per-frame speech flags (frame k is speech if
chunk 2k or 2k+1 is) -> features of all frames (`Featurizer.offline_features`: the whole clip at
once; for musetalk MuseTalk's exact offline Whisper features, not the streaming windows) -> render the speech
frames in batches of `settings.pipeline.max_batch` -> composite; silent frame k is the
untouched idle frame `avatar.cycle_index(k)` -> H.264 (yuv420p, 25 fps) + AAC audio in MP4.

Frame count = floor(duration x 25): frame k covers samples [640k, 640k + 640) (clock.py).
The audio track holds the whole input, including the last partial frame's samples; it is
encoded as AAC at the pipeline's 16 kHz mono.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np
from tqdm import tqdm

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.backends import create_featurizer, create_renderer
from ray_lipsync.backends.base import Featurizer, Renderer
from ray_lipsync.clock import CHUNKS_PER_FRAME, FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, frames_in_samples
from ray_lipsync.compositing import Compositor
from ray_lipsync.config import Settings
from ray_lipsync.errors import LipsyncError, MalformedAudio
from ray_lipsync.types import RenderJob
from ray_lipsync.yuv import to_i420

log = logging.getLogger(__name__)

VIDEO_ENCODERS = ("libx264", "libopenh264")  # H.264 encoders, in order of preference
AUDIO_BLOCK = 16 * SAMPLES_PER_FRAME  # samples handed to the AAC encoder at once


@dataclass(frozen=True)
class RenderedFrame:
    """Output frame `index` (RGB uint8, possibly a read-only idle frame) and its speech flag."""

    index: int
    image: np.ndarray
    speech: bool


@dataclass(frozen=True)
class RenderReport:
    """What `render_file` produced and how fast."""

    out_path: str
    avatar: str
    backend: str
    frames: int
    speech_frames: int
    audio_seconds: float
    wall_seconds: float
    video_codec: str
    width: int
    height: int

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio rendered per second of wall time."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "realtime_factor": self.realtime_factor}


def frame_speech(chunk_speech: np.ndarray, n_frames: int) -> np.ndarray:
    """Per-frame speech flags: frame k is speech if chunk 2k or 2k+1 is (missing chunks: no)."""
    chunks = np.zeros(n_frames * CHUNKS_PER_FRAME, bool)
    flags = np.asarray(chunk_speech, bool).reshape(-1)[: len(chunks)]
    chunks[: len(flags)] = flags
    return chunks.reshape(n_frames, CHUNKS_PER_FRAME).any(axis=1)


def detect_speech(samples: np.ndarray, settings: Settings) -> np.ndarray:
    """Per-frame speech flags of 16 kHz `samples` from the VAD (settings.audio)."""
    from ray_lipsync.audio.vad import SpeechDetector

    detector = SpeechDetector.from_config(settings.audio)
    return frame_speech(detector.detect(samples), frames_in_samples(len(samples)))


def render_frames(
    samples: np.ndarray,
    avatar: Avatar,
    settings: Settings,
    *,
    speech: np.ndarray | None = None,
    featurizer: Featurizer | None = None,
    renderer: Renderer | None = None,
    compositor: Compositor | None = None,
) -> Iterator[RenderedFrame]:
    """Yield every output frame of `samples` (16 kHz mono float32) in order.

    `speech` holds per-frame flags (default: `detect_speech`); silent frames are the avatar's
    idle frames, shared read-only. Speech frames are rendered in batches of at most
    settings.pipeline.max_batch.
    """
    samples = np.asarray(samples, np.float32).reshape(-1)
    n_frames = frames_in_samples(len(samples))
    if speech is None:
        speech = detect_speech(samples, settings)
    speech = np.asarray(speech, bool).reshape(-1)
    if len(speech) != n_frames:
        raise LipsyncError(f"speech flags cover {len(speech)} frames, the audio has {n_frames}")
    if n_frames == 0:
        return
    featurizer = featurizer or create_featurizer(settings)
    renderer = renderer or create_renderer(settings)
    compositor = compositor or Compositor()
    renderer.load_avatar(avatar)
    compositor.load_avatar(avatar)
    features = featurizer.offline_features(samples)  # musetalk: MuseTalk's own whole-clip path
    max_batch = settings.pipeline.max_batch
    start = 0
    while start < n_frames:
        # a block ends after max_batch speech frames (or at the end of the clip)
        spoken = np.flatnonzero(speech[start:]) + start
        stop = int(spoken[max_batch - 1]) + 1 if len(spoken) >= max_batch else n_frames
        jobs = [RenderJob(avatar.name, avatar.cycle_index(k), features[k]) for k in spoken[spoken < stop]]
        crops = iter(renderer.render(jobs)) if jobs else iter(())
        for k in range(start, stop):
            source = avatar.cycle_index(k)
            crop = next(crops) if speech[k] else None
            yield RenderedFrame(k, compositor.compose(avatar, source, crop), bool(speech[k]))
        start = stop


def pick_video_encoder() -> str:
    """The first H.264 encoder this PyAV build has (libx264 or libopenh264)."""
    for name in VIDEO_ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises different errors per version for an unknown codec
            continue
    raise LipsyncError(f"this PyAV build has no H.264 encoder ({', '.join(VIDEO_ENCODERS)}); install the av wheel from PyPI")


def encode_mp4(
    frames: Iterable[RenderedFrame],
    samples: np.ndarray,
    out_path: str | Path,
    size: tuple[int, int],
    *,
    progress: bool = True,
    crf: int = 20,
    preset: str = "veryfast",
) -> str:
    """Write `frames` (25 fps) and `samples` (16 kHz mono, AAC) to an MP4; returns the codec."""
    samples = np.asarray(samples, np.float32).reshape(-1)
    width, height = size[0] + size[0] % 2, size[1] + size[1] % 2
    codec = pick_video_encoder()
    options = {"crf": str(crf), "preset": preset} if codec == "libx264" else {}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n_frames = frames_in_samples(len(samples))
    with av.open(str(out_path), mode="w") as container:
        video = container.add_stream(codec, rate=FPS, options=options)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        sent = 0

        def push_audio(until: int) -> None:
            nonlocal sent
            while sent < until:
                block = samples[sent : min(until, sent + AUDIO_BLOCK)]
                frame = av.AudioFrame.from_ndarray(block[None, :], format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, sent, Fraction(1, SAMPLE_RATE)
                container.mux(audio.encode(frame))
                sent += len(block)

        bar = tqdm(total=n_frames, unit="frame", desc="render", disable=not progress)
        for rendered in frames:
            frame = av.VideoFrame.from_ndarray(to_i420(rendered.image), format="yuv420p")
            frame.pts, frame.time_base = rendered.index, Fraction(1, FPS)
            container.mux(video.encode(frame))
            push_audio((rendered.index + 1) * SAMPLES_PER_FRAME)
            bar.update(1)
        bar.close()
        push_audio(len(samples))
        container.mux(video.encode(None))
        container.mux(audio.encode(None))
    return codec


def load_render_avatar(settings: Settings, avatar_name: str | None) -> Avatar:
    """The named avatar from the store (prepared on first use), or the default avatar."""
    from ray_lipsync.avatar.default import load_or_prepare
    from ray_lipsync.avatar.store import AvatarStore

    return load_or_prepare(AvatarStore(settings.avatars_dir, settings.avatar_uri), avatar_name or settings.avatar.name, settings.avatar)


def render_file(
    audio_path: str | Path,
    out_path: str | Path,
    settings: Settings,
    avatar_name: str | None = None,
    progress: bool = True,
) -> RenderReport:
    """Render `audio_path` as a lip-synced MP4 at `out_path` (see module doc); returns a report."""
    from ray_lipsync.audio import load_audio

    started = time.perf_counter()
    samples = load_audio(audio_path, settings.audio)
    n_frames = frames_in_samples(len(samples))
    if n_frames == 0:
        raise MalformedAudio(
            f"{audio_path} holds {len(samples) / SAMPLE_RATE * 1000:.0f} ms of audio; "
            f"a video needs at least one frame ({1000 // FPS} ms)"
        )
    avatar = load_render_avatar(settings, avatar_name)
    speech = detect_speech(samples, settings)
    frames = render_frames(samples, avatar, settings, speech=speech)
    codec = encode_mp4(frames, samples, out_path, avatar.size, progress=progress)
    report = RenderReport(
        out_path=str(out_path),
        avatar=avatar.name,
        backend=settings.backend,
        frames=n_frames,
        speech_frames=int(speech.sum()),
        audio_seconds=len(samples) / SAMPLE_RATE,
        wall_seconds=time.perf_counter() - started,
        video_codec=codec,
        width=avatar.size[0] + avatar.size[0] % 2,
        height=avatar.size[1] + avatar.size[1] % 2,
    )
    log.info(
        "rendered %d frames (%d speech) to %s at %.1fx real time",
        report.frames, report.speech_frames, out_path, report.realtime_factor,
    )
    return report
