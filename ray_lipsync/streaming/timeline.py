"""The session timeline: where pushed speech lands on the media clock, and interrupts.

Audio pushed at time `now` is placed at the next frame boundary whose arrival slot has not
started yet (so it is presented about D after it arrived), or right after queued speech.
Gaps between utterances are silence. An interrupt bumps the epoch and cuts everything from
the next frame to be presented.

Playback positions: each utterance keeps the sample spans its audio occupies, so the audio of
it inside frames [.., k] (`played_samples`) is exact even when a streamed utterance has gaps;
an interrupt records what it cut (`last_cut`).
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ray_lipsync.clock import FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME, SessionClock
from ray_lipsync.errors import Backpressure, MalformedAudio
from ray_lipsync.streaming.buffer import SampleBuffer


@dataclass
class Utterance:
    """A piece of speech on the timeline: frames [start_frame, end_frame)."""

    utterance_id: str
    start_frame: int
    end_frame: int
    start_sample: int
    end_sample: int
    delay_s: float | None = None  # its playout delay D (None: the clock's)
    placed_at: float | None = None  # wall time of its first push
    streamed: bool = False  # its first push was not final: it comes in pieces (a stream, a microphone)
    spans: list[list[int]] = field(default_factory=list)  # [start, stop) of its audio
    interrupted: bool = False

    @property
    def duration_ms(self) -> int:
        return (self.end_sample - self.start_sample) * 1000 // SAMPLE_RATE

    def add_span(self, start: int, stop: int) -> None:
        if self.spans and self.spans[-1][1] == start:
            self.spans[-1][1] = stop
        else:
            self.spans.append([start, stop])

    def played_samples(self, before: int) -> int:
        """Samples of this utterance's audio at timeline positions < `before`."""
        return sum(max(0, min(stop, before) - start) for start, stop in self.spans)

    def cut(self, at: int) -> None:
        """Forget its audio from sample `at` on (an interrupt)."""
        self.spans = [[start, min(stop, at)] for start, stop in self.spans if start < at]
        self.interrupted = True


@dataclass
class Cut:
    """What one interrupt cut: `playing` = (utterance id, samples kept) of utterances it
    shortened (they still end on the timeline), `dropped` = ids of those that never started."""

    cut_frame: int
    playing: list[tuple[str, int]]
    dropped: list[str]


@dataclass
class Placement:
    """Where one push landed: samples [start, start + len) of the timeline."""

    utterance: Utterance
    start: int
    samples: np.ndarray
    arrived: float
    final: bool


@dataclass
class SessionTimeline:
    """Audio of one session on its media clock, with utterance marks and the epoch."""

    clock: SessionClock
    max_queued_s: float
    epoch: int = 0
    audio: SampleBuffer = field(default_factory=SampleBuffer)
    utterances: dict[str, Utterance] = field(default_factory=dict)
    unreleased: deque[Placement] = field(default_factory=deque)  # not yet sent to the engine
    last_cut: Cut | None = None
    _open_utterance: str | None = None

    @property
    def open_utterance(self) -> str | None:
        """The streamed utterance still expecting pieces (its end is not marked yet)."""
        return self._open_utterance

    @property
    def write_end(self) -> int:
        return self.audio.end

    def boundary_sample(self, now: float) -> int:
        """First frame boundary whose arrival slot (t0 + k * 40 ms) is not in the past."""
        frame = math.ceil((now - self.clock.t0) * 1000 / FRAME_MS - 1e-9)
        return max(0, frame) * SAMPLES_PER_FRAME

    def queued_seconds(self, now: float) -> float:
        """Speech placed but not yet due at the arrival side of the clock."""
        return max(0, self.write_end - self.boundary_sample(now)) / SAMPLE_RATE

    def landing_sample(self, now: float, delay_s: float) -> int:
        """First frame boundary presented at least `delay_s` after `now` (see playout.py)."""
        return self.boundary_sample(now - (self.clock.delay_s - delay_s))

    def place(
        self, samples: np.ndarray, now: float, utterance_id: str | None, final: bool,
        delay_s: float | None = None,
    ) -> Placement:
        """Put `samples` on the timeline. Same utterance id: continue it (contiguous).

        A new utterance lands `delay_s` (default: the clock's D) after `now`, or right after
        queued speech; a continued one keeps the D it started with.
        """
        if not np.all(np.isfinite(samples)):  # would fail the shared feature step of all sessions
            raise MalformedAudio("pushed audio contains NaN or inf samples; send finite float32 PCM")
        queued = self.queued_seconds(now) + len(samples) / SAMPLE_RATE
        if queued > self.max_queued_s:
            raise Backpressure(
                f"session has {self.queued_seconds(now):.1f} s of speech queued; "
                f"the limit is {self.max_queued_s:.0f} s - wait or interrupt first",
                retry_after_s=queued - self.max_queued_s,
            )
        continuing = utterance_id is not None and utterance_id == self._open_utterance
        if continuing:
            delay_s = self.utterances[utterance_id].delay_s  # type: ignore[index]
        delay = self.clock.delay_s if delay_s is None else delay_s
        start = max(self.write_end, self.landing_sample(now, delay))
        if continuing and self.write_end >= self.landing_sample(now - delay / 2, delay):
            start = self.write_end  # a streamed utterance stays contiguous (jitter < D/2)
        if continuing:
            utt = self.utterances[utterance_id]  # type: ignore[index]
        else:
            uid = utterance_id or uuid.uuid4().hex[:12]
            start = self._align(start)
            utt = Utterance(uid, start // SAMPLES_PER_FRAME, start // SAMPLES_PER_FRAME, start, start,
                            delay_s, now, streamed=not final)
            self.utterances[uid] = utt
        self.audio.write(start, samples.astype(np.float32, copy=False))
        utt.add_span(start, start + len(samples))
        utt.end_sample = start + len(samples)
        utt.end_frame = -(-utt.end_sample // SAMPLES_PER_FRAME)
        self._open_utterance = None if final else utt.utterance_id
        placement = Placement(utt, start, samples, now, final)
        self.unreleased.append(placement)
        return placement

    def releasable(self, horizon: int) -> tuple[int, bool]:
        """End of the contiguous unreleased audio before sample `horizon`, and whether nothing
        follows it (a gap, or the end of a final push). Call only with audio unreleased."""
        end = self.unreleased[0].start
        for p in self.unreleased:
            if p.start != end:
                return end, True  # a gap follows: the engine finishes the frames before it
            if p.start + len(p.samples) > horizon:
                return max(end, horizon), False
            end = p.start + len(p.samples)
            final = p.final
        return end, final

    def take(self, stop: int) -> tuple[np.ndarray, float]:
        """Release the unreleased audio up to sample `stop`: its samples, and when the last of
        the pushes they came in arrived."""
        pieces, arrived, queue = [], 0.0, self.unreleased
        while queue and queue[0].start < stop:
            p = queue[0]
            take = min(len(p.samples), stop - p.start)
            pieces.append(p.samples[:take])
            arrived = max(arrived, p.arrived)
            if take == len(p.samples):
                queue.popleft()
            else:
                p.start, p.samples = p.start + take, p.samples[take:]
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0], arrived

    @staticmethod
    def _align(sample: int) -> int:
        return -(-sample // SAMPLES_PER_FRAME) * SAMPLES_PER_FRAME

    def interrupt(self, now: float) -> int:
        """Bump the epoch; silence everything from the next frame to be presented on.

        Returns the first frame of the cut. Utterances that were cut end there; those that
        had not started are forgotten. `last_cut` says which were cut and how much of each
        stays (the open streamed utterance counts as cut even if all its audio was before).
        """
        self.epoch += 1
        cut_frame = max(0, self.clock.frame_at(now) + 1)
        cut = cut_frame * SAMPLES_PER_FRAME
        self.audio.truncate(cut)
        kept: deque[Placement] = deque()
        for p in self.unreleased:
            if p.start < cut:
                p.samples = p.samples[: cut - p.start]
                p.final = True
                kept.append(p)
        self.unreleased = kept
        playing: list[tuple[str, int]] = []
        dropped: list[str] = []
        for uid, utt in list(self.utterances.items()):
            if utt.start_frame >= cut_frame:
                del self.utterances[uid]
                dropped.append(uid)
            elif utt.end_frame > cut_frame or uid == self._open_utterance:
                utt.cut(cut)
                utt.end_frame, utt.end_sample = min(utt.end_frame, cut_frame), min(utt.end_sample, cut)
                playing.append((uid, utt.played_samples(cut)))
        self._open_utterance = None
        self.last_cut = Cut(cut_frame, playing, dropped)
        return cut_frame

    def frame_audio(self, frame_index: int) -> np.ndarray:
        """The 640 samples (chunks 2k, 2k+1) presented with frame k; zeros in silence."""
        start = frame_index * SAMPLES_PER_FRAME
        return self.audio.read(start, start + SAMPLES_PER_FRAME)

    def marks(self, frame_index: int) -> dict:
        """Utterances that start or end (last frame) at frame k; an open streamed utterance
        has no end yet. Ends carry their playback (`utterance_played`, see `playback`)."""
        starts = [u.utterance_id for u in self.utterances.values() if u.start_frame == frame_index]
        ends = [u.utterance_id for u in self.utterances.values()
                if u.end_frame - 1 == frame_index and u.utterance_id != self._open_utterance]
        meta: dict = {}
        if starts:
            meta["utterance_start"] = starts
        if ends:
            meta["utterance_end"] = ends
            meta["utterance_played"] = {uid: self.playback(uid, frame_index) for uid in ends}
        return meta

    def utterance_at(self, frame_index: int) -> Utterance | None:
        """The utterance that frame k belongs to, if any."""
        return next((u for u in self.utterances.values() if u.start_frame <= frame_index < u.end_frame), None)
    def playback(self, utterance_id: str, last_frame: int) -> dict:
        """{played_ms, interrupted} of an utterance whose frames up to `last_frame` are out:
        its audio inside them, exact to the sample (so to the 20 ms chunk)."""
        utt = self.utterances.get(utterance_id)
        if utt is None:  # forgotten already (cut before it started)
            return {"played_ms": 0, "interrupted": True}
        played = utt.played_samples((last_frame + 1) * SAMPLES_PER_FRAME)
        return {"played_ms": played * 1000 // SAMPLE_RATE, "interrupted": utt.interrupted}

    def speaking(self, frame_index: int) -> bool:
        return any(u.start_frame <= frame_index < u.end_frame for u in self.utterances.values())

    def forget_before(self, frame_index: int) -> None:
        """Drop audio and finished utterances that lie wholly before frame k."""
        self.audio.trim_before(frame_index * SAMPLES_PER_FRAME)
        for uid, utt in list(self.utterances.items()):
            if utt.end_frame <= frame_index and uid != self._open_utterance:
                del self.utterances[uid]
