"""aiortc media tracks fed by one session clock.

One `SessionMedia` per WebRTC peer consumes the session's frames (its own buffer of the
session's fan-out, egress/fanout.py, or `session.frames()` itself; either way already paced
by the session's `SessionClock`). It fans each `OutputFrame` out to a
`SessionVideoTrack` (one VP8 av.Packet, pts = 3600k on the 90 kHz clock, encoded by the
session's `Vp8Stream` when the sender takes it) and a `SessionAudioTrack` (two 20 ms
chunks, s16 mono 16 kHz, pts counted in samples, one Opus packet each from its
`OpusStream`), so frame k and chunks 2k, 2k+1 always carry the same presentation time. Frames arrive paced by the session clock; the audio track
only spreads each frame's two chunks over their own slots (chunk 2k+1 leaves 20 ms after
chunk 2k, at `presentation_time + 20 ms`), so audio packets leave every 20 ms rather than in
pairs every 40 ms (a receiver's jitter buffer then has no 20 ms burst jitter to absorb).
With a video hold (`video_hold`, `webrtc.video_hold_ms`), frame k's video leaves at
`presentation_time + hold` rather than at once: for receivers whose own lip sync leaves the
picture ahead of the sound (`WebRTCConfig.video_hold_ms`).

Backpressure: the video queue (of frames not encoded yet, so a drop never breaks the VP8
reference chain) is bounded and drops its *oldest* frame when the sender lags
(counted in `video_frames_dropped` and reported to the session, `record_dropped`, which
counts it as a `sender_backpressure` drop); audio is never dropped or delayed (silence is sent as
zeros, or, with `opus_dtx`, as Opus DTX once it has settled). A still picture's repeats are mostly left out of the video (not
encoded, not sent; `Vp8Stream.skips` decides and counts them, `frames_left_out`). A frame is
reported as sent (`record_sent`, `on_frame_sent`) once its video (or its drop or leaving out)
and both its audio chunks have been handed to the encoders (or left out: Opus DTX in a
settled silence, `OpusStream`).
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ray_lipsync.clock import CHUNK_SAMPLES, FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, audio_pts
from ray_lipsync.types import OutputFrame
from ray_lipsync.webrtc.encoder import STILL_EVERY, OpusStream, Vp8Stream

log = logging.getLogger(__name__)

AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
DEFAULT_VIDEO_QUEUE = 4  # frames (160 ms) before the oldest is dropped
DEFAULT_AUDIO_QUEUE = 50 * 30  # chunks (30 s); only reached if the audio sender is stuck
JOIN_LATE_S = 0.04  # at start, frames later than this are skipped (they were due before connect)
CHUNK_S = CHUNK_SAMPLES / SAMPLE_RATE


async def wait_due(due: float | None, now: Callable[[], float], most: float) -> None:
    """Sleep until `due` on the clock `now`, never longer than `most` (a clock that stands
    still never blocks; None: no wait)."""
    if due is not None:
        wait = min(most, due - now())
        if wait > 0:
            await asyncio.sleep(wait)


def video_due(frame: OutputFrame, hold: float) -> float | None:
    """When frame k's video may leave: its presentation time + `hold` (None: at once)."""
    return frame.presentation_time + hold if hold > 0 else None


def hold_frames(hold: float) -> int:
    """Frames a video hold of `hold` seconds keeps queued (added to a video queue's bound)."""
    return math.ceil(hold * FPS)


def audio_chunks(frame: OutputFrame) -> tuple[av.AudioFrame, av.AudioFrame]:
    """The two 20 ms av.AudioFrame (s16 mono 16 kHz) of frame k: chunks 2k and 2k+1.

    Missing or short audio is padded with zeros so the audio stream never has a gap. The
    samples are finite (the session timeline refuses anything else).
    """
    samples = np.zeros(SAMPLES_PER_FRAME, dtype=np.float32)
    if frame.audio is not None:
        audio = np.asarray(frame.audio, dtype=np.float32).reshape(-1)[:SAMPLES_PER_FRAME]
        samples[: len(audio)] = audio
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
    k = 2 * frame.frame_index
    return pcm_chunk(pcm[:CHUNK_SAMPLES], k), pcm_chunk(pcm[CHUNK_SAMPLES:], k + 1)


def pcm_chunk(pcm: np.ndarray, index: int) -> av.AudioFrame:
    """Chunk `index` of the session's audio: CHUNK_SAMPLES s16 mono samples at 16 kHz."""
    chunk = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    chunk.sample_rate = SAMPLE_RATE
    chunk.pts = audio_pts(index)
    chunk.time_base = AUDIO_TIME_BASE
    return chunk


@dataclass
class MediaCounters:
    """What the media source has done so far (read it any time)."""

    frames_in: int = 0
    frames_skipped_at_join: int = 0
    video_frames_sent: int = 0
    video_frames_dropped: int = 0
    audio_chunks_sent: int = 0
    audio_chunks_left_out: int = 0
    frames_reported: int = 0


class _Item:
    """A queued output frame and, for audio, its ready av frame (video is encoded on send).

    `due` is when the item may leave, on the media source's clock (None: at once).
    """

    __slots__ = ("av_frame", "due", "frame", "packet")

    def __init__(self, av_frame: av.frame.Frame | None, frame: OutputFrame, due: float | None = None) -> None:
        self.av_frame = av_frame
        self.frame = frame
        self.due = due
        self.packet: av.Packet | None = None  # audio: encoded when it is due


class _SessionTrack(MediaStreamTrack):
    """A track whose recv() pops what the media source queued (no own pacing): an item
    leaves when it is ready and due, waiting at most `max_wait` seconds for that."""

    max_wait = CHUNK_S

    def __init__(self, media: "SessionMedia") -> None:
        super().__init__()
        self._media = media
        self._queue: collections.deque[_Item | None] = collections.deque()
        self._ready = asyncio.Event()

    def _put(self, item: _Item | None) -> None:
        self._queue.append(item)
        self._ready.set()

    async def recv(self) -> av.frame.Frame:
        if self.readyState != "live":
            raise MediaStreamError
        self._media.start()
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
                if self.readyState != "live":
                    raise MediaStreamError
            item = self._queue.popleft()
            if item is None:
                self.stop()
                raise MediaStreamError
            if self._left_out(item):  # not sent: nothing to wait for
                self._media._on_left_out(self.kind, item.frame)  # counted by the encoder that decided
                continue
            break
        out = await self._media_of(item)
        await wait_due(item.due, self._media._now, self.max_wait)
        self._media._on_sent(self.kind, item.frame)
        return out

    def _left_out(self, item: _Item) -> bool:
        """Whether this item is not sent at all (a repeat the receiver already shows)."""
        return False

    async def _media_of(self, item: _Item) -> av.frame.Frame | av.Packet:
        assert item.av_frame is not None
        return item.av_frame

    def stop(self) -> None:
        super().stop()
        self._ready.set()


class SessionVideoTrack(_SessionTrack):
    """Video of one session: frame k as a VP8 av.Packet, pts 3600k, time base 1/90000.

    Frames are encoded (in a worker thread) when the sender takes them, in order, by one
    `Vp8Stream`; the sender must negotiate VP8 (`SessionPeer` restricts the answer to it).
    """

    kind = "video"

    def __init__(self, media: "SessionMedia", still_every: int = STILL_EVERY, hold: float = 0.0) -> None:
        super().__init__(media)
        self.encoder = Vp8Stream(still_every=still_every)
        self.max_wait = hold

    def _left_out(self, item: _Item) -> bool:
        return self.encoder.skips(np.asarray(item.frame.image))

    async def _media_of(self, item: _Item) -> av.Packet:
        image, pts = np.asarray(item.frame.image), int(item.frame.pts)
        packet = self.encoder.replay(image, pts)  # an idle cycle already sent: no encode
        if packet is not None:
            return packet
        return await asyncio.get_running_loop().run_in_executor(None, self.encoder.encode, image, pts)

    def _put_frame(self, item: _Item, limit: int) -> None:
        while sum(1 for i in self._queue if i is not None) >= limit:
            dropped = self._queue.popleft()
            if dropped is not None:
                self._media._on_video_dropped(dropped.frame)
        self._put(item)


class SessionAudioTrack(_SessionTrack):
    """Audio of one session: two 20 ms Opus packets per video frame, pts in 16 kHz samples.

    Each chunk is encoded by the session's `OpusStream` when the sender takes it (one packet
    per chunk, no resampler delay); the sender must negotiate Opus (`SessionPeer` does).
    """

    kind = "audio"

    def __init__(self, media: "SessionMedia", fec: bool = False, dtx: bool = False) -> None:
        super().__init__(media)
        self.encoder = OpusStream(fec=fec, dtx=dtx)

    def _left_out(self, item: _Item) -> bool:
        assert item.av_frame is not None
        item.packet = self.encoder.encode(item.av_frame)  # None: DTX leaves it out
        return item.packet is None

    async def _media_of(self, item: _Item) -> av.Packet:
        assert item.packet is not None
        return item.packet


class SessionMedia:
    """The one media source of a session: consumes `frames` and feeds the two tracks.

    `frames` is the session's clock-paced frame iterator (its fan-out buffer for this peer).
    `now` reads the clock of `OutputFrame.presentation_time` (the session's: wall time). When
    consumption starts, frames already overdue (due before the connection came up) are
    skipped rather than burst out; their utterance marks move to the first frame sent.
    `record_sent` (the session's) and `on_frame_sent` (the API's) are called once per frame,
    in frame order, after its video and both audio chunks went to the encoders (or were left
    out: a still picture's repeat, DTX silence). `opus_fec` turns on Opus in-band FEC (the
    client asked for it), `opus_dtx` Opus DTX in silence (`OpusStream`); `still_every` is the
    largest frame gap of a still picture (`Vp8Stream`); `video_hold` (seconds) holds each
    frame's video until `presentation_time + video_hold` (its queue bound grows by the frames
    held). Consumption starts on the first
    `recv()` of a track (or `start()`), i.e. when the connection is up.
    """

    def __init__(
        self,
        frames: AsyncIterator[OutputFrame],
        *,
        record_sent: Callable[[OutputFrame], None] | None = None,
        record_dropped: Callable[[OutputFrame], None] | None = None,
        on_frame_sent: Callable[[OutputFrame], None] | None = None,
        video: bool = True,
        audio: bool = True,
        opus_fec: bool = False,
        opus_dtx: bool = False,
        still_every: int = STILL_EVERY,
        video_hold: float = 0.0,
        video_queue: int = DEFAULT_VIDEO_QUEUE,
        audio_queue: int = DEFAULT_AUDIO_QUEUE,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not (video or audio):
            raise ValueError("SessionMedia needs at least one of video/audio")
        if video_queue < 1 or audio_queue < 2 or video_hold < 0:
            raise ValueError("video_queue must be >= 1, audio_queue >= 2 and video_hold >= 0")
        self._frames = frames
        self._record_sent = record_sent
        self._record_dropped = record_dropped
        self._on_frame_sent = on_frame_sent
        self._video_limit = video_queue + hold_frames(video_hold)
        self._video_hold = video_hold
        self._audio_space = asyncio.Semaphore(audio_queue // 2)  # whole frames of audio
        self.video: SessionVideoTrack | None = SessionVideoTrack(self, still_every, video_hold) if video else None
        self.audio: SessionAudioTrack | None = SessionAudioTrack(self, fec=opus_fec, dtx=opus_dtx) if audio else None
        self.counters = MediaCounters()
        self._parts_per_frame = (1 if video else 0) + (2 if audio else 0)
        # frame_index -> [parts still to send, frame], in arrival order
        self._pending: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._now = now
        self._joined = False
        self._join_meta: dict[str, list] = {}

    @property
    def tracks(self) -> list[MediaStreamTrack]:
        return [t for t in (self.video, self.audio) if t is not None]

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start consuming frames (idempotent; the first track `recv()` calls it)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._pump(), name="session-media")

    async def wait_finished(self) -> None:
        """Until the frame source ended (session closed) or `stop()` was called."""
        await self._finished.wait()

    async def drain(self, timeout: float = 0.5) -> bool:
        """After the source ended: wait until the senders took everything queued (or timeout).

        This keeps the video:audio count at exactly 1:2 at the end of a session.
        """
        if not self._finished.is_set():
            return False
        deadline = asyncio.get_running_loop().time() + timeout
        while any(t.readyState == "live" and t._queue for t in self.tracks):
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def stop(self) -> None:
        """Stop consuming, end both tracks (their senders see MediaStreamError)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._end_tracks()
        for track in self.tracks:
            track.stop()
        close = getattr(self._frames, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:  # noqa: BLE001 - the generator may be mid-iteration elsewhere
                log.debug("closing the frame iterator failed", exc_info=True)

    async def _pump(self) -> None:
        try:
            async for frame in self._frames:
                if not self._joined and self._stale(frame):
                    continue
                await self._fan_out(frame)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session media source failed; ending tracks")
        finally:
            self._end_tracks()

    def _end_tracks(self) -> None:
        for track in self.tracks:
            if track.readyState == "live" and (not track._queue or track._queue[-1] is not None):
                track._put(None)
        self._finished.set()

    def _stale(self, frame: OutputFrame) -> bool:
        """Before the first frame went out: skip overdue frames, keeping their marks."""
        if frame.presentation_time >= self._now() - JOIN_LATE_S:
            self._joined = True
            if self._join_meta:
                meta = dict(frame.meta)
                for key, ids in self._join_meta.items():
                    meta[key] = [*ids, *meta.get(key, [])]
                frame.meta = meta
            return False
        self.counters.frames_skipped_at_join += 1
        for key in ("utterance_start", "utterance_end"):
            if frame.meta.get(key):
                self._join_meta.setdefault(key, []).extend(frame.meta[key])
        return True

    async def _fan_out(self, frame: OutputFrame) -> None:
        self.counters.frames_in += 1
        self._pending[frame.frame_index] = [self._parts_per_frame, frame]
        if self.audio is not None:
            await self._audio_space.acquire()  # never drop audio: wait instead (sender stuck)
            first, second = audio_chunks(frame)
            self.audio._put(_Item(first, frame))
            self.audio._put(_Item(second, frame, due=frame.presentation_time + CHUNK_S))
        if self.video is not None:
            self.video._put_frame(_Item(None, frame, due=video_due(frame, self._video_hold)), self._video_limit)

    def _on_video_dropped(self, frame: OutputFrame) -> None:
        self.counters.video_frames_dropped += 1
        if self._record_dropped is not None:
            self._record_dropped(frame)
        log.debug("session %s: video frame %d dropped (sender lagging)", frame.session_id, frame.frame_index)
        self._part_done(frame)

    def _on_sent(self, kind: str, frame: OutputFrame) -> None:
        if kind == "video":
            self.counters.video_frames_sent += 1
        else:
            self.counters.audio_chunks_sent += 1
            self._audio_chunk_done()
        self._part_done(frame)

    def _on_left_out(self, kind: str, frame: OutputFrame) -> None:
        """A part not sent at all (a still picture's repeat, a chunk of DTX silence)."""
        if kind == "audio":
            self.counters.audio_chunks_left_out += 1
            self._audio_chunk_done()
        self._part_done(frame)

    def _audio_chunk_done(self) -> None:
        c = self.counters
        if (c.audio_chunks_sent + c.audio_chunks_left_out) % 2 == 0:
            self._audio_space.release()  # a whole frame of audio left the queue

    def _part_done(self, frame: OutputFrame) -> None:
        entry = self._pending.get(frame.frame_index)
        if entry is None:
            return
        entry[0] -= 1
        # Report completed frames in order, so utterance start/end events never reorder.
        while self._pending:
            k, (left, done) = next(iter(self._pending.items()))
            if left > 0:
                break
            del self._pending[k]
            self._report(done)

    def _report(self, frame: OutputFrame) -> None:
        self.counters.frames_reported += 1
        for callback in (self._record_sent, self._on_frame_sent):
            if callback is None:
                continue
            try:
                callback(frame)
            except Exception:
                log.exception("frame-sent callback failed for frame %d", frame.frame_index)
