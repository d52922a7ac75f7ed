"""What the receiver reports about a video sender's link, delivered to the session's encoder.

`LinkFeedback` watches one aiortc video sender's incoming RTCP and acts on it:

- receiver reports (loss, and the round trip aiortc derives from them, read through the public
  `RTCRtpSender.getStats()`) and REMB go to the session's `BitrateController`, whose target is
  handed to the `Vp8Stream` (bandwidth.py, encoder.py);
- PLI / FIR (the receiver lost the picture) make the next frame a keyframe;
- NACKs are answered by aiortc itself: the sender keeps its last 128 packets, our VP8 packets
  included (they go through the sender's packetizer), and resends them (as RTX when negotiated).
  They are only counted here.

aiortc 1.16 has no public way to observe a sender's incoming RTCP: it applies REMB to its own
encoder (unused here: the track hands it packets already encoded) and answers PLI by flagging
that encoder. So `attach` wraps the sender's `_handle_rtcp_packet`, aiortc's per-sender RTCP
entry point, calling aiortc's handler first (retransmissions and statistics keep working). This
is the one place the project touches aiortc internals; `attach` refuses loudly if they change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiortc import RTCRtpSender
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    unpack_remb_fci,
)

from ray_lipsync.webrtc.bandwidth import BitrateController
from ray_lipsync.webrtc.encoder import Vp8Stream

log = logging.getLogger(__name__)

_HOOK = "_handle_rtcp_packet"
LOSS_WINDOW_S = 0.5


@dataclass
class LinkStats:
    """One session's video link as its sender sees it (`GET /v1/sessions/{id}`: `network`)."""

    target_bps: int
    encoder_bps: int
    sent_bps: int
    remb_bps: int | None
    loss: float
    rtt_ms: float | None
    reports: int
    nacks: int
    keyframe_requests: int
    keyframes: int
    encoder_reopens: int
    frames_left_out: int
    frames_replayed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LinkFeedback:
    """Receiver feedback of one video sender -> a `BitrateController` -> a `Vp8Stream`."""

    def __init__(self, encoder: Vp8Stream, controller: BitrateController,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.encoder = encoder
        self.controller = controller
        self._clock = clock
        self._sender: RTCRtpSender | None = None
        self._bytes_seen = 0
        self._counts: tuple[float, int, int] | None = None  # (time, packets lost, received) last read
        self._tasks: set[asyncio.Task[None]] = set()
        self.reports = 0
        self.nacks = 0
        self.keyframe_requests = 0
        encoder.set_target_bitrate(controller.target_bps)

    def attach(self, sender: RTCRtpSender) -> None:
        """Observe `sender`'s incoming RTCP (see the module docstring)."""
        handler = getattr(sender, _HOOK, None)
        if not callable(handler) or not asyncio.iscoroutinefunction(handler):
            raise RuntimeError(f"this aiortc has no RTCRtpSender.{_HOOK}: the link feedback "
                               "(bitrate adaptation, keyframe requests) needs updating for it")
        self._sender = sender

        async def handle(packet: Any) -> None:
            await handler(packet)
            self.observe(packet)

        setattr(sender, _HOOK, handle)

    def observe(self, packet: Any) -> None:
        """One incoming RTCP packet addressed to the sender."""
        now = self._clock()
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            # aiortc routes reports by SSRC; one is read per LOSS_WINDOW_S (Chromium sends one
            # with every NACK: reading each through getStats() would be work for nothing)
            if packet.reports and self._sender is not None and self._report_due(now):
                self._spawn(self._on_report(now))
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            self.nacks += len(packet.lost)
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            self.keyframe_requests += 1
            self.encoder.request_keyframe()
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return  # another application-layer feedback than REMB
            self.controller.on_remb(bitrate, now, streams=len(ssrcs))
            self._apply()

    def stats(self) -> LinkStats:
        c, e = self.controller, self.encoder
        return LinkStats(
            target_bps=c.target_bps, encoder_bps=e.bitrate, sent_bps=int(c.sent_bps(self._clock())),
            remb_bps=c.remb_bps, loss=round(c.loss, 4),
            rtt_ms=None if c.rtt_s is None else round(1000 * c.rtt_s, 1), reports=self.reports,
            nacks=self.nacks, keyframe_requests=self.keyframe_requests, keyframes=e.keyframes,
            encoder_reopens=e.reopens, frames_left_out=e.frames_left_out,
            frames_replayed=e.frames_replayed)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _on_report(self, now: float) -> None:
        """A receiver report arrived: aiortc has put its counts and round trip in getStats().

        The loss is taken from the cumulative counts over at least `LOSS_WINDOW_S`: a report's
        own fraction covers only the time since the receiver's previous report, which Chromium
        sends with every NACK, so most say 0 %."""
        assert self._sender is not None
        report = await self._sender.getStats()
        remote = next((s for s in report.values() if s.type == "remote-inbound-rtp"), None)
        if remote is None:
            return
        previous, self._counts = self._counts, (now, remote.packetsLost, remote.packetsReceived)
        if previous is None:
            return
        _, lost, received = previous
        new_lost = max(0, remote.packetsLost - lost)
        new_received = max(0, remote.packetsReceived - received)
        fraction = new_lost / (new_lost + new_received) if new_lost + new_received else 0.0
        sent, self._bytes_seen = self.encoder.bytes_out - self._bytes_seen, self.encoder.bytes_out
        self.controller.on_sent(sent, now)
        self.controller.on_report(fraction, remote.roundTripTime, now)
        self.reports += 1
        self._apply()

    def _report_due(self, now: float) -> bool:
        return self._counts is None or now - self._counts[0] >= LOSS_WINDOW_S

    def _apply(self) -> None:
        self.encoder.set_target_bitrate(self.controller.target_bps)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
