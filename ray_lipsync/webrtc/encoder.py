"""The session's encoders: RGB frames -> VP8 packets, 20 ms chunks -> Opus packets.

aiortc's own VP8 encoder is tuned for camera input (temporal denoising, cpu-used -6). An
avatar is rendered, noise-free content on a still background, so this one turns the denoiser
off, uses libvpx's fastest real-time speed and skips unchanged blocks: far less encode time
per frame than aiortc's settings, on what is the gateway's largest per-frame cost (measured:
benchmarks/README.md, sections "vp8.py: WebRTC video encode cost" and "Figures behind settings
in the code"). The video track hands the packets to aiortc, whose sender only packetizes them
(`Vp8Encoder.pack`).

Rate control is libvpx's CBR at the target that the link feedback sets (`set_target_bitrate`,
driven by rtcp.py / bandwidth.py), with a half-second buffer and keyframes capped at three
frames' budget (`max-intra-rate`): an uncapped keyframe of the default avatar is far larger
than a slow link carries in time, so it never arrived whole and the receiver's PLI brought the
next one (figures: benchmarks/README.md, section "network.py"). libvpx (through FFmpeg) takes
a new bitrate only when the encoder is opened again, as aiortc's own encoder does too: a
decrease is applied at the next frame, an increase at most every `RAISE_GAP_FRAMES`, and only
steps of more than `RATE_STEP` count, since each reopening starts with a (capped) keyframe.

A still picture (a still-image avatar in silence: the same read-only frame handed out again)
is not encoded again on every frame: after `STILL_AFTER_FRAMES` repeats (1 s; counted again
from a keyframe) the gap between the frames sent grows by one frame every `STILL_HOLD` frames
sent, up to `still_every` (`webrtc.still_fps`; 5 fps by default), and the frames between are
left out (`skips`). The receiver keeps showing the picture it has. The growth is slow enough
for Chromium's freeze detector, which counts a frame as frozen when it comes later than
max(3 x, + 150 ms) the average of the last 30 frame intervals: growing every frame sent
(80, 120, 160, 200 ms) was counted as one freeze; holding each gap 5 frames leaves >= 40 ms
to spare. The first changed picture (speech) is encoded at once.

Keyframes: the first frame, every `keyframe_interval` frames (a safety net), and whenever the
receiver asks (RTCP PLI / FIR, routed here by rtcp.py), at most one per
`KEYFRAME_REQUEST_GAP` frames (a receiver repeats its request until a keyframe arrives).
"""

from __future__ import annotations

import fractions
import logging
import threading

import av
import numpy as np

from ray_lipsync.clock import CHUNK_MS, CHUNK_SAMPLES, FPS, SAMPLE_RATE, VIDEO_CLOCK_HZ
from ray_lipsync.webrtc.loop import IdleLoop, picture_key
from ray_lipsync.yuv import to_i420

log = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
BITRATE = 200_000  # bit/s until the link feedback says otherwise (webrtc.start_bitrate)
KEYFRAME_INTERVAL = 250  # frames (10 s): recovery even if a keyframe request is lost
KEYFRAME_REQUEST_GAP = 12  # frames (~0.5 s) between keyframes made on request
RATE_STEP = 0.25  # a new target this far (relative) from the encoder's reopens it
RAISE_GAP_FRAMES = 75  # frames (3 s) between reopenings that raise the bitrate
# repeats of a still picture encoded at the full rate before the frame gap grows (also after a
# keyframe): a picture's quality keeps improving over its first frames (libvpx spends the
# rate on it), which at 5 fps would take seconds to show
STILL_AFTER_FRAMES = 25
STILL_EVERY = 5  # frames: the largest gap of a still picture (5 fps)
STILL_HOLD = 5  # frames sent at each gap before it grows by one frame


class Vp8Stream:
    """One session's VP8 encoder state: call `encode` for every frame, in order."""

    def __init__(self, bitrate: int = BITRATE, keyframe_interval: int = KEYFRAME_INTERVAL,
                 still_every: int = STILL_EVERY) -> None:
        if bitrate <= 0 or keyframe_interval < 1 or still_every < 1:
            raise ValueError("bitrate must be > 0, keyframe_interval and still_every >= 1")
        self.still_every = still_every
        self._restart_still()
        self._since_sent = 0
        self.bitrate = bitrate  # what the open encoder aims for
        self._wanted = bitrate  # what the link feedback asks for (set from the event loop)
        self.keyframe_interval = keyframe_interval
        self._codec: av.VideoCodecContext | None = None
        self._since_keyframe = 0
        self._since_open = 0
        self._keyframe_requested = threading.Event()
        self._last_image: np.ndarray | None = None  # the last image encoded, its key and I420 planes
        self._last_key: tuple | None = None
        self._last_i420: np.ndarray | None = None
        self._keyed: tuple[np.ndarray | None, tuple | None] = (None, None)  # this frame and its key
        self.bytes_out = 0  # every packet's size, summed (the link feedback reads it)
        self.keyframes = 0
        self.reopens = 0
        self.frames_left_out = 0  # repeats of a still picture not encoded (`skips`)
        self.loop = IdleLoop()  # a video avatar's idle cycle, sent again (`replay`)

    @property
    def frames_replayed(self) -> int:
        return self.loop.frames_replayed

    def request_keyframe(self) -> None:
        """Make the next encoded frame a keyframe (thread-safe)."""
        self._keyframe_requested.set()

    def set_target_bitrate(self, bps: int) -> None:
        """Aim for `bps` from a coming frame on (see the module docstring for when)."""
        if bps <= 0:
            raise ValueError(f"bitrate must be > 0, got {bps}")
        self._wanted = int(bps)

    def skips(self, image: np.ndarray) -> bool:
        """Whether the frame of `image` may be left out (not encoded, not sent): a repeat of
        the still picture the receiver already shows, between two of its spaced-out frames
        (module docstring). Call once per frame, before `encode`; False means encode it."""
        if not self._same_as_last(image) or self._keyframe_requested.is_set():
            return False
        self._still_repeats += 1
        self._since_sent += 1
        if self._since_sent < self._still_gap:
            self.frames_left_out += 1
            return True
        if self._still_repeats > STILL_AFTER_FRAMES:
            self._sent_at_gap += 1
            if self._sent_at_gap >= STILL_HOLD and self._still_gap < self.still_every:
                self._still_gap, self._sent_at_gap = self._still_gap + 1, 0
        return False

    def _restart_still(self) -> None:
        """A new picture (or a keyframe of it): its repeats go at the full rate again."""
        self._still_repeats = 0  # frames since the picture last changed
        self._still_gap = 1  # frames between the still picture's frames sent, now
        self._sent_at_gap = 0  # frames sent at that gap

    def replay(self, image: np.ndarray, pts: int) -> av.Packet | None:
        """The packet recorded for this frame of a repeating idle cycle (webrtc/loop.py), to
        send instead of encoding it; None: encode it. Call once per frame sent, before
        `encode`, to use the loop (a caller that never does only encodes)."""
        # a keyframe asked for, or a new bitrate (the reopening drops the recording): encode
        allowed = not (self._keyframe_requested.is_set() or self._rate_changed())
        data = self.loop.next_packet(self._key(image), allowed=allowed)
        if data is None:
            return None
        self._since_sent = 0
        packet = av.Packet(data)
        packet.pts = pts
        packet.time_base = VIDEO_TIME_BASE
        self.bytes_out += packet.size
        return packet

    def encode(self, image: np.ndarray, pts: int) -> av.Packet:
        """The VP8 packet of an RGB uint8 HxWx3 image shown at `pts` (90 kHz clock)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
        self._since_sent = 0
        if not self._same_as_last(image):  # a silent avatar repeats its frame: convert it once
            self._last_image, self._last_key, self._last_i420 = image, self._key(image), to_i420(image)
            self._restart_still()
        frame = av.VideoFrame.from_ndarray(self._last_i420, format="yuv420p")
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        codec = self._open(frame.width, frame.height)
        requested = self._keyframe_requested.is_set() and self._since_keyframe >= KEYFRAME_REQUEST_GAP
        keyframe = (self._since_keyframe == 0 or requested or self._since_keyframe >= self.keyframe_interval
                    or self.loop.wants_keyframe())
        if keyframe:
            self._keyframe_requested.clear()
            frame.pict_type = av.video.frame.PictureType.I
            self._since_keyframe = 0
            self.keyframes += 1
            self._restart_still()
        self._since_keyframe += 1
        self._since_open += 1
        packets = codec.encode(frame)
        if len(packets) != 1:  # lag-in-frames 0: one packet in, one out
            raise RuntimeError(f"libvpx returned {len(packets)} packets for one frame")
        packet = packets[0]
        packet.pts = pts
        packet.time_base = VIDEO_TIME_BASE
        self.bytes_out += packet.size
        self.loop.encoded(image, self._key(image), packet, keyframe)
        return packet

    def _key(self, image: np.ndarray) -> tuple | None:
        """`picture_key` of the frame being sent, computed once for it (`skips`, `replay` and
        `encode` all ask; an array's key cannot change while it exists)."""
        if self._keyed[0] is not image:
            self._keyed = (image, picture_key(image))
        return self._keyed[1]

    def _same_as_last(self, image: np.ndarray) -> bool:
        """Whether `image` shows what the last image encoded showed: the same untouched avatar
        frame handed out again (`picture_key`; holding that image keeps its memory alive, so
        its address cannot come back with other pixels)."""
        key = self._key(image)
        return key is not None and key == self._last_key

    def _rate_changed(self) -> bool:
        wanted, current = self._wanted, self.bitrate
        if abs(wanted - current) <= RATE_STEP * current:
            return False
        return wanted < current or self._since_open >= RAISE_GAP_FRAMES

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        codec = self._codec
        if codec is not None and (codec.width, codec.height) == (width, height) and not self._rate_changed():
            return codec
        if codec is not None:
            self.reopens += 1
            self.loop.drop(RAISE_GAP_FRAMES)
        self.bitrate = self._wanted
        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height = width, height
        codec.pix_fmt = "yuv420p"
        codec.time_base = VIDEO_TIME_BASE
        codec.framerate = fractions.Fraction(FPS)  # libvpx sizes a frame's budget by it
        codec.bit_rate = self.bitrate
        codec.gop_size = self.keyframe_interval
        codec.qmin, codec.qmax = 2, 63  # 63: keyframes a slow link can carry (benchmarks/README.md, "network.py")
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
            # CBR with a half-second buffer: the rate stays near the target within a second,
            # what a link at that rate can carry (measured: benchmarks/README.md, "network.py")
            "minrate": str(self.bitrate),
            "maxrate": str(self.bitrate),
            "bufsize": str(self.bitrate // 2),
            "undershoot-pct": "50",
            "overshoot-pct": "10",
            "max-intra-rate": "300",  # a keyframe takes at most 3 frames' budget
            "partitions": "0",
        }
        self._codec = codec
        self._since_keyframe = 0
        self._since_open = 0
        log.debug("vp8: encoder opened at %dx%d, %d bit/s", width, height, self.bitrate)
        return codec


OPUS_BITRATE = 32_000  # bit/s: wideband speech
FEC_EXPECTED_LOSS_PCT = 10  # libopus sizes its in-band FEC for this much loss
# In settled silence with DTX, a DTX packet goes out this often (chunks: 400 ms, the interval
# of libopus's own comfort-noise updates) and the chunks between are left out
DTX_EVERY_CHUNKS = 20


class OpusStream:
    """One session's Opus encoder: 20 ms s16 mono 16 kHz frames -> one Opus packet each.

    aiortc's own Opus encoder resamples to 48 kHz through a resampler that holds back a few
    samples, so chunk c's packet only leaves once chunk c+1 arrived (20 ms late). libopus takes
    16 kHz input directly: every chunk leaves as one packet at once, its RTP timestamp
    `960 * c` (aiortc's `OpusEncoder.pack` converts the pts to the 48 kHz RTP clock).


    `fec`: Opus in-band forward error correction (each packet also carries a coarse copy of
    the previous one, which a receiver decodes when that one was lost); the peer turns it on
    when the client's offer asks for it (`useinbandfec=1`, Chromium's default).

    Digital silence (a silent avatar sends zeros) settles within a few chunks on one packet
    that libopus then repeats byte for byte (3 bytes; 8 with FEC): once two silent chunks in a
    row gave the same packet, later silent chunks get that packet without running libopus
    (`chunks_reused` counts them) until a chunk with sound. The encoder then resumes as after
    a shorter silence (its first packet of sound differs by a few bytes from one after the
    whole silence; the decoded sound is the same within 5 % RMS, tests/test_encoders.py).

    `dtx`: discontinuous transmission in that settled silence, as WebRTC's own Opus sender
    does it (the FFmpeg libopus wrapper has no DTX switch): a packet of only the TOC byte
    (an empty frame, which a receiver's jitter buffer takes as "DTX": it plays comfort
    silence instead of concealing a loss) goes out every `DTX_EVERY_CHUNKS` chunks and the
    chunks between are left out (`encode` returns None; `chunks_left_out` counts them). An
    idle session then sends 2.5 audio packets a second instead of 50.
    """

    def __init__(self, bitrate: int = OPUS_BITRATE, fec: bool = False, dtx: bool = False) -> None:
        self.fec = fec
        self.dtx = dtx
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.sample_rate = SAMPLE_RATE
        self._codec.layout = "mono"
        self._codec.format = "s16"
        self._codec.bit_rate = bitrate
        self._codec.time_base = fractions.Fraction(1, SAMPLE_RATE)
        options = {"application": "voip", "frame_duration": str(CHUNK_MS)}
        if fec:  # libopus adds the redundancy only when it expects loss
            options.update(fec="1", packet_loss=str(FEC_EXPECTED_LOSS_PCT))
        self._codec.options = options
        self._silent: bytes | None = None  # the last silent chunk's packet
        self._silence_settled = False  # libopus repeats that packet for every silent chunk
        self._dtx_run = 0  # settled silent chunks so far (DTX: their position in the cycle)
        self.chunks_reused = 0
        self.chunks_left_out = 0

    def encode(self, chunk: av.AudioFrame) -> av.Packet | None:
        """The Opus packet of one 20 ms chunk, with the chunk's pts and time base; None: the
        chunk is left out (DTX in silence)."""
        if chunk.samples != CHUNK_SAMPLES or chunk.sample_rate != SAMPLE_RATE:
            raise ValueError(f"expected {CHUNK_SAMPLES} samples at {SAMPLE_RATE} Hz, got "
                             f"{chunk.samples} at {chunk.sample_rate} Hz")
        silent = not chunk.to_ndarray().any()
        if silent and self._silence_settled:
            run, self._dtx_run = self._dtx_run, self._dtx_run + 1
            if self.dtx and run % DTX_EVERY_CHUNKS:
                self.chunks_left_out += 1
                return None
            self.chunks_reused += 1
            # DTX: the TOC byte alone, frame count code 0: one empty frame
            packet = av.Packet(bytes([self._silent[0] & 0xFC]) if self.dtx else self._silent)
        else:
            self._dtx_run = 0
            packets = self._codec.encode(chunk)
            if len(packets) != 1:  # libopus: one frame in, one packet out
                raise RuntimeError(f"libopus returned {len(packets)} packets for one chunk")
            packet = packets[0]
            data = bytes(packet) if silent else None
            self._silence_settled = data is not None and data == self._silent
            self._silent = data
        packet.pts = chunk.pts
        packet.time_base = chunk.time_base
        return packet
