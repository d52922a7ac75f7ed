"""A pipecat video service: a ray-lipsync avatar as a face for a pipecat voice agent.

    avatar = LipsyncVideoService("http://127.0.0.1:8000", avatar="default")
    pipeline = Pipeline([transport.input(), stt, llm, tts, avatar, transport.output()])

`LipsyncVideoService` is a FrameProcessor (pip install 'ray-lipsync[pipecat]'):
on StartFrame it creates a session on the server (`POST /v1/sessions`, with `api_key` when
the server requires one) and connects to it over WebRTC (aiortc, receive-only); the TTS's
`TTSAudioRawFrame`s (any rate) go to the session over its streaming WebSocket
(`/v1/sessions/{id}/stream`), and the avatar's video and audio come back as
`OutputImageRawFrame`s and `SpeechOutputAudioRawFrame`s with presentation timestamps (ns,
from the RTP timestamps of both tracks, which the server stamps from one media clock).
Images are pushed after the audio that precedes them and marked `sync_with_audio`, so the
output transport shows frame k as its audio plays (so the offer asks for no video hold,
`video_hold_ms: 0`: the server's hold is for plain `<video>` players). `TTSStoppedFrame` -> flush (end of the
utterance), `InterruptionFrame` -> clear (the server cuts the speech at the next frame; the
speech already in flight is muted here), `EndFrame` / `CancelFrame` -> close the session.
With `listening_state=True`, `UserStartedSpeakingFrame` sets the avatar's silent state to
`listening` and `UserStoppedSpeakingFrame` back to `idle` (`POST /v1/sessions/{id}/state`;
the avatar needs a `listening` clip: `ray-lipsync avatar prepare --clip listening=...`);
`set_state(state)` and `play_action(clip)` do the same for any clip of the avatar.

Event handlers: `on_playback_started(service, utterance_id)` and
`on_playback_finished(service, event)` with the server's `{utterance_id, played_ms,
interrupted}`: what the user actually heard, to cut the agent's transcript.

`EspeakTTS` speaks `TTSSpeakFrame`s with the project's offline espeak-ng voice (no cloud
keys), as TTS services do: TTSStartedFrame, 20 ms TTSAudioRawFrames, TTSStoppedFrame.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from ray_lipsync.audio.resample import Resampler
from ray_lipsync.webrtc.client import track_frames
from ray_lipsync.webrtc.peer import ice_configuration

log = logging.getLogger(__name__)

NS = 1_000_000_000
VIDEO_CLOCK = 90_000  # RTP clock of video (VP8)
RTP_WRAP = 2**32
SILENT_PEAK = 64  # int16 peak below which received audio counts as silence
MUTE_SILENCE_S = 0.1  # after an interrupt, speech in flight is muted until this much silence
MUTE_MAX_S = 1.0  # ... or at most this long
MAX_HELD_IMAGES = 10  # images waiting for their audio (400 ms) before they go anyway


class _Unwrapper:
    """RTP timestamps (32-bit, random start) -> ticks since the track's first frame."""

    def __init__(self) -> None:
        self._first: int | None = None
        self._last = 0
        self._offset = 0

    def __call__(self, pts: int) -> int:
        if self._first is None:
            self._first = self._last = pts
        if pts < self._last and self._last - pts > RTP_WRAP // 2:
            self._offset += RTP_WRAP
        self._last = pts
        return pts + self._offset - self._first


class LipsyncVideoService(FrameProcessor):
    """A ray-lipsync avatar as a pipecat video service (see the module docstring)."""

    def __init__(self, base_url: str, avatar: str = "default", *, backend: str | None = None,
                 api_key: str | None = None, ice_servers: list[dict] | None = None,
                 http_timeout_s: float = 30.0, listening_state: bool = False,
                 **kwargs: Any) -> None:
        """`listening_state`: show the avatar's `listening` clip while the user speaks."""
        super().__init__(**kwargs)
        self._listening_state = listening_state
        self._base_url = base_url.rstrip("/")
        self._avatar = avatar
        self._backend = backend
        self._api_key = api_key
        self._ice_servers = ice_servers
        self._http_timeout_s = http_timeout_s
        self._http: httpx.AsyncClient | None = None
        self._pc: RTCPeerConnection | None = None
        self._ws: Any = None
        self._ws_rate: int | None = None
        self._resampler: Resampler | None = None  # TTS frames at another rate than the socket's
        self._resampler_rate: int | None = None
        self.session_id: str | None = None
        self._token: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._video_pts = _Unwrapper()
        self._audio_pts = _Unwrapper()
        self._audio_clock_ns = 0  # end of the latest audio pushed downstream
        self._held: collections.deque[OutputImageRawFrame] = collections.deque()
        self._mute_until: float | None = None  # loop time; muting speech in flight
        self._silent_run_s = 0.0
        self._register_event_handler("on_playback_started")
        self._register_event_handler("on_playback_finished")

    # -- pipecat ------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self._connect()
        elif isinstance(frame, TTSAudioRawFrame):
            await self._send_audio(frame)
        elif isinstance(frame, TTSStoppedFrame):
            await self._send_json({"type": "flush"})
        elif isinstance(frame, InterruptionFrame):
            await self._send_json({"type": "clear"})
            self._mute_until = asyncio.get_running_loop().time() + MUTE_MAX_S
            self._silent_run_s = 0.0
            await self.push_frame(frame, direction)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._close()
            await self.push_frame(frame, direction)
        elif self._listening_state and isinstance(frame, (UserStartedSpeakingFrame, UserStoppedSpeakingFrame)):
            await self.push_frame(frame, direction)
            await self.set_state("listening" if isinstance(frame, UserStartedSpeakingFrame) else "idle")
        else:
            await self.push_frame(frame, direction)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    # -- session -------------------------------------------------------------------------
    async def _connect(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._http = httpx.AsyncClient(base_url=self._base_url, timeout=self._http_timeout_s)
        try:
            r = await self._http.post("/v1/sessions", headers=headers,
                                      json={"avatar": self._avatar, "backend": self._backend})
            _raise_for(r, "create a session")
            created = r.json()
            self.session_id, self._token = created["session_id"], created["token"]
            ice = self._ice_servers if self._ice_servers is not None else created["ice_servers"]
            self._pc = RTCPeerConnection(configuration=ice_configuration(ice))
            self._pc.on("track", self._on_track)
            self._pc.addTransceiver("video", direction="recvonly")
            self._pc.addTransceiver("audio", direction="recvonly")
            await self._pc.setLocalDescription(await self._pc.createOffer())
            r = await self._http.post(f"/v1/sessions/{self.session_id}/offer", headers=self._auth(),
                                      json={"sdp": self._pc.localDescription.sdp, "type": "offer",
                                            "video_hold_ms": 0})  # images wait for their audio here
            _raise_for(r, "connect over WebRTC")
            await self._pc.setRemoteDescription(RTCSessionDescription(**r.json()))
        except Exception as error:  # noqa: BLE001 - reported to the pipeline, not raised
            await self.push_error(f"ray-lipsync: {error}", exception=error, fatal=True)

    async def _open_socket(self, rate: int) -> None:
        url = urlsplit(self._base_url)
        scheme = "wss" if url.scheme == "https" else "ws"
        path = f"{url.path}/v1/sessions/{self.session_id}/stream"
        query = f"rate={rate}&token={quote(self._token or '')}"
        self._ws = await websockets.connect(urlunsplit((scheme, url.netloc, path, query, "")),
                                            max_size=2**20)
        self._ws_rate = rate
        self._tasks.append(self.create_task(self._read_events(), "lipsync-events"))

    async def _close(self) -> None:
        for task in self._tasks:
            await self.cancel_task(task)
        self._tasks = []
        if self._ws is not None:
            ws, self._ws = self._ws, None
            await ws.close()
        if self._pc is not None:
            pc, self._pc = self._pc, None
            await pc.close()
        if self._http is not None:
            http, self._http = self._http, None
            if self.session_id is not None:
                try:
                    await http.delete(f"/v1/sessions/{self.session_id}", headers=self._auth())
                except httpx.HTTPError:
                    log.warning("could not close session %s", self.session_id, exc_info=True)
            await http.aclose()

    async def set_state(self, state: str) -> None:
        """Make clip `state` the avatar's silent state ("idle": its own cycle)."""
        await self._post_state({"state": state})

    async def play_action(self, clip: str) -> None:
        """Play clip `clip` of the avatar once, then return to its state."""
        await self._post_state({"action": clip})

    async def _post_state(self, body: dict[str, str]) -> None:
        if self._http is None or self.session_id is None:
            return  # not connected (an ErrorFrame was pushed when connecting failed)
        try:
            r = await self._http.post(f"/v1/sessions/{self.session_id}/state", headers=self._auth(),
                                      json=body)
            _raise_for(r, f"set the avatar state {body}")
        except (httpx.HTTPError, RuntimeError) as error:  # reported, not raised: the talk goes on
            await self.push_error(f"ray-lipsync: {error}", exception=error)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    # -- speech out to the avatar ----------------------------------------------------------
    async def _send_audio(self, frame: TTSAudioRawFrame) -> None:
        if self.session_id is None:
            return  # the session could not be created (an ErrorFrame was pushed)
        pcm = np.frombuffer(frame.audio, dtype="<i2")
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype("<i2")
        if self._ws is None:
            await self._open_socket(frame.sample_rate)
        if frame.sample_rate != self._ws_rate:  # the TTS changed its rate: resample here
            if self._resampler_rate != frame.sample_rate:
                self._resampler = Resampler(frame.sample_rate, self._ws_rate)
                self._resampler_rate = frame.sample_rate
            assert self._resampler is not None
            pcm = (self._resampler.push(pcm.astype(np.float32) / 32768) * 32767).astype("<i2")
        await self._ws.send(pcm.tobytes())

    async def _send_json(self, message: dict) -> None:
        if self._ws is not None:
            await self._ws.send(json.dumps(message))

    async def _read_events(self) -> None:
        async for text in self._ws:
            event = json.loads(text)
            kind = event.get("type")
            if kind == "playback.started":
                await self._call_event_handler("on_playback_started", event["utterance_id"])
            elif kind == "playback.finished":
                await self._call_event_handler("on_playback_finished", event)
            elif kind == "error":
                log.warning("ray-lipsync refused a message: %s", event.get("detail"))
            elif kind == "session.closed":
                await self.push_error(f"ray-lipsync session closed: {event.get('reason')}")
                return

    # -- avatar media in -------------------------------------------------------------------
    def _on_track(self, track: MediaStreamTrack) -> None:
        reader = self._read_video if track.kind == "video" else self._read_audio
        self._tasks.append(self.create_task(reader(track), f"lipsync-{track.kind}"))

    async def _read_video(self, track: MediaStreamTrack) -> None:
        async for frame in track_frames(track):
            image = OutputImageRawFrame(image=frame.to_ndarray(format="rgb24").tobytes(),
                                        size=(frame.width, frame.height), format="RGB")
            image.pts = self._video_pts(int(frame.pts or 0)) * NS // VIDEO_CLOCK
            image.sync_with_audio = True  # shown once the audio queued before it has played
            self._held.append(image)
            await self._release_images(force=len(self._held) > MAX_HELD_IMAGES)

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        async for frame in track_frames(track):
            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
            mono = pcm.mean(axis=1).astype("<i2") if pcm.shape[1] > 1 else pcm[:, 0].astype("<i2")
            seconds = mono.size / frame.sample_rate
            if self._muted(mono, seconds):
                mono = np.zeros_like(mono)
            audio = SpeechOutputAudioRawFrame(audio=mono.tobytes(), sample_rate=frame.sample_rate,
                                              num_channels=1)
            start = self._audio_pts(int(frame.pts or 0)) * NS // frame.sample_rate
            audio.pts = start
            await self.push_frame(audio)
            self._audio_clock_ns = start + mono.size * NS // frame.sample_rate
            await self._release_images()

    def _muted(self, mono: np.ndarray, seconds: float) -> bool:
        """After an interrupt: mute received speech until a run of silence shows the cut."""
        if self._mute_until is None:
            return False
        if np.abs(mono.astype(np.int32)).max(initial=0) < SILENT_PEAK:
            self._silent_run_s += seconds
        else:
            self._silent_run_s = 0.0
        if self._silent_run_s >= MUTE_SILENCE_S or asyncio.get_running_loop().time() > self._mute_until:
            self._mute_until = None
        return True

    async def _release_images(self, force: bool = False) -> None:
        """Push the images whose presentation time the pushed audio has reached."""
        while self._held and (force or self._held[0].pts <= self._audio_clock_ns):
            await self.push_frame(self._held.popleft())
            force = force and len(self._held) > MAX_HELD_IMAGES


class EspeakTTS(FrameProcessor):
    """Offline TTS for pipecat: each TTSSpeakFrame is spoken with ray_lipsync.tts (16 kHz)."""

    RATE = 16000

    def __init__(self, voice: str = "en-us", words_per_minute: int = 165, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._voice = voice
        self._wpm = words_per_minute
        self._synthesizer: Any = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, TTSSpeakFrame):
            await self.push_frame(frame, direction)
            return
        if self._synthesizer is None:
            from ray_lipsync.tts import Synthesizer

            self._synthesizer = await asyncio.to_thread(Synthesizer)
        samples = await asyncio.to_thread(self._synthesizer.synthesize, frame.text, self._voice,
                                          self._wpm)
        pcm = (samples * 32767).astype("<i2").tobytes()
        step = self.RATE // 50 * 2  # 20 ms
        await self.push_frame(TTSStartedFrame())
        for i in range(0, len(pcm), step):
            await self.push_frame(TTSAudioRawFrame(pcm[i:i + step], self.RATE, 1))
        await self.push_frame(TTSStoppedFrame())


def _raise_for(response: httpx.Response, action: str) -> None:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise RuntimeError(f"could not {action}: HTTP {response.status_code}: {detail}")
