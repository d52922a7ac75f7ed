"""The video bitrate a session's link can carry, from what the receiver reports.

Two kinds of receiver feedback reach a sender (see rtcp.py for how they are read):

- REMB (receiver estimated maximum bitrate): the receiver's own delay-based estimate
  (Chromium and aiortc send it when `goog-remb` and `abs-send-time` are negotiated, which
  aiortc's answer does). It caps the target. It covers the streams it names: when it names
  the video alone (Chromium: only video carries abs-send-time here) the audio is not taken off.
- RTCP receiver reports: the fraction of packets lost and, through the sender report they echo,
  the round-trip time. They move the target the way the loss-based half of Google Congestion
  Control does: more than 10 % lost cuts it by half the loss, under 2 % lets it grow by 8 % a
  second, in between holds it. Without a recent REMB, a round trip that grew by more than
  `QUEUE_RTT_S` over the smallest one seen (a queue building on the path) cuts it by 15 %;
  with REMB the receiver's delay estimate is the better signal (aiortc's round trip is
  smoothed over several reports, so it lags a queue by seconds).

Growth is bounded by what the encoder actually sent (`on_sent`): a silent avatar sends a few
kbit/s, and loss-free reports about that say nothing about whether 1 Mbit/s would fit.

The audio never yields: `AUDIO_RESERVE_BPS` (Opus plus the packet overhead of 50 packets a
second) is taken off the receiver's estimate before the video gets the rest, and audio is never
dropped or delayed (tracks.py).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

AUDIO_RESERVE_BPS = 56_000  # Opus 32 kbit/s + 50 packets/s x ~60 bytes of RTP/UDP/IP/SRTP headers
LOSS_HIGH = 0.10  # above: decrease
LOSS_LOW = 0.02  # below: increase
GROWTH_PER_S = 0.08
QUEUE_RTT_S = 0.15  # round trip above the smallest seen by this much: a queue is building
QUEUE_CUT = 0.85
SENT_HEADROOM = 1.5  # the target grows to at most this times the rate actually sent
SENT_WINDOW_S = 2.0
MIN_DECREASE_GAP_S = 1.0  # reports closer than this after a cut describe the same congestion
REMB_FRESH_S = 3.0  # a REMB this recent stands in for the round-trip queue detector


@dataclass(frozen=True)
class BitrateBounds:
    """Configured bounds of a session's video bitrate, bit/s (`webrtc.*_bitrate`)."""

    min_bps: int = 100_000
    start_bps: int = 200_000
    max_bps: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0 < self.min_bps <= self.start_bps <= self.max_bps:
            raise ValueError(f"bitrate bounds must satisfy 0 < min <= start <= max, got "
                             f"{self.min_bps}, {self.start_bps}, {self.max_bps}")

    def clamp(self, bps: float) -> int:
        return int(min(self.max_bps, max(self.min_bps, bps)))


class BitrateController:
    """The video target bitrate of one session, from REMB, loss and round-trip reports.

    Times are seconds on any monotonic clock, passed in (so the policy is testable).
    """

    def __init__(self, bounds: BitrateBounds = BitrateBounds(), now: float = 0.0) -> None:
        self.bounds = bounds
        self._estimate = float(bounds.start_bps)  # loss/delay-based estimate
        self._remb: float | None = None
        self._remb_at = float("-inf")
        self._remb_audio = 0  # what REMB's total includes of the audio
        self._last_update = now
        self._last_decrease = float("-inf")
        self._min_rtt: float | None = None
        self._sent: collections.deque[tuple[float, int]] = collections.deque()
        self.loss = 0.0
        self.rtt_s: float | None = None

    @property
    def target_bps(self) -> int:
        """What the video encoder should aim for now."""
        target = self._estimate
        if self._remb is not None:
            target = min(target, self._remb - self._remb_audio)
        return self.bounds.clamp(target)

    @property
    def remb_bps(self) -> int | None:
        return None if self._remb is None else int(self._remb)

    def on_sent(self, nbytes: int, now: float) -> None:
        """The encoder sent `nbytes` since the last call (the growth bound follows what was sent)."""
        self._sent.append((now, nbytes))
        while self._sent and self._sent[0][0] < now - SENT_WINDOW_S:
            self._sent.popleft()

    def sent_bps(self, now: float) -> float:
        """Video bit rate actually sent over the last `SENT_WINDOW_S`."""
        return 8 * sum(n for t, n in self._sent if t >= now - SENT_WINDOW_S) / SENT_WINDOW_S

    def on_remb(self, bps: float, now: float, streams: int = 2) -> None:
        """The receiver's estimate of the bitrate of the `streams` it names (2: audio too)."""
        if bps > 0:
            self._remb = float(bps)
            self._remb_at = now
            self._remb_audio = AUDIO_RESERVE_BPS if streams > 1 else 0

    def on_report(self, fraction_lost: float, rtt_s: float | None, now: float) -> None:
        """An RTCP receiver report: `fraction_lost` in [0, 1] since the last one, and the
        current round-trip estimate (None before the receiver echoed a sender report)."""
        if not 0.0 <= fraction_lost <= 1.0:
            raise ValueError(f"fraction_lost must be in [0, 1], got {fraction_lost}")
        dt = max(0.0, now - self._last_update)
        self._last_update = now
        self.loss = fraction_lost
        queued = False
        if rtt_s is not None and rtt_s > 0:
            self.rtt_s = rtt_s
            self._min_rtt = rtt_s if self._min_rtt is None else min(self._min_rtt, rtt_s)
            queued = rtt_s - self._min_rtt > QUEUE_RTT_S and now - self._remb_at > REMB_FRESH_S
        if fraction_lost > LOSS_HIGH or queued:
            if now - self._last_decrease >= MIN_DECREASE_GAP_S:
                cut = 1.0 - 0.5 * fraction_lost if fraction_lost > LOSS_HIGH else 1.0
                if queued:
                    cut = min(cut, QUEUE_CUT)
                self._estimate = self.bounds.clamp(self._estimate * cut)
                self._last_decrease = now
            return
        if fraction_lost < LOSS_LOW:
            grown = self._estimate * (1.0 + GROWTH_PER_S) ** min(dt, 1.0)
            ceiling = max(self._estimate, SENT_HEADROOM * self.sent_bps(now))
            self._estimate = self.bounds.clamp(min(grown, ceiling))
