"""The streaming WebSocket of a session: `GET /v1/sessions/{id}/stream` (voice agents).

Client -> server: binary messages are PCM16 little-endian mono at `?rate=` (8000-48000 Hz,
resampled to 16 kHz), any size; text messages are JSON `{"type": "flush"}` (the current
utterance is complete: the next audio starts a new one), `{"type": "clear"}` (interrupt:
queued and playing speech stop now), `{"type": "state", "state": "listening"}` (the silent
state: a clip of the avatar, "idle" = the main video) and `{"type": "action", "clip": "wave"}`
(play a clip once, then back to the state), as POST /v1/sessions/{id}/state does.
Server -> client: `{"type": "playback.started", "utterance_id"}` when the utterance's first
frame is sent to the peer, `{"type": "playback.finished", "utterance_id", "played_ms",
"interrupted"}` when its last frame is sent or it is cut, `{"type": "avatar.state", "state", "clip", "action", "from_frame", "action_end_frame"}`
after a state or action change (from any client of the session), `{"type": "error",
"error", "detail"}` for a bad message (`unknown_clip` for a clip the avatar lacks; the
socket stays open unless the session is gone), and
`{"type": "session.closed", "reason"}` before the server closes the socket.

Backpressure: while the session's speech buffer is full, audio is not pushed and no further
message is read (beyond a few queued ones), so a fast sender is slowed by TCP; nothing is
dropped. A `clear` already read is honoured at once: audio read before it is discarded.
Through Ray Serve the proxy reads the socket as fast as the client sends (it has no
backpressure), so TCP cannot slow the client there: the socket reads everything and bounds
it instead. While the speech buffer is full, the audio received and waiting for room may
reach `read_ahead_s` (`serve.stream_read_ahead_s`); past that the client gets `{"type": "error", "error":
"too_far_ahead"}` and close code 1008, and what it sent before still plays.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from ray_lipsync.api.client import GatewayAPI
from ray_lipsync.audio.resample import PIPELINE_RATE, Resampler
from ray_lipsync.errors import Backpressure, SessionClosed, UnknownClip, UnknownSession

log = logging.getLogger(__name__)

MIN_RATE, MAX_RATE = 8000, 48000
HOLD_SAMPLES = 320  # one chunk kept back until the next audio or the flush (a final push is never empty)
MAX_PUSH_SAMPLES = PIPELINE_RATE  # pieces of <= 1 s, so a piece always fits an emptied buffer
READ_AHEAD = 8  # messages read while the buffer is full (a clear among them is seen at once)
RETRY_S = 0.05  # wait before pushing again into a full buffer


def parse_rate(value: str | None) -> int:
    """`?rate=`: an integer 8000-48000 (default 16000); ValueError otherwise."""
    if value is None:
        return PIPELINE_RATE
    try:
        rate = int(value)
    except ValueError:
        raise ValueError(f"rate must be an integer sample rate in Hz, got {value[:20]!r}") from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"rate must be {MIN_RATE}-{MAX_RATE} Hz, got {rate}")
    return rate


@dataclass
class _Utterance:
    """The utterance being streamed: its id once pushed, and the samples not pushed yet."""

    rate: int
    resampler: Resampler = field(init=False)
    utterance_id: str | None = None
    pending: list[np.ndarray] = field(default_factory=list)
    pending_size: int = 0
    odd_byte: bytes = b""

    def __post_init__(self) -> None:
        self.resampler = Resampler(self.rate)

    def add_pcm(self, data: bytes) -> None:
        data = self.odd_byte + data
        cut = len(data) - len(data) % 2
        self.odd_byte = data[cut:]
        if cut:
            pcm = np.frombuffer(data[:cut], dtype="<i2").astype(np.float32) / 32768.0
            self._add(self.resampler.push(pcm))

    def finish(self) -> None:
        """The end of the utterance's audio: the resampler's tail becomes pending."""
        self._add(self.resampler.flush())
        self.odd_byte = b""

    def _add(self, samples: np.ndarray) -> None:
        if samples.size:
            self.pending.append(samples)
            self.pending_size += samples.size

    def take(self, keep: int) -> np.ndarray:
        """Pending samples but the last `keep`, at most MAX_PUSH_SAMPLES."""
        n = min(self.pending_size - keep, MAX_PUSH_SAMPLES)
        if n <= 0:
            return np.zeros(0, np.float32)
        joined = np.concatenate(self.pending)
        self.pending = [joined[n:]] if joined.size > n else []
        self.pending_size = joined.size - n
        return joined[:n]


class StreamSocket:
    """One accepted WebSocket of session `session_id` (see the module docstring)."""

    def __init__(self, websocket: WebSocket, client: GatewayAPI, session_id: str, token: str,
                 rate: int, read_ahead_s: float | None = None) -> None:
        """`read_ahead_s`: None when TCP paces the client (the socket is ours); else the most
        audio (s) read and waiting while the speech buffer is full (the transport reads ahead
        without bound: Serve)."""
        self.ws = websocket
        self.client = client
        self.session_id = session_id
        self.token = token
        self.rate = rate
        self.utterance = _Utterance(rate)
        self.mine: set[str] = set()  # utterances pushed through this socket
        self._read_ahead_s = read_ahead_s
        self._inbox: asyncio.Queue[dict] = asyncio.Queue(READ_AHEAD if read_ahead_s is None else 0)
        self._inbox_bytes = 0  # audio bytes in the inbox
        self._buffer_full = False  # the last push met a full speech buffer
        self._clears = 0  # clears read but not handled yet
        self._send_lock = asyncio.Lock()
        self._gone = False

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        events = asyncio.create_task(self._forward_events())
        try:
            await self._process()
        finally:
            for task in (reader, events):
                task.cancel()
            await asyncio.gather(reader, events, return_exceptions=True)

    # -- input ---------------------------------------------------------------------------
    async def _read(self) -> None:
        """Messages into the bounded inbox (blocks, so TCP slows the sender, when it is full)."""
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                message = {"type": "websocket.disconnect"}
            if message.get("text") is not None and _is_clear(message["text"]):
                self._clears += 1
            if message.get("bytes") is not None:
                self._inbox_bytes += len(message["bytes"])
                if self._too_far_ahead():
                    await self._refuse_read_ahead()
                    return
            await self._inbox.put(message)
            if message["type"] == "websocket.disconnect":
                return

    def _too_far_ahead(self) -> bool:
        """More than read_ahead_s of audio read waits while the speech buffer is full (a clear
        already read will discard it: not then)."""
        if self._read_ahead_s is None or not self._buffer_full or self._clears:
            return False
        ahead_s = self._inbox_bytes / (2 * self.rate) + self.utterance.pending_size / PIPELINE_RATE
        return ahead_s > self._read_ahead_s

    async def _refuse_read_ahead(self) -> None:
        """Over the read-ahead bound: say so and close; what was read still plays."""
        log.info("session %s: stream socket closed, more than %.0f s of audio ahead of the buffer",
                 self.session_id, self._read_ahead_s)
        await self._close({"type": "error", "error": "too_far_ahead", "detail": (
            f"more than {self._read_ahead_s:g} s of audio is waiting for room in the speech "
            "buffer; send no faster than it plays (the audio sent before this still plays)")},
            1008, "too far ahead")

    async def _process(self) -> None:
        while not self._gone:
            message = await self._inbox.get()
            if message.get("bytes") is not None:
                self._inbox_bytes -= len(message["bytes"])
            if message["type"] == "websocket.disconnect":
                await self._finish_on_disconnect()
                return
            try:
                if message.get("bytes") is not None:
                    await self._on_audio(message["bytes"])
                elif message.get("text") is not None:
                    await self._on_text(message["text"])
            except (UnknownSession, SessionClosed) as error:
                await self._close_gone(str(error))
            except UnknownClip as error:
                await self._send({"type": "error", "error": "unknown_clip", "detail": str(error)})
            except ValueError as error:
                await self._send({"type": "error", "error": "bad_request", "detail": str(error)})
            except Exception:  # noqa: BLE001 - the socket outlives one failed message
                log.exception("session %s: stream message failed", self.session_id)
                await self._send({"type": "error", "error": "internal",
                                  "detail": "the message could not be handled; see server logs"})

    async def _on_audio(self, data: bytes) -> None:
        if self._clears:
            return  # a clear read after this audio cancels it anyway
        self.utterance.add_pcm(data)
        await self._push(final=False)

    async def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("text messages must be JSON objects with a type: flush, clear, "
                             "state or action") from None
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "flush":
            if not self._clears:
                await self._flush()
        elif kind == "clear":
            self._clears -= 1
            self.utterance = _Utterance(self.rate)
            await self.client.interrupt(session_id=self.session_id, token=self.token)
        elif kind in ("state", "action"):
            field = "state" if kind == "state" else "clip"
            name = message.get(field)
            if not isinstance(name, str) or not name:
                raise ValueError(f"a {kind!r} message needs {field!r}: the name of one of the "
                                 "avatar's clips (GET /v1/sessions/{id} lists them)")
            await self.client.set_avatar_state(session_id=self.session_id, token=self.token,
                                               **{kind: name})
        else:
            raise ValueError(f"unknown message type {str(kind)[:40]!r}; send 'flush', 'clear', "
                             "'state' or 'action' (audio goes in binary messages)")

    async def _flush(self) -> None:
        utterance = self.utterance
        utterance.finish()
        if utterance.pending_size:
            await self._push(final=True)
        self.utterance = _Utterance(self.rate)

    async def _push(self, final: bool) -> None:
        """Push pending audio (all of it when `final`, else all but HOLD_SAMPLES), waiting
        while the session's buffer is full; gives up if a clear arrives meanwhile."""
        utterance = self.utterance
        keep = 0 if final else HOLD_SAMPLES
        while utterance.pending_size - keep >= (1 if final else HOLD_SAMPLES):
            piece = utterance.take(keep)
            last = final and utterance.pending_size == 0
            while True:
                try:
                    result = await self.client.push_audio(
                        session_id=self.session_id, token=self.token, samples=piece,
                        utterance_id=utterance.utterance_id, final=last)
                    self._buffer_full = False
                    break
                except Backpressure:
                    self._buffer_full = True
                    if self._clears:
                        return
                    await asyncio.sleep(RETRY_S)
            if utterance.utterance_id is None:
                utterance.utterance_id = result["utterance_id"]
                self.mine.add(result["utterance_id"])

    async def _finish_on_disconnect(self) -> None:
        """The client left: its last utterance plays to its end."""
        if self.utterance.utterance_id is not None or self.utterance.pending_size:
            try:
                await self._flush()
            except Exception:  # noqa: BLE001 - the session may be gone too
                log.debug("session %s: final flush after disconnect failed", self.session_id,
                          exc_info=True)

    # -- output --------------------------------------------------------------------------
    async def _forward_events(self) -> None:
        async for event, data in self.client.events(session_id=self.session_id,
                                                     token=self.token, keepalive_s=15.0):
            uid = data.get("utterance_id")
            if event == "utterance.start" and uid in self.mine:
                await self._send({"type": "playback.started", "utterance_id": uid})
            elif event == "utterance.end" and uid in self.mine:
                self.mine.discard(uid)
                if uid == self.utterance.utterance_id:  # cut (POST .../interrupt) while still
                    self.utterance = _Utterance(self.rate)  # streaming: its held tail goes too
                await self._send({"type": "playback.finished", "utterance_id": uid,
                                  "played_ms": data.get("played_ms"),
                                  "interrupted": data.get("interrupted")})
            elif event == "session.state":  # waiting_for_replica / streaming
                await self._send({"type": "session.state", "state": data.get("state")})
            elif event == "avatar.state":
                await self._send({"type": "avatar.state", **data})
            elif event == "session.closed":
                await self._close_gone(data.get("reason", "session closed"))
                return

    async def _close_gone(self, reason: str) -> None:
        if self._gone:
            return
        self._gone = True
        await self._close({"type": "session.closed", "reason": reason}, 1000, "session closed")

    async def _close(self, last: dict[str, Any], code: int, reason: str) -> None:
        """Send `last`, close the socket with `code` and end `_process` after what it holds."""
        await self._send(last)
        try:
            await self.ws.close(code=code, reason=reason)
        except RuntimeError:
            pass
        try:
            self._inbox.put_nowait({"type": "websocket.disconnect"})  # wakes _process
        except asyncio.QueueFull:
            pass  # _process is busy; it stops at its next message (self._gone)

    async def _send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps(message, separators=(",", ":")))
            except (WebSocketDisconnect, RuntimeError):
                pass  # the client left; the reader sees the disconnect


def _is_clear(text: str) -> bool:
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(message, dict) and message.get("type") == "clear"
