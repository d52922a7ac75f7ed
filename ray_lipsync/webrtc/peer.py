"""One aiortc peer connection per session: answers the client's offer, streams the session's
video and audio (see tracks.py) and reads the client's microphone track if it sends one.

Usage (the API does this):

    peer = SessionPeer(session, on_frame_sent=events.publish, on_closed=end_session)
    answer = await peer.answer(offer_sdp)          # {"sdp": ..., "type": "answer"}
    ...
    await peer.close()

`frames()` gives the frames to send (default `session.frames`; the gateway passes its
fan-out's, so that recording and restream share the session's frames with the viewer).
`on_closed(failed)` is called once when the connection ends by itself (`failed` True: ICE or
DTLS failed, e.g. the client's network went away, so it may come back; False: the remote hung
up, or the session's frame stream ended); it is not called when you call `close()` yourself.
`events()` subscribes to the session's events (the gateway's `EventHub.subscribe`): a client
that opens a data channel labelled "events" in its offer gets each one on it as
`{"event", "data"}` JSON text, as its SSE stream has them but without the HTTP path (the
client module mutes on an `interrupt` from whichever comes first); what the client sends on
it is ignored, and any other channel (another label, a second "events") is closed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.sdp import SessionDescription

from ray_lipsync.clock import CHUNK_SAMPLES
from ray_lipsync.types import OutputFrame
from ray_lipsync.webrtc.mic import MicReader
from ray_lipsync.webrtc.bandwidth import BitrateBounds, BitrateController
from ray_lipsync.webrtc.encoder import STILL_EVERY, OpusStream, Vp8Stream
from ray_lipsync.webrtc.rtcp import LinkFeedback
from ray_lipsync.webrtc.tracks import MediaCounters, SessionMedia, SessionVideoTrack, pcm_chunk

if TYPE_CHECKING:
    from ray_lipsync.streaming.session import Session

log = logging.getLogger(__name__)

MAX_SDP_BYTES = 200_000  # same bound as the API's OfferRequest
_RECEIVING = ("sendrecv", "recvonly")  # offer directions in which the client receives
_SENDING = ("sendrecv", "sendonly")  # offer directions in which the client sends
EVENTS_CHANNEL = "events"  # the label of the data channel that carries the session's events


def ice_configuration(ice_servers: list[dict] | None) -> RTCConfiguration:
    """RTCConfiguration from [{"urls": ..., "username": ..., "credential": ...}]; None = no STUN.

    No STUN by default: the service machines usually have no route to public STUN servers,
    and host candidates suffice on a LAN. Pass STUN/TURN servers for clients behind NAT.
    """
    servers = []
    for i, entry in enumerate(ice_servers or []):
        if not isinstance(entry, dict) or "urls" not in entry:
            raise ValueError(f"ice_servers[{i}] must be a dict with 'urls' (and optional username/credential)")
        unknown = set(entry) - {"urls", "username", "credential"}
        if unknown:
            raise ValueError(f"ice_servers[{i}] has unknown keys {sorted(unknown)}; use urls/username/credential")
        servers.append(RTCIceServer(urls=entry["urls"], username=entry.get("username"), credential=entry.get("credential")))
    return RTCConfiguration(iceServers=servers)


def vp8_codecs() -> list[RTCRtpCodecCapability]:
    """aiortc's VP8 capability and its retransmission (rtx) entry, for setCodecPreferences."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    return [c for c in codecs if c.mimeType.lower() in ("video/vp8", "video/rtx")]


def opus_codecs() -> list[RTCRtpCodecCapability]:
    """aiortc's Opus capability: the audio track sends pre-encoded Opus packets."""
    return [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]


def parse_offer(sdp: str, type: str) -> SessionDescription:
    """Validate an offer; raise ValueError saying what is wrong."""
    if type != "offer":
        raise ValueError(f"expected an SDP of type 'offer', got {type!r}")
    if not isinstance(sdp, str) or not sdp.strip():
        raise ValueError("the offer SDP is empty; send the browser's RTCPeerConnection.localDescription.sdp")
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise ValueError(f"the offer SDP is larger than {MAX_SDP_BYTES} bytes")
    if not sdp.lstrip().startswith("v=0"):
        raise ValueError("malformed SDP: it must start with 'v=0'")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc raises ValueError/KeyError/IndexError/StopIteration
        raise ValueError(f"malformed SDP offer: {exc.__class__.__name__}: {exc}") from exc
    if not any(m.kind in ("audio", "video") for m in parsed.media):
        raise ValueError("the offer has no audio or video section; add recvonly video/audio transceivers")
    return parsed


def received_kinds(offer: SessionDescription) -> list[str]:
    """The media kinds ("video", "audio") the client of `offer` wants to receive."""
    return [kind for kind in ("video", "audio")
            if any(m.kind == kind and (m.direction or "sendrecv") in _RECEIVING for m in offer.media)]


def asks_opus(offer: SessionDescription, parameter: str) -> bool:
    """Whether the offer's Opus format parameters set `parameter` to 1: `useinbandfec` (in-band
    FEC, Chromium's offers ask for it), `usedtx` (the receiver prefers DTX, RFC 7587)."""
    for media in offer.media:
        for codec in media.rtp.codecs if media.kind == "audio" else ():
            if codec.mimeType.lower() == "audio/opus" and str(codec.parameters.get(parameter)) == "1":
                return True
    return False


class SessionPeer:
    """The WebRTC side of one session (aiortc RTCPeerConnection + the session's tracks)."""

    def __init__(
        self,
        session: "Session",
        *,
        ice_servers: list[dict] | None = None,
        bitrate: BitrateBounds = BitrateBounds(),
        still_every: int = STILL_EVERY,
        opus_dtx: str = "auto",
        video_hold: float = 0.0,
        on_frame_sent: Callable[[OutputFrame], None] | None = None,
        on_closed: Callable[[bool], Awaitable[None] | None] | None = None,
        frames: Callable[[], AsyncIterator[OutputFrame]] | None = None,
        events: Callable[[], AsyncIterator[tuple[str, dict]]] | None = None,
    ) -> None:
        self.session = session
        self._frames = frames
        self._events = events
        self._config = ice_configuration(ice_servers)
        self._bitrate = bitrate
        self._still_every = still_every
        self._opus_dtx = opus_dtx
        self._video_hold = video_hold
        self.link: LinkFeedback | None = None
        self._on_frame_sent = on_frame_sent
        self._on_closed = on_closed
        self._pc = RTCPeerConnection(configuration=self._config)
        self._pc.on("connectionstatechange", self._on_state_change)
        self._pc.on("track", self._on_remote_track)
        self._pc.on("datachannel", self._on_datachannel)
        self._events_channel: RTCDataChannel | None = None
        self.media: SessionMedia | None = None
        self.mic: MicReader | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._failed = False  # the connection failed (rather than being closed by either side)
        self._closed = asyncio.Event()

    @property
    def connection_state(self) -> str:
        """aiortc's connectionState: new, connecting, connected, failed or closed."""
        return self._pc.connectionState

    @property
    def counters(self) -> MediaCounters:
        """Frames in, video frames sent/dropped, audio chunks sent (zeros before answer())."""
        return self.media.counters if self.media is not None else MediaCounters()

    def network(self) -> dict | None:
        """The video link as the sender sees it (bandwidth estimate, loss, round trip,
        keyframes) and the audio chunks DTX left out; None without a video track."""
        if self.link is None:
            return None
        return {**self.link.stats().as_dict(), "audio_chunks_left_out": self.counters.audio_chunks_left_out}

    async def answer(self, sdp: str, type: str = "offer") -> dict:
        """Answer the client's offer: {"sdp": ..., "type": "answer"}. ValueError if unusable."""
        if self._closing:
            raise ValueError("this peer is closed; create a new session")
        if self.media is not None:
            raise ValueError("this session already has a connection; create a new session to reconnect")
        offer = parse_offer(sdp, type)
        kinds = received_kinds(offer)
        want_video, want_audio = "video" in kinds, "audio" in kinds
        if not (want_video or want_audio):
            raise ValueError("the offer receives neither audio nor video; use direction recvonly or sendrecv")
        if want_video:  # answered with VP8 only: the video track sends VP8 packets
            self._pc.addTransceiver("video", direction="sendonly").setCodecPreferences(vp8_codecs())
        if want_audio:  # answered with Opus only (sendrecv: the client's microphone may come in)
            self._pc.addTransceiver("audio", direction="sendrecv").setCodecPreferences(opus_codecs())
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:
            hint = " (the video section must offer VP8, the audio section Opus)"
            raise ValueError(f"the offer was rejected{hint}: {exc.__class__.__name__}: {exc}") from exc
        self.media = SessionMedia(
            self._frames() if self._frames is not None else self.session.frames(),
            record_sent=self.session.record_sent,
            record_dropped=self.session.record_sender_drop,
            on_frame_sent=self._on_frame_sent,
            video=want_video,
            audio=want_audio,
            opus_fec=asks_opus(offer, "useinbandfec"),
            opus_dtx=self._opus_dtx == "on" or (self._opus_dtx == "auto" and asks_opus(offer, "usedtx")),
            still_every=self._still_every,
            video_hold=self._video_hold,
        )
        for track in self.media.tracks:
            sender = self._pc.addTrack(track)
            if isinstance(track, SessionVideoTrack):
                self.link = LinkFeedback(track.encoder, BitrateController(self._bitrate, time.monotonic()))
                self.link.attach(sender)
        answer = await self._pc.createAnswer()
        await self._pc.setLocalDescription(answer)
        self._spawn(self._watch_media(self.media), "media-watch")
        local = self._pc.localDescription
        return {"sdp": local.sdp, "type": local.type}

    async def close(self) -> None:
        """Close the connection, stop the tracks, the microphone reader and every task."""
        await self._shutdown(notify=False)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- internals -------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{getattr(self.session, 'session_id', '?')}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_state_change(self) -> None:
        state = self._pc.connectionState
        log.info("session %s: connection %s", getattr(self.session, "session_id", "?"), state)
        if state in ("failed", "closed") and not self._closing:
            self._failed = state == "failed"
            self._spawn(self._shutdown(notify=True), "peer-close")

    def _on_remote_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio":
            log.info("ignoring a remote %s track (only a microphone is read)", track.kind)
            return
        if self.mic is not None:
            log.warning("ignoring a second remote audio track")
            return
        self.mic = MicReader(self.session, track)
        self._spawn(self.mic.run(), "mic")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_CHANNEL or self._events is None or self._events_channel is not None:
            log.info("closing a data channel labelled %.40r (one %r is served)", channel.label, EVENTS_CHANNEL)
            channel.close()
            return
        self._events_channel = channel
        self._spawn(self._send_events(channel), "events-channel")

    async def _send_events(self, channel: RTCDataChannel) -> None:
        """The session's events on the client's "events" channel, until either closes."""
        assert self._events is not None
        async for name, data in self._events():
            if channel.readyState != "open":
                return
            if name != "ping":  # the SSE keep-alive; SCTP has its own
                channel.send(json.dumps({"event": name, "data": data}, separators=(",", ":")))

    async def _watch_media(self, media: SessionMedia) -> None:
        await media.wait_finished()
        if not self._closing:
            log.info("session %s: frame stream ended, closing peer", getattr(self.session, "session_id", "?"))
            await self._shutdown(notify=True)

    async def _shutdown(self, *, notify: bool) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            current = asyncio.current_task()
            if self.media is not None:
                await self.media.drain()  # source ended: let the senders take the last frame
                await self.media.stop()
            await self._pc.close()
            if self.link is not None:
                self.link.close()
            pending = [t for t in self._tasks if t is not current]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self._closed.set()
        if notify and self._on_closed is not None:
            try:
                result = self._on_closed(self._failed)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_closed callback failed")


async def warm_up() -> None:
    """Exercise aiortc and the encoders once, so a process's first session does not pay for it
    (its first offer otherwise takes longer: imports, ICE gathering, codec setup; measured:
    benchmarks/README.md, section "Figures behind settings in the code")."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        for kind in ("video", "audio"):
            pc.addTransceiver(kind, direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        SessionDescription.parse(pc.localDescription.sdp)
    finally:
        await pc.close()
    Vp8Stream().encode(np.zeros((64, 64, 3), dtype=np.uint8), 0)
    OpusStream().encode(pcm_chunk(np.zeros(CHUNK_SAMPLES, dtype=np.int16), 0))
