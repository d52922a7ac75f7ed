"""The session's encoders: RGB frames -> VP8 packets, 20 ms chunks -> Opus packets.

aiortc's own VP8 encoder is tuned for camera input (temporal denoising, cpu-used -6). An
avatar is rendered, noise-free content on a still background, so this one turns the denoiser
off, uses libvpx's fastest real-time speed and skips unchanged blocks: far less encode time
per frame than aiortc's settings, on what is the gateway's largest per-frame cost (measured:
benchmarks/README.md, sections "vp8.py: WebRTC video encode cost" and "Figures behind settings
in the code"). The video track hands the packets to aiortc, whose sender only packetizes them
(`Vp8Encoder.pack`).

Keyframes: the first frame, every `keyframe_interval` frames (a safety net), and whenever the
receiver asks (RTCP PLI / FIR), which `attach_keyframe_requests` routes here.
"""

from __future__ import annotations

import fractions
import logging
import threading

import av
import numpy as np
from aiortc import RTCRtpSender

from ray_lipsync.clock import CHUNK_MS, CHUNK_SAMPLES, SAMPLE_RATE, VIDEO_CLOCK_HZ
from ray_lipsync.yuv import to_i420

log = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
BITRATE = 1_000_000  # bit/s cap; a talking avatar needs far less between keyframes
KEYFRAME_INTERVAL = 250  # frames (10 s): recovery even if a keyframe request is lost


class Vp8Stream:
    """One session's VP8 encoder state: call `encode` for every frame, in order."""

    def __init__(self, bitrate: int = BITRATE, keyframe_interval: int = KEYFRAME_INTERVAL) -> None:
        if bitrate <= 0 or keyframe_interval < 1:
            raise ValueError("bitrate must be > 0 and keyframe_interval >= 1")
        self.bitrate = bitrate
        self.keyframe_interval = keyframe_interval
        self._codec: av.VideoCodecContext | None = None
        self._since_keyframe = 0
        self._keyframe_requested = threading.Event()

    def request_keyframe(self) -> None:
        """Make the next encoded frame a keyframe (thread-safe)."""
        self._keyframe_requested.set()

    def encode(self, image: np.ndarray, pts: int) -> av.Packet:
        """The VP8 packet of an RGB uint8 HxWx3 image shown at `pts` (90 kHz clock)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
        frame = av.VideoFrame.from_ndarray(to_i420(image), format="yuv420p")
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        codec = self._open(frame.width, frame.height)
        keyframe = self._since_keyframe == 0 or self._keyframe_requested.is_set() \
            or self._since_keyframe >= self.keyframe_interval
        if keyframe:
            self._keyframe_requested.clear()
            frame.pict_type = av.video.frame.PictureType.I
            self._since_keyframe = 0
        self._since_keyframe += 1
        packets = codec.encode(frame)
        if len(packets) != 1:  # lag-in-frames 0: one packet in, one out
            raise RuntimeError(f"libvpx returned {len(packets)} packets for one frame")
        packet = packets[0]
        packet.pts = pts
        packet.time_base = VIDEO_TIME_BASE
        return packet

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        codec = self._codec
        if codec is not None and (codec.width, codec.height) == (width, height):
            return codec
        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height = width, height
        codec.pix_fmt = "yuv420p"
        codec.time_base = VIDEO_TIME_BASE
        codec.bit_rate = self.bitrate
        codec.gop_size = self.keyframe_interval
        codec.qmin, codec.qmax = 2, 56
        codec.thread_count = 1
        codec.options = {
            "deadline": "realtime",
            "cpu-used": "-16",  # fastest real-time speed
            "lag-in-frames": "0",
            "noise-sensitivity": "0",  # rendered frames carry no sensor noise to filter
            # skip blocks that barely changed: the background of an avatar is still, so this
            # cuts the encode time for a slightly larger error in the moving mouth region
            # (measured: benchmarks/README.md, section "Figures behind settings in the code")
            "static-thresh": "500",
            "maxrate": str(self.bitrate),
            "bufsize": str(self.bitrate),
            "undershoot-pct": "100",
            "overshoot-pct": "15",
            "partitions": "0",
        }
        self._codec = codec
        self._since_keyframe = 0
        log.debug("vp8: encoder opened at %dx%d, %d bit/s", width, height, self.bitrate)
        return codec


OPUS_BITRATE = 32_000  # bit/s: wideband speech


class OpusStream:
    """One session's Opus encoder: 20 ms s16 mono 16 kHz frames -> one Opus packet each.

    aiortc's own Opus encoder resamples to 48 kHz through a resampler that holds back a few
    samples, so chunk c's packet only leaves once chunk c+1 arrived (20 ms late). libopus takes
    16 kHz input directly: every chunk leaves as one packet at once, its RTP timestamp
    `960 * c` (aiortc's `OpusEncoder.pack` converts the pts to the 48 kHz RTP clock).
    """

    def __init__(self, bitrate: int = OPUS_BITRATE) -> None:
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.sample_rate = SAMPLE_RATE
        self._codec.layout = "mono"
        self._codec.format = "s16"
        self._codec.bit_rate = bitrate
        self._codec.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._codec.options = {"application": "voip", "frame_duration": str(CHUNK_MS)}

    def encode(self, chunk: av.AudioFrame) -> av.Packet:
        """The Opus packet of one 20 ms chunk, with the chunk's pts and time base."""
        if chunk.samples != CHUNK_SAMPLES or chunk.sample_rate != SAMPLE_RATE:
            raise ValueError(f"expected {CHUNK_SAMPLES} samples at {SAMPLE_RATE} Hz, got "
                             f"{chunk.samples} at {chunk.sample_rate} Hz")
        packets = self._codec.encode(chunk)
        if len(packets) != 1:  # libopus: one frame in, one packet out
            raise RuntimeError(f"libopus returned {len(packets)} packets for one chunk")
        packet = packets[0]
        packet.pts = chunk.pts
        packet.time_base = chunk.time_base
        return packet


def attach_keyframe_requests(sender: RTCRtpSender, stream: Vp8Stream) -> None:
    """Route the receiver's keyframe requests (RTCP PLI / FIR) for `sender` to `stream`.

    aiortc answers PLI / FIR by calling the sender's `_send_keyframe()`, which only flags its
    own encoder; with pre-encoded packets the flag must reach this stream instead.
    """
    sender._send_keyframe = stream.request_keyframe  # type: ignore[method-assign]
