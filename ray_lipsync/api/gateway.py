"""The gateway core: one gateway's sessions, their peers, tokens, events and outputs.

No Ray here. A `Gateway` wraps a `Pipeline` (LocalPipeline or RayPipeline) and adds what the
HTTP service needs: public session ids that name their home gateway (session_ids.py; "home"
is where a session's peer lives, "pinned" is only ever said of its inference replica),
per-session bearer tokens, a WebRTC peer per session, server-sent events when utterance
frames are *sent*, and per-frame latency. What it keeps per session is session_entry.py;
its background work (load sampling, shedding, closing expired sessions) housekeeping.py; its
start-up utterance warmup.py.
Every method returns plain dicts so it can be called through a Serve handle.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ray_lipsync.admission import AdmissionPolicy
from ray_lipsync.api.auth import check_token, new_token
from ray_lipsync.api.housekeeping import Housekeeping
from ray_lipsync.api.metrics import GatewayMetrics
from ray_lipsync.api.session_entry import PeerFactory, SessionEntry, default_peer_factory
from ray_lipsync.api.session_ids import new_session_ids
from ray_lipsync.api.warmup import speak_once
from ray_lipsync.clock import SAMPLE_RATE
from ray_lipsync.config import Settings
from ray_lipsync.egress.fanout import SessionFanout
from ray_lipsync.errors import AtCapacity, MalformedAudio, OutputLimit, UnknownOutput, UnknownSession
from ray_lipsync.ice import session_ice_servers
from ray_lipsync.streaming.pipeline import Pipeline
from ray_lipsync.types import OutputFrame

if TYPE_CHECKING:
    from ray_lipsync.egress.outputs import SessionEgress

logger = logging.getLogger(__name__)

WEBRTC_BUFFER = 250  # frames (10 s) the viewer's media may lag before its oldest is dropped
WHEP_BUFFER = 50  # frames (2 s) the shared WHEP encode may lag before its oldest is dropped
SESSION_STATS = ("replica", "epoch", "speaking", "state", "frames_sent", "frames_dropped", "drops",
                 "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "queued_audio_s")  # in `status`


async def _close_part(entry: SessionEntry, what: str, part) -> None:
    """Close one part of a closing session (its outputs, peer, WHEP viewers), if it has it: a
    part that fails to close is logged and must not keep the session's other resources."""
    if part is not None:
        try:
            await part.close()
        except Exception:
            logger.exception("closing the %s of session %s failed", what, entry.public_id)


class Gateway:
    """Sessions of one gateway (a Serve replica of the Gateway deployment, or the only one in
    process). Create with `Gateway(settings, pipeline, tag)`; `tag` names it in session ids."""

    def __init__(self, settings: Settings, pipeline: Pipeline, tag: str, *,
                 peer_factory: PeerFactory = default_peer_factory,
                 ice_servers: list[dict] | None = None) -> None:
        if not tag or "." in tag:
            raise ValueError(f"gateway tag {tag!r} must be non-empty and contain no '.'")
        self.settings = settings
        self.pipeline = pipeline
        self.tag = tag
        self._static_ice = ice_servers  # None: per session from settings.webrtc
        self._peer_factory = peer_factory
        self._entries: dict[str, SessionEntry] = {}
        self._by_compat: dict[int, str] = {}
        self._creating = 0
        self._closing: set[asyncio.Task] = set()
        self.admission = AdmissionPolicy(settings.serve.admission)
        # sessions of the service's other gateways, as last heard (serve/deployment.py sets it
        # from the metrics board; 0 for a gateway on its own): admission's first-session rule
        self.sessions_elsewhere = 0
        self._devices: dict[tuple[str, str], str] = {}  # (inference replica, backend) -> device
        self.metrics = GatewayMetrics(tag)
        self._housekeeping = Housekeeping(settings, self.admission, self.metrics,
                                          entries=lambda: list(self._entries.values()),
                                          close=self._close_entry)
        self._recordings: Path | None = None  # working directory of recordings (created on use)

    # ---- lookup ----------------------------------------------------------------------
    def start_housekeeping(self) -> None:
        """Start load sampling and the reaper (idempotent; on the running loop)."""
        self._housekeeping.start()

    @property
    def load(self) -> dict[str, float]:
        """The last load sample (metrics, autoscaling): busy and talking cores, loop lag."""
        return self._housekeeping.load

    @property
    def session_count(self) -> int:
        return len(self._entries)

    def session_ids(self) -> list[str]:
        return list(self._entries)

    def _entry(self, session_id: str | int, token: str | None, *, compat: bool = False) -> SessionEntry:
        if compat:
            if not self.settings.serve.livetalking_compat:
                raise UnknownSession("LiveTalking-compatible routes are disabled")
            try:
                public = self._by_compat.get(int(session_id))
            except (TypeError, ValueError):
                public = None
            entry = self._entries.get(public) if public else None
        else:
            entry = self._entries.get(str(session_id))
        if entry is None:
            raise UnknownSession(f"no session {session_id!r}; it may have closed or timed out - "
                                 "create a new one with POST /v1/sessions")
        if not compat:
            check_token(entry.token, token)
        entry.last_activity = time.monotonic()
        return entry

    async def authorize(self, session_id: str, token: str | None) -> None:
        """Raise UnknownSession / MissingToken / WrongToken unless the caller owns the session."""
        self._entry(session_id, token)

    # ---- lifecycle -------------------------------------------------------------------
    async def warm_playout(self, timeout_s: float = 15.0) -> bool:
        """Speak once through the pipeline in a throwaway session (not a client's, not
        counted): warmup.py. The service starts anyway when it returns False."""
        return await speak_once(self.pipeline, timeout_s)

    async def create_session(self, avatar: str = "default", backend: str | None = None) -> dict:
        """A new session on this gateway: {session_id, token, ice_servers, compat_id}."""
        self.start_housekeeping()
        if len(self._entries) + self._creating >= self.settings.serve.max_sessions:
            raise AtCapacity(f"gateway {self.tag} holds its maximum of "
                             f"{self.settings.serve.max_sessions} sessions; retry later")
        decision = self.admission.decide(len(self._entries) + self._creating, self.sessions_elsewhere)
        if not decision.admit:
            self.metrics.sessions_refused += 1
            logger.info("session refused: %s", decision.reason)
            refused = AtCapacity(f"the service cannot take another session on time now "
                                 f"({decision.reason}); retry later")
            refused.retry_after_s = decision.retry_after_s
            raise refused
        self._creating += 1
        try:
            session = await self.pipeline.create_session(avatar=avatar, backend=backend)
        finally:
            self._creating -= 1
        public_id, compat_id = new_session_ids(self.tag)
        ice = (self._static_ice if self._static_ice is not None
               else session_ice_servers(self.settings.webrtc, public_id))
        entry = self._entries[public_id] = SessionEntry(public_id, compat_id, new_token(), session, ice_servers=ice)
        entry.fanout = SessionFanout(session.frames, name=public_id,
                                     on_drop=lambda output, frame: self._on_output_drop(entry, output, frame))
        from ray_lipsync.egress.outputs import SessionEgress  # PyAV's H.264/AAC: loaded on use

        entry.egress = SessionEgress(public_id, entry.fanout, self.settings, entry.events.publish,
                                     self._recordings_dir)
        self._by_compat[compat_id] = public_id
        session.on_state_change(lambda state: self._on_state(entry, state))
        self.metrics.sessions_created += 1
        logger.info("session %s created (avatar %s)", public_id, avatar)
        return {"session_id": public_id, "token": self._entries[public_id].token,
                "ice_servers": ice, "compat_id": compat_id}

    async def close(self, session_id: str | int, token: str | None = None, *,
                    compat: bool = False) -> None:
        entry = self._entry(session_id, token, compat=compat)
        await self._close_entry(entry, "closed by client")

    async def _close_entry(self, entry: SessionEntry, reason: str) -> None:
        if self._entries.pop(entry.public_id, None) is None:
            return  # already closing
        self._by_compat.pop(entry.compat_id, None)
        self.metrics.session_closed(entry.session.drops.by_reason())
        await _close_part(entry, "outputs", entry.egress)
        entry.events.close(("session.closed", {"session_id": entry.public_id, "reason": reason}))
        await _close_part(entry, "peer", entry.peer)
        await _close_part(entry, "WHEP viewers", entry.whep)
        if entry.fanout is not None:
            await entry.fanout.close()
        try:
            await self.pipeline.close_session(entry.session.session_id)
        except UnknownSession:
            pass
        logger.info("session %s closed: %s", entry.public_id, reason)

    async def shutdown(self) -> None:
        """Close every session and stop background work."""
        self._housekeeping.stop()
        for entry in list(self._entries.values()):
            await self._close_entry(entry, "server shutting down")
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._recordings is not None:
            shutil.rmtree(self._recordings, ignore_errors=True)
            self._recordings = None

    def _recordings_dir(self) -> Path:
        """This gateway's working directory of recordings (kept ones go to recording.keep_dir)."""
        if self._recordings is None:
            base = self.settings.home / "recordings"
            base.mkdir(parents=True, exist_ok=True)
            self._recordings = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir=base))
        return self._recordings

    # ---- WebRTC ----------------------------------------------------------------------
    async def offer(self, session_id: str | int, token: str | None, sdp: str,
                    type: str = "offer", *, compat: bool = False, video_hold_ms: int | None = None) -> dict:
        """Answer the client's SDP offer with this session's peer: {sdp, type}. `video_hold_ms`:
        what the client asked for (None: `webrtc.video_hold_ms`)."""
        entry = self._entry(session_id, token, compat=compat)
        if entry.peer is not None:  # the client reconnects: its new connection replaces the old
            old, entry.peer = entry.peer, None
            logger.info("session %s: a new offer replaces its WebRTC peer", entry.public_id)
            await old.close()
        entry.peer_generation += 1
        generation = entry.peer_generation
        entry.peer = self._peer_factory(
            entry.session,
            ice_servers=entry.ice_servers,
            bitrate=self.settings.webrtc.bitrate_bounds(),
            still_every=self.settings.webrtc.still_every(),
            opus_dtx=self.settings.webrtc.opus_dtx,
            video_hold=self.settings.webrtc.video_hold(video_hold_ms),
            on_frame_sent=lambda frame: self._on_frame_sent(entry, frame),
            on_closed=lambda failed: self._on_peer_closed(entry, generation, failed),
            frames=lambda: self._viewer_frames(entry),
            events=entry.events.subscribe,
        )
        entry.offered_at = time.monotonic()
        entry.lost_at = None
        try:
            return await entry.peer.answer(sdp, type)
        except Exception:
            peer, entry.peer = entry.peer, None
            await peer.close()
            raise

    @staticmethod
    def _viewer_frames(entry: SessionEntry) -> AsyncIterator[OutputFrame]:
        """The WebRTC viewer's frames: its own buffer of the session's fan-out."""
        assert entry.fanout is not None
        return entry.fanout.attach("webrtc", WEBRTC_BUFFER)

    @staticmethod
    def _on_output_drop(entry: SessionEntry, output: str, frame: OutputFrame) -> None:
        """A frame an output lost because it lagged: the viewer's count as the session's
        sender_backpressure drops (the egress encoder counts its own)."""
        if output == "webrtc":
            entry.session.record_sender_drop(frame)

    def _on_frame_sent(self, entry: SessionEntry, frame: OutputFrame) -> None:
        if frame.speech:
            entry.last_activity = time.monotonic()
        self.metrics.frame_sent(frame.latency_ms)
        played = frame.meta.get("utterance_played", {})
        for key, event in (("utterance_start", "utterance.start"), ("utterance_end", "utterance.end")):
            for utterance_id in frame.meta.get(key, ()):
                data = {"utterance_id": utterance_id, "frame": frame.frame_index, "pts": frame.pts}
                if event == "utterance.end":
                    data.update(played.get(utterance_id, {"played_ms": None, "interrupted": None}))
                entry.events.publish(event, data)

    def _on_state(self, entry: SessionEntry, state: str) -> None:
        """The session lost its replica with no room elsewhere, or got one again."""
        logger.warning("session %s: %s", entry.public_id, state)
        entry.events.publish("session.state", {"state": state})

    def _on_peer_closed(self, entry: SessionEntry, generation: int, failed: bool) -> None:
        """The session's peer ended by itself: close the session, unless the connection failed
        (the client may reconnect: kept `webrtc.reconnect_grace_s`, see `session_entry.expiry_reason`)."""
        if generation != entry.peer_generation or entry.public_id not in self._entries:
            return  # a peer already replaced by a newer offer, or a session closing anyway
        grace = self.settings.webrtc.reconnect_grace_s
        if failed and grace > 0:
            entry.peer, entry.lost_at = None, time.monotonic()
            logger.info("session %s: connection lost; kept %g s for a new offer", entry.public_id, grace)
            entry.events.publish("session.connection", {"state": "lost", "reconnect_within_s": grace})
            return
        task = asyncio.get_running_loop().create_task(self._close_entry(entry, "peer disconnected"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # ---- speech ----------------------------------------------------------------------
    async def push_audio(self, session_id: str | int, token: str | None, samples: np.ndarray,
                         utterance_id: str | None = None, interrupt: bool = False,
                         final: bool = True, *, compat: bool = False) -> dict:
        """Queue 16 kHz mono float32 `samples` as (part of) one utterance.

        A streamed utterance is pushed in pieces: every piece but the last with final=False,
        the later ones with the utterance_id the first push returned, the last with
        final=True. Returns {utterance_id, duration_ms, start_frame, end_frame} of the
        whole utterance so far and `starts_in_ms`: how long after its first piece arrived its
        first frame is presented (the playout delay it got, or later behind queued speech).
        """
        entry = self._entry(session_id, token, compat=compat)
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if not samples.size:
            raise MalformedAudio("the audio piece is empty; send at least one sample")
        if interrupt:
            await self._interrupt(entry)
        session = entry.session
        utterance = await session.push_audio(samples, utterance_id, final=final)
        starts_in = session.clock.presentation_time(utterance.start_frame) - (utterance.placed_at or time.time())
        return {"utterance_id": utterance.utterance_id, "duration_ms": utterance.duration_ms,
                "start_frame": utterance.start_frame, "end_frame": utterance.end_frame,
                "starts_in_ms": max(0, round(starts_in * 1000))}

    async def interrupt(self, session_id: str | int, token: str | None = None, *,
                        compat: bool = False) -> dict:
        entry = self._entry(session_id, token, compat=compat)
        return await self._interrupt(entry)

    async def _interrupt(self, entry: SessionEntry) -> dict:
        """Cut the session's speech: {epoch, utterance_id, played_ms, interrupted} of the
        utterance playing (None when none was). Queued utterances that never started end
        now (utterance.end with played_ms 0); the cut one ends when its last frame is sent."""
        epoch = await entry.session.interrupt()
        cut = entry.session.last_cut
        for utterance_id in cut.dropped if cut else ():
            entry.events.publish("utterance.end", {"utterance_id": utterance_id, "frame": None,
                                                   "pts": None, "played_ms": 0, "interrupted": True})
        playing = cut.playing[0] if cut and cut.playing else None
        if playing is None:
            return {"epoch": epoch, "utterance_id": None, "played_ms": None, "interrupted": None}
        answer = {"epoch": epoch, "utterance_id": playing[0],
                  "played_ms": playing[1] * 1000 // SAMPLE_RATE, "interrupted": True}
        # viewers silence what is already buffered on their side (the page does), whoever cut
        entry.events.publish("interrupt", {k: answer[k] for k in ("epoch", "utterance_id", "played_ms")})
        return answer

    # ---- avatar state ------------------------------------------------------------------
    async def set_avatar_state(self, session_id: str | int, token: str | None = None,
                               state: str | None = None, action: str | None = None, *,
                               compat: bool = False) -> dict:
        """Set the session's silent state (a clip, "idle" = the main video) and/or play an
        action clip once (after the state is set); UnknownClip for a name the avatar lacks
        (nothing changes then). Returns {state, clip, action, from_frame, action_end_frame}
        and publishes it as the SSE event `avatar.state`."""
        entry = self._entry(session_id, token, compat=compat)
        if state is None and action is None:
            raise ValueError("give a state, an action or both")
        now = entry.session.change_avatar_state(state, action)
        answer = {key: now[key] for key in ("state", "clip", "action", "from_frame", "action_end_frame")}
        entry.events.publish("avatar.state", answer)
        logger.info("session %s: avatar state %s, action %s from frame %s", entry.public_id,
                    now["state"], action, now["from_frame"])
        return answer

    async def status(self, session_id: str | int, token: str | None = None, *,
                     compat: bool = False) -> dict:
        entry = self._entry(session_id, token, compat=compat)
        stats = entry.session.stats()
        avatar = entry.session.avatar_state()
        return {
            "session_id": entry.public_id,
            "gateway": self.tag,
            **{name: getattr(stats, name) for name in SESSION_STATS},
            "avatar_state": avatar["state"],
            **{name: avatar[name] for name in ("clip", "action", "clips")},
            "device": await self._device_of(stats.replica, entry.session.backend),
            "connection_state": (entry.peer.connection_state if entry.peer
                                 else "lost" if entry.lost_at is not None else "new"),
            "network": entry.peer.network() if entry.peer else None,
            "outputs": {**(entry.egress.summary() if entry.egress is not None else {}),
                        "whep_viewers": len(entry.whep) if entry.whep is not None else 0},
        }

    async def _device_of(self, replica: str, backend: str) -> str | None:
        """Where the session's inference replica renders ("cuda", "cpu"), None if unknown."""
        key = (replica, backend)
        if key not in self._devices:
            for stats in await self.inference_stats():
                if stats.get("replica") == replica and stats.get("backend", backend) == backend and "device" in stats:
                    self._devices[key] = str(stats["device"])
        return self._devices.get(key)

    async def events(self, session_id: str, token: str | None,
                     keepalive_s: float = 15.0) -> AsyncIterator[tuple[str, dict]]:
        """The session's events until it closes (streamed through a Serve handle)."""
        entry = self._entry(session_id, token)
        async for item in entry.events.subscribe(keepalive_s):
            yield item

    # ---- egress: recording and restream ----------------------------------------------------
    def _egress(self, session_id: str, token: str | None) -> SessionEgress:
        entry = self._entry(session_id, token)
        assert entry.egress is not None
        entry.used = True
        return entry.egress

    async def start_recording(self, session_id: str, token: str | None) -> dict:
        """Start recording the session to MP4: its state {state, seconds, bytes, ...}."""
        return self._egress(session_id, token).start_recording()

    async def stop_recording(self, session_id: str, token: str | None) -> dict:
        """Stop the recording; its state once the file is complete."""
        return await self._egress(session_id, token).stop_recording()

    async def recording_size(self, session_id: str, token: str | None) -> int:
        """Bytes of the finished recording (OutputConflict while it runs, UnknownOutput if none)."""
        return self._egress(session_id, token).recording_file().stat().st_size

    async def recording_data(self, session_id: str, token: str | None,
                             chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
        """The finished recording's MP4, in pieces (streamed through a Serve handle)."""
        path = self._egress(session_id, token).recording_file()
        with path.open("rb") as file:
            while piece := await asyncio.to_thread(file.read, chunk_bytes):
                yield piece

    async def add_restream(self, session_id: str, token: str | None, url: str) -> dict:
        """Send the session to an RTMP/SRT target: {restream_id, url (key hidden), state, ...}."""
        return await self._egress(session_id, token).add_restream(url)

    async def restreams(self, session_id: str, token: str | None) -> list[dict]:
        """The session's restream targets with their state and last error."""
        return self._egress(session_id, token).restreams()

    async def stop_restream(self, session_id: str, token: str | None, restream_id: str) -> None:
        await self._egress(session_id, token).stop_restream(restream_id)

    # ---- WHEP viewers ---------------------------------------------------------------------
    async def whep_offer(self, session_id: str, token: str | None, sdp: str) -> dict:
        """A new WHEP viewer of the session: {viewer_id, sdp (the answer), ice_servers}."""
        entry = self._entry(session_id, token)
        if entry.whep is None:
            from ray_lipsync.webrtc.whep import WhepViewers  # aiortc: loaded on use

            fanout = entry.fanout
            assert fanout is not None
            entry.whep = WhepViewers(lambda: fanout.attach("whep", WHEP_BUFFER),
                                     max_viewers=self.settings.whep.max_viewers,
                                     bounds=self.settings.webrtc.bitrate_bounds(),
                                     still_every=self.settings.webrtc.still_every(),
                                     ice_servers=entry.ice_servers,
                                     video_hold=self.settings.webrtc.video_hold())
        if entry.whep.full():
            raise OutputLimit(f"this session has {len(entry.whep)} WHEP viewers, the most "
                              "whep.max_viewers allows; retry when one has left")
        viewer_id, answer = await entry.whep.add(sdp)
        entry.used = True
        return {"viewer_id": viewer_id, "sdp": answer, "ice_servers": entry.ice_servers}

    async def whep_close(self, session_id: str, token: str | None, viewer_id: str) -> None:
        """End one WHEP viewer (UnknownOutput if the session has no such viewer)."""
        entry = self._entry(session_id, token)
        if entry.whep is None or not await entry.whep.remove(viewer_id):
            raise UnknownOutput(f"no WHEP viewer {viewer_id[:40]!r} in this session")

    # ---- metrics and health ------------------------------------------------------------
    async def snapshots(self) -> list[dict]:
        """This gateway's metrics snapshot (the Serve app reads every gateway's from its board)."""
        return [self.metrics_snapshot()]

    async def health(self) -> list[str]:
        """Pipeline stages unavailable right now (and sessions waiting for an inference
        replica), as the pipeline reports them."""
        return await self.pipeline.health()

    async def inference_stats(self) -> list[dict]:
        """Per inference replica: sessions, queue depth, batches."""
        return await self.pipeline.replica_stats()

    def metrics_snapshot(self) -> dict:
        entries = list(self._entries.values())
        speaking = queued = 0.0
        for entry in entries:
            stats = entry.session.stats()
            speaking += bool(stats.speaking)
            queued += stats.queued_audio_s
        return self.metrics.snapshot(
            sessions=len(entries), speaking=int(speaking), queued_audio_s=queued,
            queued_events=sum(e.events.queued for e in entries), load=self.load,
            open_drops=[e.session.drops.by_reason() for e in entries])


