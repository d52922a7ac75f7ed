"""The feature stage: session audio -> voice activity -> per-frame features, batched.

`FeatureStage` follows one session: it keeps the audio the backend still needs, runs the
streaming VAD per 20 ms chunk and decides which frames are ready. `FeatureBatcher` serves
many sessions and runs the featurizer once per step over every session's ready frames.
Nothing here collects a fixed batch: a step takes whatever is ready.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from ray_lipsync.backends.base import Featurizer
from ray_lipsync.clock import (
    CHUNK_SAMPLES,
    CHUNKS_PER_FRAME,
    SAMPLES_PER_FRAME,
    frames_ready,
    ms_to_samples,
)
from ray_lipsync.errors import UnknownSession
from ray_lipsync.streaming.buffer import SampleBuffer
from ray_lipsync.streaming.sources import SourcePlan
from ray_lipsync.types import AudioPush, FeatureRequest, FrameJob, StageSpec

log = logging.getLogger(__name__)

Schedule = Literal["streaming", "batch16"]
BATCH16_FRAMES = 16  # the reference design: 16 frames = 32 chunks of 20 ms ...
BATCH16_RIGHT_MS = 200  # ... plus 200 ms of right context before any inference


def _ceil_frame(sample: int) -> int:
    return -(-sample // SAMPLES_PER_FRAME)


@dataclass
class ReadyFrames:
    """Frames of one session that became ready, their speech flags and feature request."""

    stage: "FeatureStage"
    frames: range
    speech: np.ndarray
    request: FeatureRequest | None


class FeatureStage:
    """Audio, VAD and readiness for one session.

    Audio arrives in contiguous segments; a forward jump of the timeline (silence between
    utterances) ends the segment and the frames inside the gap are never computed (the
    session shows them idle). The session finishes an utterance before a gap (`final`: its
    last frames need no lookahead). A jump over a segment that was not finished means this
    stage missed the audio between (a failover served it elsewhere: those frames were that
    stage's, and finished here from stale audio they would reach the session long after they
    were shown and count as late), or a streamed utterance's next chunk came so late that
    timeline.py placed it after a gap (its queued audio ran out within half the playout
    delay). Either way the frames the segment still waited for are not computed here; in the
    second case those are the last one or two frames before the gap, which show idle.
    """

    def __init__(
        self,
        session_id: str,
        spec: StageSpec,
        featurizer: Featurizer,
        vad: Any,
        lookahead_ms: int,
    ) -> None:
        self.session_id = session_id
        self.spec = spec
        self.sources = SourcePlan.cycle(spec.avatar_frames)  # the session's, from its latest push
        self.epoch = 0
        self.schedule: Schedule = "batch16" if spec.schedule == "batch16" else "streaming"
        self._vad_model = vad
        self._vad = vad.stream()
        self._state = featurizer.new_state()
        self._stateful = featurizer.stateful
        self._lookahead = ms_to_samples(lookahead_ms)
        self._context = ms_to_samples(featurizer.context_ms)
        self._audio = SampleBuffer()
        self._vad_end = 0  # next sample the VAD has not seen (chunk aligned)
        self._flags: dict[int, bool] = {}  # chunk index -> speech
        self.next_frame = 0
        self._final = False  # no audio follows the current end: lookahead is silence

    def push(self, start: int, samples: np.ndarray, final: bool, replay: bool = False) -> list[ReadyFrames]:
        """Audio for timeline samples [start, start + len); returns what became ready.

        `replay`: the session sends again audio whose frames were lost on the way (a failed
        round): the frames from `start` on are computed again, as a new segment.
        """
        ready = []
        if replay and start < max(self._audio.end, self.next_frame * SAMPLES_PER_FRAME):
            self._restart(start - start % SAMPLES_PER_FRAME, keep_tail=False, rewind=True)
        elif start < self._audio.end:  # a stale push (e.g. replayed by a restarted stage): skip what is known
            known = self._audio.end - start
            log.debug("%s: push at %d overlaps %d; %d samples skipped", self.session_id, start,
                      self._audio.end, min(known, len(samples)))
            if known >= len(samples):
                return []
            start, samples = self._audio.end, samples[known:]
        if start > _ceil_frame(self._audio.end) * SAMPLES_PER_FRAME:
            if self._final:  # an utterance ended: what is left of it needs no lookahead
                ready.append(self._take_ready())
            # else this stage missed the audio between (another stage served it while this
            # one was down or unused): its unfinished frames were that stage's to finish
            self._restart(start - start % SAMPLES_PER_FRAME)
        self._audio.write(start, samples)
        self._final = final
        ready.append(self._take_ready())
        self._forget_old()
        return [r for r in ready if len(r.frames)]

    def interrupt(self, epoch: int, cut_frame: int) -> None:
        """Forget audio from `cut_frame` on; later pushes carry `epoch` and may start at the cut.

        The stage usually holds audio well past the cut (it runs ahead of presentation by the
        playout delay), so the new segment starts at the cut itself, not at the buffer's end.
        """
        self.epoch = epoch
        self.next_frame = min(self.next_frame, cut_frame)
        self._restart(cut_frame * SAMPLES_PER_FRAME, keep_tail=False)

    def _restart(self, start: int, keep_tail: bool = True, rewind: bool = False) -> None:
        """Begin a new segment at frame-aligned sample `start` (fresh VAD state); `rewind`:
        its frames are computed even if frames after `start` were already."""
        tail = self._audio.read(start, self._audio.end) if keep_tail else np.zeros(0, np.float32)
        self._audio.reset(start)
        self._audio.write(start, tail)
        self._vad = self._vad_model.stream()
        self._vad_end = start
        self._flags.clear()
        first = start // SAMPLES_PER_FRAME
        self.next_frame = first if rewind else max(self.next_frame, first)
        self._final = False

    def _ready_until(self) -> int:
        """Frames before this index can be computed now."""
        end = self._audio.end
        if self._final:
            return _ceil_frame(end)
        if self.schedule == "batch16":
            block = BATCH16_FRAMES * SAMPLES_PER_FRAME
            whole = max(0, end - ms_to_samples(BATCH16_RIGHT_MS)) // block
            return whole * BATCH16_FRAMES
        return frames_ready(end, self._lookahead)

    def _run_vad(self, stop: int) -> None:
        """Speech flags for every chunk before `stop` the VAD has not seen."""
        if stop <= self._vad_end:
            return
        flags = self._vad.push(self._audio.read(self._vad_end, stop))
        first = self._vad_end // CHUNK_SAMPLES
        for i, flag in enumerate(flags):
            self._flags[first + i] = bool(flag)
        self._vad_end += len(flags) * CHUNK_SAMPLES

    def _take_ready(self) -> ReadyFrames:
        until = max(self.next_frame, self._ready_until())
        frames = range(self.next_frame, until)
        self._run_vad(until * SAMPLES_PER_FRAME)
        speech = np.array(
            [
                any(self._flags.get(k * CHUNKS_PER_FRAME + c, False) for c in range(CHUNKS_PER_FRAME))
                for k in frames
            ],
            dtype=bool,
        )
        request = None
        if len(frames) and (self._stateful or speech.any()):
            lo = max(0, frames.start * SAMPLES_PER_FRAME - self._context)
            hi = frames.stop * SAMPLES_PER_FRAME + self._lookahead
            request = FeatureRequest(self._state, self._audio.read(lo, hi), lo, frames)
        self.next_frame = until
        return ReadyFrames(self, frames, speech, request)

    def _forget_old(self) -> None:
        """Drop audio and flags the next frames can no longer need."""
        keep = min(self.next_frame * SAMPLES_PER_FRAME - self._context, self._vad_end)
        self._audio.trim_before(keep)
        first_chunk = self.next_frame * CHUNKS_PER_FRAME
        for c in [c for c in self._flags if c < first_chunk]:
            del self._flags[c]

    def jobs(self, ready: ReadyFrames, features: np.ndarray | None) -> list[FrameJob]:
        """FrameJobs for the ready frames (features only on speech frames)."""
        return [
            FrameJob(
                session_id=self.session_id,
                epoch=self.epoch,
                frame_index=k,
                avatar=self.spec.avatar,
                avatar_frame=self.sources.source(k),
                speech=bool(ready.speech[i]),
                features=features[i] if features is not None and ready.speech[i] else None,
            )
            for i, k in enumerate(ready.frames)
        ]


@dataclass
class _Op:
    """A queued operation on one session: push audio, interrupt (at frame `cut`), or close."""

    kind: Literal["push", "interrupt", "close"]
    session_id: str
    epoch: int = 0
    push: AudioPush | None = None
    cut: int = 0
    future: asyncio.Future | None = None


class FeatureBatcher:
    """Feature stages of many sessions; one featurizer call per step across all of them.

    Every operation goes through one queue, applied in arrival order by a single worker, so
    stages are never touched by two threads. `process` returns the FrameJobs that became ready
    with that push (possibly none); pushes arriving while a step runs share the next step.
    """

    def __init__(self, featurizer: Featurizer, vad: Any, lookahead_ms: int | None = None) -> None:
        self.featurizer = featurizer
        self.vad = vad
        self.lookahead_ms = featurizer.lookahead_ms if lookahead_ms is None else lookahead_ms
        self.stages: dict[str, FeatureStage] = {}
        self._pending: list[_Op] = []
        self._runner: asyncio.Task | None = None
        self.steps = 0
        self.frames = 0

    def open(self, session_id: str, spec: StageSpec) -> None:
        self.stages[session_id] = FeatureStage(session_id, spec, self.featurizer, self.vad, self.lookahead_ms)

    async def process_pushes(self, pushes: Sequence[AudioPush]) -> list[list[FrameJob]]:
        """Several sessions' pushes, served by one featurizer step."""
        return list(await asyncio.gather(*(self.process(p) for p in pushes)))

    async def close(self, session_id: str) -> None:
        await self._submit(_Op("close", session_id))

    async def interrupt(self, session_id: str, epoch: int, cut_frame: int) -> None:
        self._stage(session_id)
        await self._submit(_Op("interrupt", session_id, epoch, cut=cut_frame))

    async def process(self, push: AudioPush) -> list[FrameJob]:
        """The frames `push` made ready. A session this batcher does not know (it was
        restarted, or the session moved here) is opened from the push's spec: its audio
        context and VAD state start afresh at the push."""
        if push.session_id not in self.stages:
            self.open(push.session_id, push.spec)
            self.stages[push.session_id].epoch = push.epoch
        return await self._submit(_Op("push", push.session_id, push.epoch, push))

    def _stage(self, session_id: str) -> FeatureStage:
        try:
            return self.stages[session_id]
        except KeyError:
            raise UnknownSession(f"feature stage has no session {session_id!r}") from None

    async def _submit(self, op: _Op):
        op.future = asyncio.get_running_loop().create_future()
        self._pending.append(op)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await op.future

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await asyncio.to_thread(self.step, batch)
            except Exception as exc:  # every caller learns of the failure
                log.exception("feature step failed")
                results = [exc] * len(batch)
            for op, result in zip(batch, results):
                if op.future is not None and not op.future.done():
                    if isinstance(result, Exception):
                        op.future.set_exception(result)
                    else:
                        op.future.set_result(result)

    def step(self, batch: Sequence[_Op]) -> list[list[FrameJob]]:
        """Apply operations in order, then featurize every ready frame in one call."""
        ready: list[tuple[int, ReadyFrames]] = []
        results: list[list[FrameJob] | Exception] = [[] for _ in batch]
        for i, op in enumerate(batch):
            stage = self.stages.get(op.session_id)
            if stage is None:
                continue
            try:
                if op.kind == "close":
                    del self.stages[op.session_id]
                elif op.kind == "interrupt":
                    stage.interrupt(op.epoch, op.cut)
                    ready = [(j, r) for j, r in ready if r.stage is not stage]  # old epoch: dropped
                elif op.epoch >= stage.epoch and op.push is not None:
                    push = op.push
                    if push.sources is not None:  # later plans agree on every frame already pushed
                        stage.sources = push.sources
                    ready.extend((i, r) for r in stage.push(push.start, push.samples, push.final, push.replay))
            except Exception as exc:  # one session's bad operation fails that operation only
                log.exception("feature stage of %s failed", op.session_id)
                results[i] = exc
        requests = [r.request for _, r in ready if r.request is not None]
        features = iter(self.featurizer.featurize(requests) if requests else [])
        for i, r in ready:
            jobs = r.stage.jobs(r, next(features) if r.request is not None else None)
            if isinstance(results[i], list):
                results[i].extend(jobs)  # type: ignore[union-attr]
            self.frames += len(r.frames)
        self.steps += 1
        return results
