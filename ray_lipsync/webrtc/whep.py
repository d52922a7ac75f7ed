"""WHEP playback (draft-ietf-wish-whep): any number of viewers of one session, one encode.

Each viewer is its own aiortc RTCPeerConnection (answered like `SessionPeer`: VP8 and Opus
only, the session's ICE servers, all candidates in the answer: no trickle), but the media
all viewers get is encoded once: `SharedEncode` reads the session's frames from its fan-out
buffer, runs one `Vp8Stream` (in a worker thread) and one `OpusStream`, and hands the same
packets to every viewer's tracks, so frame k reaches every viewer with the same timestamps,
on the session's clock. A viewer's tracks return those encoded packets from `recv()`; aiortc
only packetizes them.

- A new viewer starts at a keyframe: joining asks the shared encoder for one, and a viewer's
  video track drops packets until it sees one. PLI / FIR from any viewer ask for one too
  (rate-limited by the encoder).
- Bitrate: the shared encode cannot follow each viewer's link. Each viewer has its own
  `BitrateController` fed by its RTCP (as a `SessionPeer`), and the encode runs at the
  *lowest* of their targets (`ViewerRate`): every viewer gets a stream its link carries; a
  slow viewer lowers the quality for all (give it its own session, or a restream, if that
  matters).
- A viewer whose sender lags loses its own oldest video packets (and asks for a keyframe);
  the session and the other viewers are not slowed. Audio is queued up to `AUDIO_QUEUE`.
- Video leaves `webrtc.video_hold_ms` after its audio, as for a session's own peer (a WHEP
  player is a plain `<video>` element: `WebRTCConfig.video_hold_ms`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ray_lipsync.egress.fanout import FrameBuffer
from ray_lipsync.webrtc.bandwidth import BitrateBounds, BitrateController
from ray_lipsync.webrtc.encoder import STILL_EVERY, OpusStream, Vp8Stream
from ray_lipsync.webrtc.peer import (
    ice_configuration,
    opus_codecs,
    parse_offer,
    received_kinds,
    vp8_codecs,
)
from ray_lipsync.webrtc.rtcp import LinkFeedback
from ray_lipsync.webrtc.tracks import CHUNK_S, audio_chunks, hold_frames, video_due, wait_due

if TYPE_CHECKING:
    from ray_lipsync.types import OutputFrame

log = logging.getLogger(__name__)

VIDEO_QUEUE = 4  # packets (160 ms) a viewer's video sender may lag before its oldest is dropped
AUDIO_QUEUE = 150  # packets (3 s)


class ViewerTrack(MediaStreamTrack):
    """One viewer's video or audio: pops the shared encode's packets (waits for a packet's due
    time, waiting at most `max_wait` seconds: audio leaves every 20 ms, video after its hold)."""

    def __init__(self, kind: str, limit: int, on_drop: Callable[[], None] | None = None,
                 max_wait: float = CHUNK_S) -> None:
        super().__init__()
        self.kind = kind
        self._limit = limit
        self._max_wait = max_wait
        self._on_drop = on_drop
        self._queue: collections.deque[tuple[av.Packet, float | None]] = collections.deque()
        self._ready = asyncio.Event()
        self._keyframe_seen = kind != "video"
        self.sent = 0
        self.dropped = 0

    def put(self, packet: av.Packet, due: float | None = None) -> None:
        if not self._keyframe_seen:
            if not packet.is_keyframe:
                return  # a joining viewer starts at a keyframe
            self._keyframe_seen = True
        if len(self._queue) >= self._limit:
            self._queue.popleft()
            self.dropped += 1
            if self.kind == "video":  # its decoder lost a reference: start again at a keyframe
                self._keyframe_seen = False
                if self._on_drop is not None:
                    self._on_drop()
        self._queue.append((packet, due))
        self._ready.set()

    async def recv(self) -> av.Packet:
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if self.readyState != "live":
            raise MediaStreamError
        packet, due = self._queue.popleft()
        await wait_due(due, time.time, self._max_wait)
        self.sent += 1
        return packet

    def stop(self) -> None:
        super().stop()
        self._ready.set()


class ViewerRate:
    """What one viewer's link feedback sees as its encoder: the shared `Vp8Stream`, whose
    target is the lowest of all viewers' (module docstring)."""

    def __init__(self, shared: SharedEncode, viewer_id: str) -> None:
        self._shared = shared
        self._viewer_id = viewer_id

    def set_target_bitrate(self, bps: int) -> None:
        self._shared.set_viewer_bitrate(self._viewer_id, bps)

    def request_keyframe(self) -> None:
        self._shared.video.request_keyframe()

    def __getattr__(self, name: str) -> Any:  # bytes_out, bitrate, keyframes, ... (read-only stats)
        return getattr(self._shared.video, name)


class SharedEncode:
    """One VP8 + one Opus encode of a session's frames for all of its WHEP viewers."""

    def __init__(self, frames: FrameBuffer, bounds: BitrateBounds, still_every: int = STILL_EVERY,
                 video_hold: float = 0.0) -> None:
        self._frames = frames
        self.bounds = bounds
        self.video_hold = video_hold
        self.video = Vp8Stream(bitrate=bounds.start_bps, still_every=still_every)
        self.audio = OpusStream()
        self._tracks: dict[str, list[ViewerTrack]] = {}
        self._rates: dict[str, int] = {}
        self.frames_encoded = 0
        self.last_frame: int | None = None  # index of the last frame encoded
        self._task = asyncio.get_running_loop().create_task(self._run(), name="whep-encode")

    def track(self, kind: str) -> ViewerTrack:
        """A new viewer's track of `kind` (video: its queue bound grows by the frames held)."""
        if kind == "video":
            return ViewerTrack(kind, VIDEO_QUEUE + hold_frames(self.video_hold),
                               on_drop=self.video.request_keyframe, max_wait=self.video_hold)
        return ViewerTrack(kind, AUDIO_QUEUE)

    def add(self, viewer_id: str, tracks: list[ViewerTrack]) -> None:
        self._tracks[viewer_id] = tracks
        self.video.request_keyframe()

    def remove(self, viewer_id: str) -> None:
        self._tracks.pop(viewer_id, None)
        self._rates.pop(viewer_id, None)
        self._apply_rate()

    def set_viewer_bitrate(self, viewer_id: str, bps: int) -> None:
        if viewer_id in self._tracks:
            self._rates[viewer_id] = bps
            self._apply_rate()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._frames.aclose()

    def _apply_rate(self) -> None:
        if self._rates:
            self.video.set_target_bitrate(min(self._rates.values()))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for frame in self._frames:
                await self._encode(loop, frame)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the shared WHEP encode failed; its viewers get no more media")
        finally:
            for tracks in self._tracks.values():
                for track in tracks:
                    track.stop()

    async def _encode(self, loop: asyncio.AbstractEventLoop, frame: OutputFrame) -> None:
        tracks = [t for ts in self._tracks.values() for t in ts]
        image = np.asarray(frame.image)
        if any(t.kind == "video" for t in tracks) and not self.video.skips(image):
            packet = await loop.run_in_executor(None, self.video.encode, image, int(frame.pts))
            due = video_due(frame, self.video_hold)
            for track in tracks:
                if track.kind == "video":
                    track.put(packet, due)
        first, second = audio_chunks(frame)
        packets = [(self.audio.encode(first), None), (self.audio.encode(second), frame.presentation_time + CHUNK_S)]
        for track in tracks:
            if track.kind == "audio":
                for packet, due in packets:
                    track.put(packet, due)
        self.frames_encoded += 1
        self.last_frame = frame.frame_index


class WhepViewer:
    """One WHEP viewer: its peer connection, its tracks and its link feedback."""

    def __init__(self, viewer_id: str, shared: SharedEncode, ice_servers: list[dict] | None,
                 on_closed: Callable[[str], None]) -> None:
        self.viewer_id = viewer_id
        self._shared = shared
        self._on_closed = on_closed
        self._pc = RTCPeerConnection(configuration=ice_configuration(ice_servers))
        self._pc.on("connectionstatechange", self._on_state)
        self.tracks: list[ViewerTrack] = []
        self.link: LinkFeedback | None = None
        self._closed = False

    @property
    def connection_state(self) -> str:
        return self._pc.connectionState

    async def answer(self, sdp: str) -> str:
        """The SDP answer to the viewer's offer (ValueError when it cannot be used)."""
        offer = parse_offer(sdp, "offer")
        kinds = received_kinds(offer)
        if not kinds:
            raise ValueError("the offer receives neither audio nor video; use recvonly transceivers")
        for kind in kinds:
            codecs = vp8_codecs() if kind == "video" else opus_codecs()
            self._pc.addTransceiver(kind, direction="sendonly").setCodecPreferences(codecs)
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:
            raise ValueError(f"the offer was rejected (the video section must offer VP8, the audio "
                             f"section Opus): {exc.__class__.__name__}: {exc}") from exc
        shared = self._shared
        for kind in kinds:
            track = shared.track(kind)
            sender = self._pc.addTrack(track)
            self.tracks.append(track)
            if kind == "video":
                self.link = LinkFeedback(ViewerRate(shared, self.viewer_id),  # type: ignore[arg-type]
                                         BitrateController(shared.bounds, time.monotonic()))
                self.link.attach(sender)
        await self._pc.setLocalDescription(await self._pc.createAnswer())
        shared.add(self.viewer_id, self.tracks)
        return self._pc.localDescription.sdp

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._shared.remove(self.viewer_id)
        for track in self.tracks:
            track.stop()
        if self.link is not None:
            self.link.close()
        await self._pc.close()

    async def _on_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed") and not self._closed:
            log.info("WHEP viewer %s: connection %s", self.viewer_id, self._pc.connectionState)
            await self.close()
            self._on_closed(self.viewer_id)


class WhepViewers:
    """The WHEP viewers of one session (at most `max_viewers`) and their shared encode.

    `frames()` attaches a buffer to the session's fan-out: called with the first viewer (the
    encode runs only while someone watches), detached with the last.
    """

    def __init__(self, frames: Callable[[], FrameBuffer], *, max_viewers: int, bounds: BitrateBounds,
                 still_every: int, ice_servers: list[dict] | None, video_hold: float = 0.0) -> None:
        self._attach = frames
        self.max_viewers = max_viewers
        self._bounds = bounds
        self._still_every = still_every
        self._video_hold = video_hold
        self._ice_servers = ice_servers
        self._viewers: dict[str, WhepViewer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.shared: SharedEncode | None = None

    def __len__(self) -> int:
        return len(self._viewers)

    def full(self) -> bool:
        return len(self._viewers) >= self.max_viewers

    async def add(self, sdp: str) -> tuple[str, str]:
        """A new viewer from its offer: (viewer id, SDP answer). ValueError: unusable offer."""
        parse_offer(sdp, "offer")  # refuse garbage before any encode starts
        if self.shared is None:
            self.shared = SharedEncode(self._attach(), self._bounds, self._still_every, self._video_hold)
        viewer = WhepViewer(secrets.token_urlsafe(12), self.shared, self._ice_servers, self._forget)
        self._viewers[viewer.viewer_id] = viewer
        try:
            return viewer.viewer_id, await viewer.answer(sdp)
        except BaseException:
            await self.remove(viewer.viewer_id)
            raise

    def get(self, viewer_id: str) -> WhepViewer | None:
        return self._viewers.get(viewer_id)

    async def remove(self, viewer_id: str) -> bool:
        viewer = self._viewers.pop(viewer_id, None)
        if viewer is not None:
            await viewer.close()
        await self._stop_if_unwatched()
        return viewer is not None

    async def close(self) -> None:
        for viewer_id in list(self._viewers):
            await self.remove(viewer_id)
        await self._stop_if_unwatched()

    def _forget(self, viewer_id: str) -> None:
        """A viewer's connection ended by itself."""
        self._viewers.pop(viewer_id, None)
        if not self._viewers and self.shared is not None:
            task = asyncio.get_running_loop().create_task(self._stop_if_unwatched())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _stop_if_unwatched(self) -> None:
        if not self._viewers and self.shared is not None:
            shared, self.shared = self.shared, None
            await shared.close()
