"""A receiving WebRTC client (aiortc) for tests and benchmarks.

It offers to receive video and audio (and to send a microphone track if given one), reads
every decoded frame and records what arrived: video frame arrival times and sizes, and the
decoded audio as mono float32 at the received rate (Opus decodes to 48 kHz); with
`events=True` it also opens the "events" data channel and records the session's events.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack

from ray_lipsync.webrtc.peer import EVENTS_CHANNEL, ice_configuration

log = logging.getLogger(__name__)

MIC_RATE = 48_000
MIC_FRAME = 960  # 20 ms at 48 kHz


class PlaybackTrack(AudioStreamTrack):
    """A microphone stand-in: 16 kHz `samples` sent as 48 kHz stereo s16 20 ms frames in real
    time; after the end it loops (`loop=True`) or sends silence, as a live mic keeps sending."""

    def __init__(self, samples: np.ndarray, loop: bool = False) -> None:
        super().__init__()
        from ray_lipsync.audio import resample

        pcm = np.clip(resample(np.asarray(samples, np.float32), 16_000, MIC_RATE), -1, 1)
        self._pcm = (pcm * 32767).astype(np.int16)
        self._loop = loop and len(self._pcm) > MIC_FRAME
        self._sent = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self._sent / MIC_RATE - time.monotonic()))
        at = self._sent % (len(self._pcm) - MIC_FRAME) if self._loop else self._sent
        piece = self._pcm[at : at + MIC_FRAME]
        if piece.size < MIC_FRAME:
            piece = np.zeros(MIC_FRAME, np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(piece, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = MIC_RATE, self._sent, fractions.Fraction(1, MIC_RATE)
        self._sent += MIC_FRAME
        return frame


@dataclass
class Received:
    """What a `ReceiverClient` got so far."""

    video_times: list[float] = field(default_factory=list)  # monotonic arrival times
    video_pts: list[int] = field(default_factory=list)
    video_size: tuple[int, int] | None = None  # (width, height)
    last_image: np.ndarray | None = None  # RGB of the latest frame (if keep_images)
    audio: list[np.ndarray] = field(default_factory=list)  # mono float32 pieces
    audio_rate: int | None = None
    audio_frames: int = 0
    audio_samples: int = 0  # mono samples decoded (counted even when audio is not kept)
    events: list[tuple[float, str, dict]] = field(default_factory=list)  # (monotonic time, event, data)

    @property
    def video_frames(self) -> int:
        return len(self.video_times)

    def audio_signal(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)

    def fps(self, start: float, end: float) -> float:
        """Video frames received per second within [start, end) (monotonic times)."""
        n = sum(1 for t in self.video_times if start <= t < end)
        return n / (end - start) if end > start else 0.0


class ReceiverClient:
    """An aiortc peer that receives a session's media; `offer()` then `accept(answer)`."""

    def __init__(
        self,
        *,
        mic: MediaStreamTrack | None = None,
        ice_servers: list[dict] | None = None,
        keep_audio: bool = True,
        keep_images: bool = False,
        events: bool = False,
    ) -> None:
        self._pc = RTCPeerConnection(configuration=ice_configuration(ice_servers))
        self._mic = mic
        self._events = events
        self._event_arrived = asyncio.Event()
        self._keep_audio = keep_audio
        self._keep_images = keep_images
        self.received = Received()
        self.started_at: float | None = None
        self.first_video_at: float | None = None
        self._first_video = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pc.on("track", self._on_track)

    @property
    def connection_state(self) -> str:
        return self._pc.connectionState

    async def offer(self) -> dict:
        """Create the offer: receive video and audio; send audio too when a mic was given."""
        self.started_at = time.monotonic()
        if self._events:
            self._pc.createDataChannel(EVENTS_CHANNEL).on("message", self._on_event)
        self._pc.addTransceiver("video", direction="recvonly")
        if self._mic is not None:
            self._pc.addTransceiver(self._mic, direction="sendrecv")
        else:
            self._pc.addTransceiver("audio", direction="recvonly")
        await self._pc.setLocalDescription(await self._pc.createOffer())
        return {"sdp": self._pc.localDescription.sdp, "type": self._pc.localDescription.type}

    async def accept(self, answer: dict) -> None:
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    async def wait_first_video(self, timeout: float) -> float:
        """Seconds from `offer()` to the first decoded video frame (TimeoutError after `timeout`)."""
        await asyncio.wait_for(self._first_video.wait(), timeout)
        assert self.first_video_at is not None and self.started_at is not None
        return self.first_video_at - self.started_at

    async def wait_event(self, name: str, timeout: float, after: int = 0) -> dict:
        """The data of the first `name` event among those received from the `after`-th on."""
        async with asyncio.timeout(timeout):
            while True:
                found = next((d for _, n, d in self.received.events[after:] if n == name), None)
                if found is not None:
                    return found
                self._event_arrived.clear()
                await self._event_arrived.wait()

    def _on_event(self, message: str | bytes) -> None:
        event = json.loads(message)
        self.received.events.append((time.monotonic(), event["event"], event["data"]))
        self._event_arrived.set()

    async def close(self) -> None:
        await self._pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_track(self, track: MediaStreamTrack) -> None:
        reader = self._read_video if track.kind == "video" else self._read_audio
        self._tasks.append(asyncio.ensure_future(reader(track)))

    async def _read_video(self, track: MediaStreamTrack) -> None:
        async for frame in track_frames(track):
            now = time.monotonic()
            r = self.received
            r.video_times.append(now)
            r.video_pts.append(int(frame.pts or 0))
            r.video_size = (frame.width, frame.height)
            if self._keep_images:
                r.last_image = frame.to_ndarray(format="rgb24")
            if self.first_video_at is None:
                self.first_video_at = now
                self._first_video.set()

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        async for frame in track_frames(track):
            r = self.received
            r.audio_frames += 1
            r.audio_rate = frame.sample_rate
            pcm = frame.to_ndarray()  # s16 packed: (1, samples * channels)
            channels = len(frame.layout.channels)
            mono = pcm.reshape(-1, channels).astype(np.float32).mean(axis=1) / 32768.0
            r.audio_samples += mono.size
            if self._keep_audio:
                r.audio.append(mono)


async def track_frames(track: MediaStreamTrack) -> AsyncIterator[Any]:
    """The frames of a remote track until it ends."""
    while True:
        try:
            yield await track.recv()
        except MediaStreamError:
            return
