"""A streaming session: one media clock, speech in, paced frames with their audio out.

The session owns the timeline (where speech lands on its clock) and the output pacing; the
frames themselves are computed by an engine behind a `SessionLink` (in-process for
`LocalPipeline`, Ray actors for `RayPipeline`). Frame k leaves `frames()` at its presentation
time with chunks 2k and 2k+1; if its image is not ready then, the avatar's silent frame
takes its place and it counts as dropped. Audio is never held back.

Which source frame of the avatar frame k shows (its idle cycle, a state clip, an action) is
decided by the session's `ClipPlayer` (streaming/sources.py): silent frames read it here, and
each push carries its plan to the feature stage for the speech frames.

The session is the one place where drops are decided and counted (`DropCounter`, with a
reason): stages only report why they shed a frame. Speech whose result arrives after its
frame was shown, or whose engine call failed, counts when that becomes known.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.clock import SAMPLE_RATE, SAMPLES_PER_FRAME, SessionClock, ms_to_samples, video_pts
from ray_lipsync.errors import MalformedAudio, SessionClosed
from ray_lipsync.streaming.drops import DropCounter, DropReason
from ray_lipsync.streaming.playout import PlayoutPolicy
from ray_lipsync.streaming.sources import ClipPlayer
from ray_lipsync.streaming.timeline import Cut, SessionTimeline, Utterance
from ray_lipsync.streaming.timings import FrameTimings
from ray_lipsync.streaming.engine import RoundResult
from ray_lipsync.streaming.link import SessionLink, SessionStats
from ray_lipsync.types import AudioPush, OutputFrame, StageSpec

log = logging.getLogger(__name__)

RELEASE_MARGIN_MS = 120  # queued speech goes to the engine this far ahead of its lookahead
REPLAY_BACKOFF_S = 0.05  # a failed round's audio is sent again after this (doubling, ...
REPLAY_BACKOFF_MAX_S = 0.4  # ... up to this) while its frames are not yet due

__all__ = ["Session", "SessionLink", "SessionStats", "Utterance"]


class Session:
    """One avatar stream. Create through a pipeline (`create_session`), not directly."""

    def __init__(
        self,
        session_id: str,
        avatar: Avatar,
        backend: str,
        link: SessionLink,
        clock: SessionClock,
        *,
        max_queued_s: float,
        lookahead_ms: int,
        playout: PlayoutPolicy | None = None,
        schedule: str = "streaming",
    ) -> None:
        self.session_id = session_id
        self.avatar = avatar
        self.backend = backend
        self.clock = clock
        self._link = link
        self._spec = StageSpec(avatar.name, len(avatar.idle_frames), schedule)
        self._player = ClipPlayer(avatar)
        self._timeline = SessionTimeline(clock, max_queued_s)
        self._lookahead = ms_to_samples(lookahead_ms)
        self._playout = playout  # None: every utterance gets the clock's fixed D
        self._lead = self._lookahead + ms_to_samples(RELEASE_MARGIN_MS)
        self._ready: dict[int, tuple[np.ndarray, float | None, int]] = {}  # frame -> (image, latency ms, source frame)
        self._expected: set[int] = set()  # speech frames whose image is on its way
        self._lost: dict[int, DropReason] = {}  # expected frames a stage reported it shed
        self._drops = DropCounter()
        self._timings = FrameTimings()
        self._next_emit = max(0, clock.frame_at(time.time()) + 1)
        self._late_ends: list[str] = []  # utterance ends cut by an interrupt into the past
        self._wake = asyncio.Event()
        self._closed = False
        self.frames_sent = 0
        self._engine_ok = True
        self._claimed = 0  # frames before this were completed by pushes already submitted
        self._released = (0, False)  # (end sample, final) of the audio handed to the engine
        self._replay_from: int | None = None  # first frame whose round failed, to send again
        self._replayer: asyncio.Future | None = None
        self._state_listeners: list[Callable[[str], None]] = []
        self._feeder = asyncio.create_task(self._feed(), name=f"feed-{session_id}")
        self._collectors: set[asyncio.Task] = set()

    # -- properties -------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._timeline.epoch

    @property
    def replica(self) -> str:
        return self._link.replica

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def state(self) -> str:
        """"streaming", or "waiting_for_replica" while its replica is gone and none has room
        (its frames show idle and count as dropped; it resumes by itself)."""
        return "waiting_for_replica" if self._link.waiting else "streaming"

    def avatar_state(self) -> dict[str, Any]:
        """{state, clip, action, clips}: the silent state, the clip the next frame shows, the
        action playing or about to (None if none), and the names state and action take."""
        k = self._next_emit
        return {"state": self._player.state, "clip": self._player.clip_at(k),
                "action": self._player.action_at(k), "clips": self._player.clips}

    def change_avatar_state(self, state: str | None = None, action: str | None = None) -> dict[str, Any]:
        """Make clip `state` ("idle": the main video) the silent state and/or play clip
        `action` once, then return to the state; the state first, both names checked before
        anything changes (UnknownClip for a clip the avatar lacks). Returns {state, clip,
        action, clips} as of the next frame shown, plus `from_frame` (the output frame the
        change takes effect from) and `action_end_frame` (the one after the action's last).

        The switch comes at the first frame no stage has used (the next frame shown, or the
        one after the speech already handed to the engine, whose frames were lip-synced on
        the old plan), or up to MAX_WAIT_FRAMES later, at a frame close to the new clip
        (streaming/sources.py). An action playing then finishes first."""
        self._check_open()
        from_frame, end = self._player.change(state, action, self._switch_frame())
        return {**self.avatar_state(), "from_frame": from_frame, "action_end_frame": end}

    def _switch_frame(self) -> int:
        self._player.forget_before(self._next_emit)
        return max(self._next_emit, self._claimed)

    def on_state_change(self, listener: Callable[[str], None]) -> None:
        """Call `listener(state)` whenever `state` changes."""
        self._state_listeners.append(listener)

    def link_state_changed(self) -> None:
        """The link's `waiting` changed (called by the link)."""
        for listener in self._state_listeners:
            listener(self.state)

    @property
    def frames_dropped(self) -> int:
        return self._drops.visible

    @property
    def drops(self) -> DropCounter:
        return self._drops

    @property
    def last_cut(self) -> Cut | None:
        """What the latest interrupt cut (utterances shortened, utterances dropped)."""
        return self._timeline.last_cut

    # -- input ------------------------------------------------------------------------
    async def push_audio(
        self, samples: np.ndarray, utterance_id: str | None = None, final: bool = True
    ) -> Utterance:
        """Queue 16 kHz mono float32 speech; see SessionTimeline.place for where it lands.

        Repeated pushes with one utterance_id and final=False stream a single utterance.
        """
        self._check_open()
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise MalformedAudio(f"push mono 16 kHz samples (1-D), got an array of shape {samples.shape}")
        # a piece continuing a streamed utterance keeps the D it started with (timeline.place)
        continuing = utterance_id is not None and utterance_id == self._timeline.open_utterance
        delay = (None if self._playout is None or continuing
                 else self._playout.delay_for(self._timings.needs_ms, streamed=not final))
        placement = self._timeline.place(samples, time.time(), utterance_id, final, delay)
        self._wake.set()
        return placement.utterance

    async def interrupt(self) -> int:
        """Stop the current speech: nothing of it is shown from the next frame on."""
        self._check_open()
        utterances, open_id = self._timeline.utterances, self._timeline.open_utterance
        started = [u.utterance_id for u in utterances.values()  # end mark not sent yet
                   if u.start_frame < self._next_emit
                   and (self._next_emit <= u.end_frame - 1 or u.utterance_id == open_id)]
        cut_frame = self._timeline.interrupt(time.time())
        # a cut utterance whose new last frame was already emitted ends on the next frame
        self._late_ends += [uid for uid in started
                            if uid not in utterances or utterances[uid].end_frame <= self._next_emit]
        epoch = self._timeline.epoch
        for k in [k for k in self._ready if k >= cut_frame]:
            del self._ready[k]
        self._expected = {k for k in self._expected if k < cut_frame}
        self._claimed = min(self._claimed, cut_frame)
        self._released = (min(self._released[0], cut_frame * SAMPLES_PER_FRAME), True)
        self._replay_from = None
        # The cut is final here; the engine learns of it in the background (the task starts
        # before any push of the new epoch, whose rounds carry the epoch anyway), so a slow
        # replica never delays the answer, nor lets the cut utterance's end come before it.
        self._spawn(self._link.interrupt(epoch, cut_frame))
        return epoch

    async def close(self) -> None:
        """Stop the session and free its engine resources (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._feeder.cancel()
        for task in list(self._collectors):
            task.cancel()
        await asyncio.gather(self._feeder, *self._collectors, return_exceptions=True)
        try:
            await self._link.close()
        except Exception:  # the engine may already be gone; the session is closed anyway
            log.warning("session %s: engine close failed", self.session_id, exc_info=True)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed(f"session {self.session_id} is closed; create a new one")

    # -- feeding the engine -----------------------------------------------------------
    async def _feed(self) -> None:
        """Hand queued speech to the engine, at most `lead` ahead of real time.

        Contiguous placements go in one submit; audio that would not complete another frame
        (with the lookahead) waits for more, so the engine is called about once per frame.
        """
        timeline = self._timeline
        while not self._closed:
            if not timeline.unreleased:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.time()
            horizon = int((now - self.clock.t0) * SAMPLE_RATE) + self._lead
            start = timeline.unreleased[0].start
            stop, final = timeline.releasable(horizon)
            if stop <= start or not (final or self._completes_frame(start, stop)):
                wait = (start - horizon) / SAMPLE_RATE if start >= horizon else 0.04
                await self._sleep_or_wake(wait)
                continue
            piece, arrived = timeline.take(stop)
            self._timings.audio_ready(start, stop, max(now, arrived))
            # The frames this push completes (the rest wait for their lookahead; frames in a
            # gap before it are silence, never speech). Submits run as tasks, created in order
            # so pushes reach the engine in order: an engine that answers only once the frames
            # are rendered never holds back the next release.
            first = self._claimed
            done = -(-stop // SAMPLES_PER_FRAME) if final else (stop - self._lookahead) // SAMPLES_PER_FRAME
            self._claimed = max(first, done)
            continues = self._released == (start, False)
            self._released = (stop, final)
            # A push that continues the previous one starts at the first frame it completes:
            # the audio it repeats (that push's lookahead) is skipped by a stage that has it,
            # and lets a stage that never saw the session (restarted, failed over, re-pinned)
            # compute that frame too.
            resend = max(first * SAMPLES_PER_FRAME, self._timeline.audio.start) if continues else start
            if resend < start:
                piece = np.concatenate([self._timeline.audio.read(resend, start), piece])
            self._spawn(self._submit(self._push(resend, piece, final), range(first, self._claimed)))

    def _push(self, start: int, samples: np.ndarray, final: bool, replay: bool = False) -> AudioPush:
        """The push of timeline samples [start, start + len(samples)), made now."""
        return AudioPush(self.session_id, self._timeline.epoch, start, samples, final, self._spec,
                         self.clock.due_in(time.time()), replay, self._player.plan)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Future:
        """Run `coro` as a task of this session (cancelled when it closes)."""
        task = asyncio.ensure_future(coro)
        self._collectors.add(task)
        task.add_done_callback(self._collectors.discard)
        return task

    async def _submit(self, push: AudioPush, frames: range) -> None:
        try:
            result = await self._link.submit(push)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._engine_ok:  # once per outage, not once per frame
                log.warning("session %s: engine call failed (%s: %s); sending its audio again",
                            self.session_id, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self._engine_ok = False
            self._lost_push(push.epoch, frames)
            self._replay(push.epoch, frames)
            return
        if not self._engine_ok:
            log.info("session %s: engine answers again", self.session_id)
        self._engine_ok = True
        self._track(push.epoch, result, replayed=push.replay)

    def _replay(self, epoch: int, frames: range) -> None:
        """Send the audio of `frames` (and all released after it) again, while not due."""
        if epoch != self.epoch or not len(frames):
            return
        first = frames.start if self._replay_from is None else min(self._replay_from, frames.start)
        self._replay_from = first
        if self._replayer is None or self._replayer.done():
            self._replayer = self._spawn(self._replay_loop(epoch))

    async def _replay_loop(self, epoch: int) -> None:
        """One replay push at a time, backing off, until one is served or its frames are due.

        A replay covers everything released from the first lost frame on, so the stage that
        serves it ends where the next regular push starts; it starts a new segment there.
        """
        backoff = REPLAY_BACKOFF_S
        while self._replay_from is not None and not self._closed:
            await asyncio.sleep(backoff)
            if epoch != self.epoch:
                break
            first = max(self._replay_from, self._next_emit + 1)  # the next frame is as good as gone
            stop, final = self._released
            if first * SAMPLES_PER_FRAME >= stop or first >= self._claimed:
                break
            start = first * SAMPLES_PER_FRAME
            push = self._push(start, self._timeline.audio.read(start, stop), final, replay=True)
            self._replay_from = None
            try:
                result = await self._link.submit(push)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - still failing: again, later
                self._replay_from = first if self._replay_from is None else min(first, self._replay_from)
                backoff = min(2 * backoff, REPLAY_BACKOFF_MAX_S)
                continue
            log.info("session %s: frames %d.. sent again", self.session_id, first)
            self._track(push.epoch, result, replayed=True)
        self._replay_from = None

    def _lost_push(self, epoch: int, frames: range) -> None:
        """An engine call failed: the speech frames it would have completed are dropped
        (unavailable). Which were speech is unknown (the VAD ran in the failed stage): every
        frame of an utterance counts."""
        if epoch != self.epoch:
            return
        for k in frames:
            if not self._timeline.speaking(k) or k in self._ready:
                continue
            if k < self._next_emit:
                self._drops.count(DropReason.STAGE_UNAVAILABLE)
            else:
                self._expected.add(k)
                self._lost[k] = DropReason.STAGE_UNAVAILABLE

    def _completes_frame(self, start: int, stop: int) -> bool:
        return (stop - self._lookahead) // SAMPLES_PER_FRAME > (start - self._lookahead) // SAMPLES_PER_FRAME

    async def _sleep_or_wake(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.001, seconds))
        except asyncio.TimeoutError:
            pass

    def _track(self, epoch: int, result: RoundResult, replayed: bool = False) -> None:
        """A served push: its speech frames become expected; their images are collected."""
        if epoch != self.epoch or not any(result.speech):
            return
        speech_frames = [k for k, s in zip(result.frames, result.speech) if s]
        past = sum(k < self._next_emit for k in speech_frames)
        if past and not replayed:  # shown idle before they were known as speech (a replayed
            self._drops.count(DropReason.LATE, past)  # frame was expected, so counted then)
        self._expected.update(k for k in speech_frames if k >= self._next_emit)
        self._collect(speech_frames, result)

    def _collect(self, frames: list[int], result: RoundResult) -> None:
        """Paste the round's mouth patches (of the current epoch) into this session's avatar
        frames, for frames not yet shown; a frame a stage shed keeps its reason."""
        done = time.time()
        for k, patch in zip(frames, result.patches):
            latency = self._timings.result(k, done, self._timeline.utterance_at(k),
                                           served=not isinstance(patch, DropReason))
            if k < self._next_emit:
                continue  # already shown and counted
            if isinstance(patch, DropReason):
                self._lost[k] = patch
                continue
            try:
                image = patch.apply(self.avatar.frames[patch.avatar_frame])
            except Exception:  # noqa: BLE001 - a malformed patch loses its frame, not the session
                log.warning("session %s: frame %d lost", self.session_id, k, exc_info=True)
                self._lost[k] = DropReason.STAGE_ERROR
                continue
            self._ready[k] = (image, latency, patch.avatar_frame)
            self._timings.record_latency(latency)

    # -- output -----------------------------------------------------------------------
    async def frames(self) -> AsyncIterator[OutputFrame]:
        """Frames at their presentation times, idle when silent, until the session closes.

        A reader that starts late begins at the frame due now (no burst of stale frames).
        """
        self._skip_to(self.clock.frame_at(time.time()))
        while not self._closed:
            k = self._next_emit
            delay = self.clock.presentation_time(k) - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
                if self._closed:
                    return
            yield self._emit(k)

    def _skip_to(self, k: int) -> None:
        if k <= self._next_emit:
            return
        self._next_emit = k
        for stale in [f for f in self._ready if f < k]:
            del self._ready[stale]
        self._expected = {f for f in self._expected if f >= k}
        self._lost = {f: r for f, r in self._lost.items() if f >= k}

    def _emit(self, k: int) -> OutputFrame:
        self._next_emit = k + 1
        image, latency, source = self._ready.pop(k, (None, None, None))
        dropped = image is None and k in self._expected
        self._expected.discard(k)
        reason = self._lost.pop(k, DropReason.LATE)
        self._timings.shown(k)
        fade = None
        if image is None:
            image, source, fade = self._player.silent_image(k)
        if dropped:
            self._drops.count(reason)
        timeline = self._timeline
        meta = timeline.marks(k)
        if fade is not None:  # a switch between clips, cross-faded
            meta["fade"] = fade
        if self._late_ends:
            meta.setdefault("utterance_end", []).extend(self._late_ends)
            played = meta.setdefault("utterance_played", {})
            for uid in self._late_ends:  # their last frame was k - 1
                played[uid] = timeline.playback(uid, k - 1)
            self._late_ends = []
        frame = OutputFrame(
            session_id=self.session_id,
            epoch=timeline.epoch,
            frame_index=k,
            image=image,
            audio=timeline.frame_audio(k),
            pts=video_pts(k),
            presentation_time=self.clock.presentation_time(k),
            speech=timeline.speaking(k),
            dropped=dropped,
            latency_ms=latency,
            meta=meta,
            source_frame=source,
        )
        timeline.forget_before(k + 1)
        return frame

    def record_sent(self, frame: OutputFrame) -> None:
        """The consumer reports that `frame` went out (drives stats and events)."""
        self.frames_sent += 1

    def record_sender_drop(self, frame: OutputFrame) -> None:
        """The consumer could not send `frame`'s video in time (its sender lagged)."""
        self._drops.count(DropReason.SENDER_BACKPRESSURE)

    # -- state --------------------------------------------------------------------------
    def speaking(self) -> bool:
        return self._timeline.speaking(self._next_emit) or bool(self._timeline.unreleased)

    def latencies_ms(self) -> list[float]:
        return list(self._timings.latencies_ms)

    def playout_needs_ms(self, streamed: bool = False) -> list[float]:
        """Per speech frame of its utterances pushed whole (`streamed`: of its streamed ones),
        the D it needed in ms (what the playout policy reads)."""
        return list(self._timings.needs_ms[streamed])

    def stats(self) -> SessionStats:
        p50, p95, p99 = self._timings.latency_quantiles(0.5, 0.95, 0.99)
        return SessionStats(
            session_id=self.session_id,
            replica=self.replica,
            epoch=self.epoch,
            speaking=self.speaking(),
            state=self.state,
            frames_sent=self.frames_sent,
            frames_dropped=self.frames_dropped,
            drops=self._drops.by_reason(),
            latency_ms_p50=p50,
            latency_ms_p95=p95,
            latency_ms_p99=p99,
            queued_audio_s=self._timeline.queued_seconds(time.time()),
        )

