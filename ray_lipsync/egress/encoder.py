"""One H.264 + AAC encode of a session's frames, shared by every egress output.

`AvEncoder.encode(frame)` turns an `OutputFrame` into `EncodedPacket`s: the picture as one
H.264 packet (libx264, `tune=zerolatency`: no B-frames, one packet per frame, dts = pts),
its 40 ms of audio resampled to 48 kHz mono (PyAV's AudioResampler) and encoded as AAC. The
recording and every restream target mux these same packets into their own container
(sink.py), so adding a target costs a mux, not an encode.

Timestamps come from the frame index (25 fps), never from the wall clock: video pts =
k - k0 in 1/25 s, audio pts counts 48 kHz samples from k0 (k0: the first frame encoded), so
video and audio keep the session clock's alignment. A frame the encoder never got (its
buffer dropped it) leaves a gap in the video and is filled with silence in the audio (the
AAC stream never has a gap).

`templates` are the streams outputs copy their codec parameters from
(`OutputContainer.add_stream_from_template`): they belong to an in-memory MP4 container that
opens the codecs with global headers (SPS/PPS in the extradata), as FLV and MP4 need; MPEG-TS
gets them in-band (FFmpeg's muxer adds them to keyframes).
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from ray_lipsync.clock import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from ray_lipsync.types import OutputFrame
from ray_lipsync.yuv import to_i420

log = logging.getLogger(__name__)

AAC_RATE = 48_000  # what RTMP ingests expect (44.1 or 48 kHz)
VIDEO_TIME_BASE = Fraction(1, FPS)
AUDIO_TIME_BASE = Fraction(1, AAC_RATE)
PCM_TIME_BASE = Fraction(1, SAMPLE_RATE)


@dataclass(frozen=True)
class EncodedPacket:
    """One encoded packet, immutable, shareable between output threads."""

    kind: str  # "video" or "audio"
    data: bytes
    pts: int
    dts: int
    time_base: Fraction
    keyframe: bool

    @property
    def seconds(self) -> float:
        return float(self.pts * self.time_base)


@dataclass(frozen=True)
class EncoderSettings:
    """How the shared encode runs (config.EgressConfig)."""

    video_bitrate: int = 1_000_000
    audio_bitrate: int = 64_000
    keyframe_interval: int = 2 * FPS  # frames
    preset: str = "veryfast"


class AvEncoder:
    """H.264 + AAC of one session's frames at `width` x `height` (call from one thread)."""

    def __init__(self, width: int, height: int, settings: EncoderSettings = EncoderSettings()) -> None:
        self.width, self.height = width + width % 2, height + height % 2
        self._template = av.open(io.BytesIO(), "w", format="mp4")
        from ray_lipsync.render import pick_video_encoder

        codec = pick_video_encoder()
        options = {"preset": settings.preset, "tune": "zerolatency"} if codec == "libx264" else {}
        video = self._template.add_stream(codec, rate=FPS, options=options)
        video.width, video.height, video.pix_fmt = self.width, self.height, "yuv420p"
        ctx = video.codec_context
        ctx.bit_rate = settings.video_bitrate
        ctx.gop_size = settings.keyframe_interval
        ctx.thread_count = 1  # one core per session's encode, whatever the host (costs: benchmarks/README.md)
        if codec == "libx264":  # constrained VBR, as RTMP ingests ask for
            ctx.options = {**options, "maxrate": str(settings.video_bitrate),
                           "bufsize": str(settings.video_bitrate * 2), "sc_threshold": "0"}
        audio = self._template.add_stream("aac", rate=AAC_RATE, layout="mono")
        audio.codec_context.bit_rate = settings.audio_bitrate
        self._template.start_encoding()  # opens both codecs: the extradata outputs copy
        self.video_template, self.audio_template = video, audio
        self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=AAC_RATE)
        self._first: int | None = None
        self._next: int | None = None  # the frame index expected next
        self._keyframe = threading.Event()
        self.frames = 0
        self.gaps = 0  # frames never received (filled with silence)

    def request_keyframe(self) -> None:
        """Make the next picture a keyframe (thread-safe): a new output starts on it."""
        self._keyframe.set()

    def encode(self, frame: OutputFrame) -> list[EncodedPacket]:
        """The packets of `frame` (video then audio), in the order they are to be muxed."""
        k = frame.frame_index
        if self._first is None:
            self._first = self._next = k
        assert self._next is not None
        if k < self._next:
            log.debug("egress encoder: frame %d came after %d; ignored", k, self._next - 1)
            return []
        packets: list[EncodedPacket] = []
        for missing in range(self._next, k):  # never received: the audio goes on (silence)
            self.gaps += 1
            packets += self._audio(np.zeros(SAMPLES_PER_FRAME, np.float32), missing)
        self._next = k + 1
        packets = self._video(np.asarray(frame.image), k) + packets + self._audio(frame.audio, k)
        self.frames += 1
        return packets

    def flush(self) -> list[EncodedPacket]:
        """What the codecs still hold (call once, at the end)."""
        out = [self._packet("video", p) for p in self.video_template.encode(None)]
        for resampled in self._resampler.resample(None):
            out += [self._packet("audio", p) for p in self.audio_template.encode(resampled)]
        return out + [self._packet("audio", p) for p in self.audio_template.encode(None)]

    def close(self) -> None:
        try:
            self._template.close()
        except Exception:  # noqa: BLE001 - the in-memory template only
            log.debug("closing the template container failed", exc_info=True)

    def _video(self, image: np.ndarray, k: int) -> list[EncodedPacket]:
        if image.shape[:2] != (self.height, self.width):
            image = _fit(image, self.width, self.height)
        picture = av.VideoFrame.from_ndarray(to_i420(image), format="yuv420p")
        picture.pts, picture.time_base = k - (self._first or 0), VIDEO_TIME_BASE
        if self._keyframe.is_set():
            self._keyframe.clear()
            picture.pict_type = av.video.frame.PictureType.I
        return [self._packet("video", p) for p in self.video_template.encode(picture)]

    def _audio(self, samples: np.ndarray | None, k: int) -> list[EncodedPacket]:
        pcm = np.zeros(SAMPLES_PER_FRAME, np.float32)
        if samples is not None:
            given = np.asarray(samples, np.float32).reshape(-1)[:SAMPLES_PER_FRAME]
            pcm[: len(given)] = given
        chunk = av.AudioFrame.from_ndarray((np.clip(pcm, -1, 1) * 32767).astype(np.int16)[None, :],
                                           format="s16", layout="mono")
        chunk.sample_rate = SAMPLE_RATE
        chunk.pts, chunk.time_base = (k - (self._first or 0)) * SAMPLES_PER_FRAME, PCM_TIME_BASE
        out: list[EncodedPacket] = []
        for resampled in self._resampler.resample(chunk):
            out += [self._packet("audio", p) for p in self.audio_template.encode(resampled)]
        return out

    @staticmethod
    def _packet(kind: str, packet: av.Packet) -> EncodedPacket:
        tb = packet.time_base or (VIDEO_TIME_BASE if kind == "video" else AUDIO_TIME_BASE)
        return EncodedPacket(kind, bytes(packet), int(packet.pts), int(packet.dts if packet.dts is not None else packet.pts),
                             Fraction(tb), bool(packet.is_keyframe))


def _fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """`image` padded or cut to width x height (odd sizes: H.264's 4:2:0 needs even ones)."""
    out = np.zeros((height, width, 3), np.uint8)
    h, w = min(height, image.shape[0]), min(width, image.shape[1])
    out[:h, :w] = image[:h, :w]
    return out
