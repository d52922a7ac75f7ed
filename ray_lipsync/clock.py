"""The media clock: the one place where frame k is timed.

Audio runs at 16 kHz mono in 20 ms chunks (320 samples); video at 25 fps. Frame k covers
samples [640k, 640k + 640), i.e. chunks 2k and 2k+1, and is presented together with them at
`t0 + D + k * 40 ms` (D = playout delay). Video PTS use a 90 kHz clock (3600 ticks/frame);
audio PTS count samples at the output rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SAMPLE_RATE = 16_000
CHUNK_SAMPLES = 320
FPS = 25
CHUNKS_PER_FRAME = 2
SAMPLES_PER_FRAME = CHUNK_SAMPLES * CHUNKS_PER_FRAME  # 640
FRAME_MS = 1000 // FPS  # 40
CHUNK_MS = FRAME_MS // CHUNKS_PER_FRAME  # 20
VIDEO_CLOCK_HZ = 90_000
PTS_PER_FRAME = VIDEO_CLOCK_HZ // FPS  # 3600


def frame_of_chunk(chunk_index: int) -> int:
    """The video frame that chunk `chunk_index` belongs to."""
    return chunk_index // CHUNKS_PER_FRAME


def chunks_of_frame(frame_index: int) -> tuple[int, int]:
    """The two audio chunks presented with frame `frame_index`."""
    first = frame_index * CHUNKS_PER_FRAME
    return first, first + 1


def sample_range(frame_index: int) -> tuple[int, int]:
    """Half-open range of 16 kHz samples covered by frame `frame_index`."""
    start = frame_index * SAMPLES_PER_FRAME
    return start, start + SAMPLES_PER_FRAME


def video_pts(frame_index: int) -> int:
    """Presentation timestamp of frame `frame_index` on the 90 kHz video clock."""
    return frame_index * PTS_PER_FRAME


def audio_pts(chunk_index: int, rate: int = SAMPLE_RATE) -> int:
    """Presentation timestamp of chunk `chunk_index`, counted in samples at `rate`."""
    return chunk_index * rate * CHUNK_MS // 1000


def frames_in_samples(n_samples: int) -> int:
    """Whole frames covered by `n_samples` samples: floor(duration x 25)."""
    return n_samples // SAMPLES_PER_FRAME


def frames_ready(n_samples: int, lookahead_samples: int) -> int:
    """Frames computable once `n_samples` have arrived and each needs `lookahead_samples` more."""
    return max(0, (n_samples - lookahead_samples) // SAMPLES_PER_FRAME)


def ms_to_samples(ms: float) -> int:
    return int(round(ms * SAMPLE_RATE / 1000))


@dataclass(frozen=True)
class SessionClock:
    """One clock per session: frame k and its chunks share `presentation_time(k)`.

    `t0` is the wall-clock time (s, `time.time()`, comparable across the processes and nodes
    of a cluster) at which frame 0's audio slot starts; `delay_s` is the playout delay D.
    Video and audio are both paced from this clock, never from two counters.
    """

    t0: float
    delay_s: float

    def presentation_time(self, frame_index: int) -> float:
        return self.t0 + self.delay_s + frame_index * FRAME_MS / 1000

    def chunk_time(self, chunk_index: int) -> float:
        return self.t0 + self.delay_s + chunk_index * CHUNK_MS / 1000

    def due_in(self, now: float) -> float:
        """Seconds from wall-clock `now` until frame 0 is presented (see `AudioPush.due_in_s`)."""
        return self.presentation_time(0) - now

    def frame_at(self, now: float) -> int:
        """Index of the frame due at time `now` (may be negative before start)."""
        # the epsilon keeps float rounding at a frame's exact start from landing on frame k-1
        return math.floor((now - self.t0 - self.delay_s) * 1000 / FRAME_MS + 1e-6)


def frame_deadline(origin: float, frame_index: int) -> float:
    """When frame `frame_index` is presented, on the local clock whose frame 0 is at `origin`.

    Remote stages get `origin = time.monotonic() + push.due_in_s` on arrival of a push.
    """
    return origin + frame_index * FRAME_MS / 1000
