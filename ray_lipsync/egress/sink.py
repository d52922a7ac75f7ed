"""One egress output: a container fed with the shared encode's packets, in its own thread.

Where the packets go is an `Output`: `FileOutput` (the recording's MP4) or `RelayOutput` (a
restream target: NUT through a pipe to a relay process that sends FLV / MPEG-TS to the
target, relay.py, so that no network call of PyAV ever holds this process's GIL).

The encoder thread hands packets over with `put`, which never blocks: the sink's queue is
bounded, and when its output lags (a slow network target) the packets that do not fit are
dropped and counted, and the sink resumes at the next keyframe (asked of the encoder at once).
An output starts on a keyframe and its timestamps start at 0 there.

A network target that fails (refused, dropped) is retried with a doubling backoff
(`RETRY_FIRST_S` .. `RETRY_MAX_S`; back to the first delay once it stayed up
`RETRY_RESET_S`) and reported through `on_state` ("retrying" with the error); a file output
that fails stops ("failed"). `max_seconds` / `max_bytes` stop an output that reached them
("stopped" with the reason). Nothing here touches the session: a sink only ever loses its
own packets.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import av

from ray_lipsync.egress.encoder import EncodedPacket
from ray_lipsync.egress.relay import READY_PREFIXES, reason_of, relay_command
from ray_lipsync.egress.relay import describe as relay_describe

log = logging.getLogger(__name__)

QUEUE_PACKETS = 400  # ~5 s of video and audio packets
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
RETRY_RESET_S = 10.0
TERMINAL = ("stopped", "failed")
RELAY_EXIT_S = 5.0  # a relay gets this long to write its trailer and exit


class TargetRefused(Exception):
    """The target may not be reached (an address the settings forbid): no retry."""


@dataclass
class SinkStatus:
    """What an output is doing (states: starting, live, retrying, stopped, failed)."""

    state: str = "starting"
    error: str | None = None  # the last failure, as said to the client (no addresses)
    stopped_reason: str | None = None
    retries: int = 0
    seconds: float = 0.0  # media written since the output (re)started
    bytes: int = 0  # encoded media written in total
    packets_dropped: int = 0  # packets lost because the output lagged

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3)}


def describe(error: BaseException) -> str:
    """A failure as a client may read it: the OS or FFmpeg reason, never a URL or address."""
    return str(error) if isinstance(error, TargetRefused) else relay_describe(error)


class Output(Protocol):
    """Where a sink writes (see the module docstring)."""

    def open(self) -> Any:
        """A new output container to mux into (raises when the output cannot be opened)."""

    def connected(self) -> bool:
        """Whether the far end took the stream (a file: at once)."""

    def explain(self, error: BaseException) -> str:
        """Why the output failed, as a client may read it."""

    def close(self) -> None:
        """After the container closed: let the output finish (the relay writes its trailer)."""

    def abort(self) -> None:
        """Unblock a write stuck on a target that does not read (from another thread)."""


class FileOutput:
    """An MP4 file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def open(self) -> Any:
        return av.open(self.path, "w", format="mp4")

    def connected(self) -> bool:
        return True

    def explain(self, error: BaseException) -> str:
        return describe(error)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class RelayOutput:
    """A network target, through a relay process (relay.py) started at each (re)connect.

    `check()` runs before every start (re-validates the target's addresses). The relay's
    stdout is read by a thread of its own (ffmpeg keeps reporting progress there)."""

    def __init__(self, fmt: str, url: str, check: Callable[[], None] | None = None) -> None:
        self._fmt, self._url, self._check = fmt, url, check
        self._process: subprocess.Popen | None = None
        self._ready = threading.Event()

    def open(self) -> Any:
        if self._check is not None:
            self._check()
        self._ready = threading.Event()
        self._process = subprocess.Popen(relay_command(self._fmt, self._url), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        threading.Thread(target=self._read_stdout, args=(self._process, self._ready),
                         name="relay-stdout", daemon=True).start()
        assert self._process.stdin is not None
        return av.open(self._process.stdin, "w", format="nut")

    def connected(self) -> bool:
        process = self._process
        if process is not None and process.poll() is not None and process.returncode != 0:
            raise RelayFailed(self._reason() or f"the relay exited with {process.returncode}")
        return self._ready.is_set()

    def explain(self, error: BaseException) -> str:
        if isinstance(error, RelayFailed):
            return str(error)
        process = self._process
        if process is not None:
            try:
                process.wait(RELAY_EXIT_S)
            except subprocess.TimeoutExpired:
                pass
        return self._reason() or describe(error)

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(RELAY_EXIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def abort(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()

    @staticmethod
    def _read_stdout(process: subprocess.Popen, ready: threading.Event) -> None:
        assert process.stdout is not None
        with process.stdout:
            for line in process.stdout:
                if not ready.is_set() and line.decode(errors="replace").startswith(READY_PREFIXES):
                    ready.set()

    def _reason(self) -> str | None:
        process = self._process
        if process is None or process.poll() is None or process.stderr is None:
            return None
        lines = process.stderr.read().decode(errors="replace").strip().splitlines()
        return reason_of(lines[-1])[:200] if lines else None


class RelayFailed(Exception):
    """The relay process ended with an error (its reason is the message)."""


class PacketSink:
    """Muxes the shared packets into `output`'s containers.

    `templates()`: (video, audio) streams to copy codec parameters from (blocks until the
    shared encoder has them); `request_keyframe` asks the encoder for one (a sink (re)starts
    on it); `on_state(status)` is called from the sink's thread on every state change;
    `retry`: reconnect after a failure (network targets).
    """

    def __init__(self, name: str, output: Output,
                 templates: Callable[[], tuple[Any, Any]], *, request_keyframe: Callable[[], None],
                 on_state: Callable[[SinkStatus], None], retry: bool,
                 max_seconds: float | None = None,
                 max_bytes: int | None = None, queue_packets: int = QUEUE_PACKETS) -> None:
        self.name = name
        self.status = SinkStatus()
        self.output = output
        self._templates = templates
        self._request_keyframe = request_keyframe
        self._on_state = on_state
        self._retry = retry
        self._max_seconds = max_seconds
        self._max_bytes = max_bytes
        self._queue: queue.Queue[tuple[EncodedPacket, bool]] = queue.Queue(queue_packets)
        self._gap = False  # packets were dropped: the next one queued says "resume at a keyframe"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"egress-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.status.state in TERMINAL

    def put(self, packets: list[EncodedPacket]) -> None:
        """(encoder thread) Queue packets; never blocks (see the module docstring)."""
        if self.done or self._stop.is_set():
            return
        for packet in packets:
            try:
                self._queue.put_nowait((packet, self._gap))
                self._gap = False
            except queue.Full:
                if not self._gap:
                    self._request_keyframe()
                self._gap = True
                self.status.packets_dropped += 1

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued, close the container, end the thread (waits up to `timeout`,
        then aborts the output: a relay stuck on a target that does not read is killed)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.output.abort()
                self._thread.join(timeout)

    # -- the sink's thread ----------------------------------------------------------------

    def _run(self) -> None:
        delay = RETRY_FIRST_S
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._stream_once()
                break  # stopped, or a limit reached
            except Exception as error:  # noqa: BLE001 - any failure of this output is its own
                reason = self.output.explain(error)
                if not self._retry or isinstance(error, TargetRefused):
                    log.warning("egress %s failed: %s", self.name, reason, exc_info=not isinstance(error, OSError))
                    self._set(state="failed", error=reason)
                    return
                if time.monotonic() - started > RETRY_RESET_S:
                    delay = RETRY_FIRST_S
                self.status.retries += 1
                log.info("egress %s: %s; retrying in %.0f s", self.name, reason, delay)
                self._set(state="retrying", error=reason)
                if self._stop.wait(delay):
                    break
                delay = min(RETRY_MAX_S, delay * 2)
        self._set(state="stopped", stopped_reason=self.status.stopped_reason or "stopped")

    def _stream_once(self) -> None:
        """Open, mux until stopped or a limit; raises on a failure of the output."""
        video_template, audio_template = self._templates()
        container = self.output.open()
        live = False
        try:
            video = container.add_stream_from_template(video_template, opaque=True)
            audio = container.add_stream_from_template(audio_template, opaque=True)
            container.start_encoding()  # writes the header
            self._drain()  # what queued while opening is stale: start at a fresh keyframe
            self._request_keyframe()
            base: float | None = None  # the first keyframe's time: the output's 0
            waiting = True  # for a keyframe: at the start, and after packets were dropped
            while True:
                if not live and base is not None and self.output.connected():
                    live = True
                    self._set(state="live", error=None)
                try:
                    packet, gap = self._queue.get(timeout=0.2)
                except queue.Empty:
                    if self._stop.is_set():
                        self._set(stopped_reason="stopped")
                        break
                    continue
                waiting = waiting or gap
                if waiting:
                    if not (packet.kind == "video" and packet.keyframe):
                        continue
                    waiting = False
                    if base is None:
                        base = packet.seconds
                        self.status.seconds = 0.0
                assert base is not None
                if not self._mux(container, video if packet.kind == "video" else audio, packet, base):
                    break
        finally:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - a broken connection cannot take the trailer
                log.debug("egress %s: closing the container failed", self.name, exc_info=True)
            self.output.close()

    def _mux(self, container: Any, stream: Any, packet: EncodedPacket, base: float) -> bool:
        """Write one packet, rebased to start at 0; False once a limit is reached."""
        t = packet.seconds - base
        if t < 0:
            return True  # audio from before the output's first keyframe
        if self._max_seconds is not None and t >= self._max_seconds:
            self._set(stopped_reason=f"reached the limit of {self._max_seconds:g} s (recording.max_seconds)")
            return False
        if self._max_bytes is not None and self.status.bytes + len(packet.data) > self._max_bytes:
            self._set(stopped_reason=f"reached the limit of {self._max_bytes} bytes (recording.max_bytes)")
            return False
        shift = round(base / packet.time_base)
        out = av.Packet(packet.data)
        out.pts, out.dts = packet.pts - shift, packet.dts - shift
        out.time_base, out.is_keyframe, out.stream = packet.time_base, packet.keyframe, stream
        container.mux(out)
        self.status.bytes += len(packet.data)
        self.status.seconds = max(self.status.seconds, t)
        return True

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _set(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.status, key, value)
        if "state" in changes:
            try:
                self._on_state(SinkStatus(**asdict(self.status)))
            except Exception:
                log.exception("egress %s: on_state callback failed", self.name)

