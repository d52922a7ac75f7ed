"""A session's egress outputs: its recording and its restream targets (the API's side).

`SessionEgress` owns, per session, what the routes ask for: start/stop/read the recording,
add/list/stop restream targets. Every output is a `PacketSink` (the recording writes an MP4
file; a restream target goes through its relay process, relay.py) fed by one shared
`EncodeWorker` (one H.264 + AAC encode however many outputs), which takes its frames from the
session's fan-out; the worker runs while at least one output does. State changes of an
output are published as server-sent events (`recording.state`, `restream.state`) on the
event loop, whichever thread saw them.

Outputs work with or without a WebRTC viewer: the fan-out reads the session's frames while
any output is attached. What is recorded is what a viewer is sent: the same frames, on the
session's clock.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_lipsync.clock import FPS
from ray_lipsync.config import Settings
from ray_lipsync.egress.encoder import EncoderSettings
from ray_lipsync.egress.fanout import SessionFanout
from ray_lipsync.egress.sink import (
    TERMINAL,
    FileOutput,
    Output,
    PacketSink,
    RelayOutput,
    SinkStatus,
)
from ray_lipsync.egress.targets import Target, check_reachable, parse_target
from ray_lipsync.egress.worker import EncodeWorker
from ray_lipsync.errors import OutputConflict, OutputLimit, UnknownOutput

log = logging.getLogger(__name__)

FIRST_FRAME_S = 5.0  # an output waits this long for the session's first frame
STOP_TARGET_S = 2.0  # DELETE of a restream waits this long for its thread (a stuck connect is left)


@dataclass
class _Restream:
    restream_id: str
    target: Target
    sink: PacketSink
    created: float


def encoder_settings(settings: Settings) -> EncoderSettings:
    egress = settings.egress
    return EncoderSettings(video_bitrate=egress.video_bitrate, audio_bitrate=egress.audio_bitrate,
                           keyframe_interval=max(1, round(egress.keyframe_interval_s * FPS)),
                           preset=egress.preset)


class SessionEgress:
    """Recording and restream targets of one session (create on the event loop)."""

    def __init__(self, session_id: str, fanout: SessionFanout, settings: Settings,
                 publish: Callable[[str, dict], None], work_dir: Callable[[], Path]) -> None:
        self.session_id = session_id
        self._fanout = fanout
        self._settings = settings
        self._publish = publish
        self._loop = asyncio.get_running_loop()
        self._work_dir = work_dir
        self._worker: EncodeWorker | None = None
        self._recording: PacketSink | None = None
        self._recording_path: Path | None = None
        self._restreams: dict[str, _Restream] = {}
        self._frames_dropped = 0  # by encodes that ended (the running one counts its own)

    @property
    def frames_dropped(self) -> int:
        """Frames the shared encode lost because it lagged (the session went on)."""
        return self._frames_dropped + (self._worker.frames_dropped if self._worker is not None else 0)

    def summary(self) -> dict:
        """For the session's status: the recording's state, restream targets running, drops."""
        recording = self._recording.status.as_dict() if self._recording is not None else None
        return {"recording": recording,
                "restreams": sum(not r.sink.done for r in self._restreams.values()),
                "frames_dropped": self.frames_dropped}

    @property
    def active(self) -> bool:
        """Whether an output is running (it keeps the session's frames flowing)."""
        return any(not s.done for s in self._sinks())

    # -- recording --------------------------------------------------------------------

    def start_recording(self) -> dict:
        """Start recording (a new file replaces a finished one); OutputConflict if one runs."""
        if self._recording is not None and not self._recording.done:
            raise OutputConflict("this session is already recording; DELETE the recording to stop it first")
        self._drop_recording_file()
        keep = self._settings.recording.keep_dir
        folder = Path(keep) if keep is not None else self._work_dir()
        folder.mkdir(parents=True, exist_ok=True)
        suffix = time.strftime("%Y%m%dT%H%M%S") if keep is not None else "recording"
        path = folder / f"{self.session_id}.{suffix}.mp4"
        limits = self._settings.recording
        self._recording_path = path
        self._recording = self._start_sink(
            "recording", FileOutput(str(path)), retry=False,
            on_state=lambda status: self._announce("recording.state", {}, status),
            max_seconds=limits.max_seconds, max_bytes=limits.max_bytes)
        log.info("session %s: recording started", self.session_id)
        return self.recording_state()

    async def stop_recording(self) -> dict:
        """Stop the recording (its file is complete when this returns); UnknownOutput if none."""
        sink = self._recording
        if sink is None:
            raise UnknownOutput("this session has no recording; POST /v1/sessions/{id}/recording starts one")
        await asyncio.to_thread(sink.stop)
        self._release(sink)
        return self.recording_state()

    def recording_state(self) -> dict:
        if self._recording is None:
            raise UnknownOutput("this session has no recording; POST /v1/sessions/{id}/recording starts one")
        return self._recording.status.as_dict()

    def recording_file(self) -> Path:
        """The finished MP4; OutputConflict while it is being written, UnknownOutput if none."""
        state = self.recording_state()
        if state["state"] not in TERMINAL:
            raise OutputConflict("the recording is still running; DELETE it to finish the file, then GET it")
        path = self._recording_path
        if path is None or not path.exists() or state["bytes"] == 0:
            raise UnknownOutput("the recording holds no media (it stopped before the first keyframe"
                                + (f": {state['error']}" if state.get("error") else "") + ")")
        return path

    # -- restream ---------------------------------------------------------------------

    async def add_restream(self, url: str) -> dict:
        """Validate `url` (ValueError: bad form; TargetRefused: forbidden address) and start
        sending to it; OutputLimit above restream.max_targets."""
        target = parse_target(url)
        live = [r for r in self._restreams.values() if not r.sink.done]
        if len(live) >= self._settings.restream.max_targets:
            raise OutputLimit(f"this session already sends to {len(live)} restream targets "
                              f"(restream.max_targets); DELETE one first")
        allow = self._settings.restream.allow_private_addresses
        try:
            await asyncio.to_thread(check_reachable, target, allow)
        except OSError as error:
            raise ValueError(f"restream target not usable: {error.strerror or error}") from None
        restream_id = secrets.token_urlsafe(8)
        sink = self._start_sink(
            f"restream-{restream_id}",
            RelayOutput(target.format, target.url, check=lambda: check_reachable(target, allow)), retry=True,
            on_state=lambda status: self._announce("restream.state", {"restream_id": restream_id}, status))
        self._restreams[restream_id] = _Restream(restream_id, target, sink, time.time())
        log.info("session %s: restream %s to %s", self.session_id, restream_id, target.shown)
        return self._describe(self._restreams[restream_id])

    def restreams(self) -> list[dict]:
        return [self._describe(r) for r in self._restreams.values()]

    async def stop_restream(self, restream_id: str) -> None:
        entry = self._restreams.pop(restream_id, None)
        if entry is None:
            raise UnknownOutput(f"no restream {restream_id[:40]!r} in this session; GET "
                                "/v1/sessions/{id}/restream lists them")
        await asyncio.to_thread(entry.sink.stop, STOP_TARGET_S)
        self._release(entry.sink)

    # -- lifecycle --------------------------------------------------------------------

    async def close(self) -> None:
        """The session ends: stop every output; the recording's file goes unless kept."""
        sinks = self._sinks()
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in sinks))
        for sink in sinks:
            self._release(sink)
        if self._settings.recording.keep_dir is None:
            self._drop_recording_file()
        elif self._recording_path is not None:
            log.info("session %s: recording kept at %s", self.session_id, self._recording_path)

    # -- internals --------------------------------------------------------------------

    def _sinks(self) -> list[PacketSink]:
        sinks = [r.sink for r in self._restreams.values()]
        return sinks + ([self._recording] if self._recording is not None else [])

    def _start_sink(self, name: str, output: Output, *, retry: bool,
                    on_state: Callable[[SinkStatus], None], **limits: Any) -> PacketSink:
        worker = self._ensure_worker()
        sink = PacketSink(
            name, output, lambda: self._templates(worker),
            request_keyframe=worker.request_keyframe, on_state=on_state, retry=retry, **limits)
        worker.add(sink)
        sink.start()
        return sink

    def _ensure_worker(self) -> EncodeWorker:
        if self._worker is None:
            buffer = self._fanout.attach("egress", self._settings.egress.frame_buffer)
            self._worker = EncodeWorker(buffer, encoder_settings(self._settings), name=self.session_id)
        return self._worker

    @staticmethod
    def _templates(worker: EncodeWorker) -> tuple[Any, Any]:
        encoder = worker.wait_ready(FIRST_FRAME_S)
        return encoder.video_template, encoder.audio_template

    def _release(self, sink: PacketSink) -> None:
        """A sink ended: no longer fed; the encode stops with the last one."""
        if self._worker is None:
            return
        self._worker.remove(sink)
        if not self.active:
            worker, self._worker = self._worker, None
            self._frames_dropped += worker.frames_dropped
            worker.stop(timeout=0)
            self._fanout.detach(worker.frames)

    def _announce(self, event: str, data: dict, status: SinkStatus) -> None:
        """(any thread) Publish an output's new state; release it on the loop when it ended."""
        payload = {**data, **status.as_dict()}

        def on_loop() -> None:
            self._publish(event, payload)
            if status.state in TERMINAL:
                for sink in self._sinks():
                    if sink.done:
                        self._release(sink)

        try:
            self._loop.call_soon_threadsafe(on_loop)
        except RuntimeError:  # the loop closed (shutdown)
            pass

    def _describe(self, entry: _Restream) -> dict:
        return {"restream_id": entry.restream_id, "url": entry.target.shown, "created": entry.created,
                **entry.sink.status.as_dict()}

    def _drop_recording_file(self) -> None:
        path, self._recording_path = self._recording_path, None
        if path is not None and self._settings.recording.keep_dir is None:
            path.unlink(missing_ok=True)

