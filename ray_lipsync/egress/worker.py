"""The encode thread of a session's egress: frames from the fan-out -> one H.264 + AAC
encode -> every sink (recording, restream targets).

It starts with the first sink and stops with the last (`SessionEgress` decides). The frame
buffer between the fan-out and this thread is bounded (`egress.frame_buffer`): when the
encode lags, the buffer drops the oldest frames (counted in `frames_dropped`) and the encoder
fills their audio with silence; the session never waits for it.
"""

from __future__ import annotations

import logging
import threading

from ray_lipsync.egress.encoder import AvEncoder, EncoderSettings
from ray_lipsync.egress.fanout import FrameBuffer
from ray_lipsync.egress.sink import PacketSink

log = logging.getLogger(__name__)

POLL_S = 0.2


class EncodeWorker:
    """Runs `AvEncoder` over `frames` in a thread and hands the packets to its sinks."""

    def __init__(self, frames: FrameBuffer, settings: EncoderSettings, name: str = "egress") -> None:
        self.frames = frames
        self._settings = settings
        self._sinks: list[PacketSink] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()  # the encoder exists (its templates can be copied)
        self._encoder: AvEncoder | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"encode-{name}", daemon=True)
        self._thread.start()

    @property
    def frames_dropped(self) -> int:
        return self.frames.dropped

    @property
    def frames_encoded(self) -> int:
        return self._encoder.frames if self._encoder is not None else 0

    def wait_ready(self, timeout: float) -> AvEncoder:
        """(blocking) The encoder, once the first frame sized it; TimeoutError/RuntimeError."""
        if not self._ready.wait(timeout):
            raise TimeoutError("the session sent no frame to encode in time")
        if self._encoder is None:
            raise RuntimeError(self.error or "the egress encoder failed")
        return self._encoder

    def request_keyframe(self) -> None:
        """(any thread) The next picture is a keyframe (once the encoder exists)."""
        if self._encoder is not None:
            self._encoder.request_keyframe()

    def add(self, sink: PacketSink) -> None:
        """Feed `sink` from the next frame on (it starts at a keyframe, asked for here)."""
        with self._lock:
            self._sinks.append(sink)
        self.request_keyframe()

    def remove(self, sink: PacketSink) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (the frame buffer is detached by the caller)."""
        self._stop.set()
        self.frames.end()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.frames.get(POLL_S)
                if frame is None:
                    if self.frames.closed:
                        break
                    continue
                if self._encoder is None:
                    height, width = frame.image.shape[:2]
                    self._encoder = AvEncoder(width, height, self._settings)
                    self._ready.set()
                packets = self._encoder.encode(frame)
                with self._lock:
                    sinks = [s for s in self._sinks if not s.done]
                for sink in sinks:
                    sink.put(packets)
        except Exception as error:  # noqa: BLE001 - the encode fails alone, the session goes on
            self.error = f"the egress encoder failed: {type(error).__name__}"
            log.exception("egress encoder failed")
        finally:
            self._ready.set()
            if self._encoder is not None:
                self._encoder.close()
