"""The one consumer of a session's frames, and where a slow output loses frames.

`SessionFanout` reads the session's clock-paced `frames()` once and hands every
`OutputFrame` to each attached `FrameBuffer`: the WebRTC media of the session's viewer, the
H.264/AAC egress encoder (recording, restream). Handing a frame over never waits: a buffer
holds at most `limit` frames and, when its consumer lags, drops its *oldest* frame and
counts it (`FrameBuffer.dropped`; `on_drop` reports it). So a slow or stuck output loses its
own frames and never slows the session or another output.

The session's frames flow while at least one buffer is attached (with or without a WebRTC
viewer): the first `attach` starts reading `frames()`, the last `detach` stops it (a later
`attach` starts again at the frame due then, as `Session.frames` does for a late reader).
When the session ends, every buffer is closed (its consumer sees the end).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable

from ray_lipsync.types import OutputFrame

log = logging.getLogger(__name__)


class FrameBuffer:
    """A bounded frame queue between the fan-out (event loop) and one output.

    `put` is called on the event loop and never blocks; the consumer reads with `async for`
    (a coroutine on the same loop) or `get(timeout)` (a worker thread).
    """

    def __init__(self, name: str, limit: int, on_close: Callable[[FrameBuffer], None] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"a frame buffer holds at least one frame, got limit={limit}")
        self.name = name
        self.limit = limit
        self.dropped = 0  # frames this output lost because it lagged
        self.delivered = 0
        self._frames: collections.deque[OutputFrame] = collections.deque()
        self._lock = threading.Condition()
        self._ready = asyncio.Event()
        self._closed = False
        self._on_close = on_close

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, frame: OutputFrame) -> OutputFrame | None:
        """Queue `frame`; returns the oldest frame dropped to make room (None if none was)."""
        dropped = None
        with self._lock:
            if self._closed:
                return None
            if len(self._frames) >= self.limit:
                dropped = self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self._lock.notify()
        self._ready.set()
        return dropped

    def end(self) -> None:
        """No more frames: the consumer gets what is queued, then the end."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._ready.set()

    def get(self, timeout: float) -> OutputFrame | None:
        """(worker thread) The next frame; None after `timeout` s without one or at the end."""
        with self._lock:
            if not self._frames and not self._closed:
                self._lock.wait(timeout)
            if self._frames:
                self.delivered += 1
                return self._frames.popleft()
            return None

    def __aiter__(self) -> AsyncIterator[OutputFrame]:
        return self

    async def __anext__(self) -> OutputFrame:
        while True:
            with self._lock:
                if self._frames:
                    self.delivered += 1
                    return self._frames.popleft()
                if self._closed:
                    raise StopAsyncIteration
                self._ready.clear()
            await self._ready.wait()

    async def aclose(self) -> None:
        """The consumer is done: detach from the fan-out (what `SessionMedia.stop` calls)."""
        self.end()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self)


class SessionFanout:
    """Reads `frames()` (the session's, single consumer) once for every attached output.

    `on_drop(buffer_name, frame)` is called for each frame an output lost (the gateway counts
    the WebRTC viewer's as the session's `sender_backpressure` drops).
    """

    def __init__(self, frames: Callable[[], AsyncIterator[OutputFrame]], *,
                 on_drop: Callable[[str, OutputFrame], None] | None = None, name: str = "session") -> None:
        self._source = frames
        self._on_drop = on_drop
        self._name = name
        self._buffers: list[FrameBuffer] = []
        self._task: asyncio.Task[None] | None = None
        self._ended = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def outputs(self) -> list[str]:
        return [b.name for b in self._buffers]

    def attach(self, name: str, limit: int) -> FrameBuffer:
        """A new output: its buffer gets every frame from the next one on (closed at once if
        the session already ended)."""
        buffer = FrameBuffer(name, limit, on_close=self.detach)
        if self._ended:
            buffer.end()
            return buffer
        self._buffers.append(buffer)
        if self._task is None or self._task.done() or self._task.cancelling():
            self._task = asyncio.get_running_loop().create_task(self._pump(), name=f"fanout-{self._name}")
        return buffer

    def detach(self, buffer: FrameBuffer) -> None:
        """The output is gone; the session's frames stop when no output is left."""
        buffer.end()
        if buffer in self._buffers:
            self._buffers.remove(buffer)
        if not self._buffers and self._task is not None and not self._task.done():
            self._task.cancel()

    async def close(self) -> None:
        """The session ends: stop reading and end every buffer."""
        self._ended = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._end_all()

    async def _pump(self) -> None:
        frames = self._source()
        try:
            async for frame in frames:
                for buffer in list(self._buffers):
                    lost = buffer.put(frame)
                    if lost is not None:
                        self._dropped(buffer, lost)
            self._ended = True  # the session's stream ended (it closed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: reading the frames failed; ending its outputs", self._name)
            self._ended = True
        finally:
            close = getattr(frames, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # noqa: BLE001 - a generator closed mid-iteration elsewhere
                    log.debug("closing the frame iterator failed", exc_info=True)
            if self._ended:
                self._end_all()

    def _end_all(self) -> None:
        for buffer in self._buffers:
            buffer.end()
        self._buffers.clear()

    def _dropped(self, buffer: FrameBuffer, frame: OutputFrame) -> None:
        log.debug("%s: output %s lagged; frame %d dropped for it", self._name, buffer.name, frame.frame_index)
        if self._on_drop is not None:
            try:
                self._on_drop(buffer.name, frame)
            except Exception:
                log.exception("on_drop callback failed")
