"""Streaming core without Ray: sample buffer, session timeline, feature stage, render queue.

Everything here runs on synthetic audio (tones, silence) or offline TTS and a fixed clock
(`now` is passed explicitly), so no assertion depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest
from speech import silence, speech

from ray_lipsync.backends.procedural import ProceduralFeaturizer
from ray_lipsync.clock import SAMPLES_PER_FRAME, SessionClock
from ray_lipsync.errors import Backpressure, UnknownSession
from ray_lipsync.streaming.buffer import SampleBuffer
from ray_lipsync.streaming.features import BATCH16_FRAMES, FeatureBatcher
from ray_lipsync.streaming.scheduler import BatchWorker, RenderQueue
from ray_lipsync.streaming.timeline import SessionTimeline
from ray_lipsync.streaming.drops import DropReason
from ray_lipsync.types import AudioPush, FrameJob, StageSpec

T0 = 1000.0
F = SAMPLES_PER_FRAME


def ramp(n: int, start: int = 0) -> np.ndarray:
    """Samples whose value is their own index (exact in float32 below 2**24)."""
    return np.arange(start, start + n, dtype=np.float32)


# -- SampleBuffer ------------------------------------------------------------------------


def test_buffer_reads_by_absolute_index_and_zero_fills():
    buf = SampleBuffer()
    buf.write(0, ramp(1000))
    buf.write(1500, ramp(100, 1500))  # gap [1000, 1500) reads as zeros
    assert buf.end == 1600
    np.testing.assert_array_equal(buf.read(990, 1010)[:10], ramp(10, 990))
    assert not buf.read(1000, 1500).any()
    np.testing.assert_array_equal(buf.read(1550, 1650)[:50], ramp(50, 1550))
    assert not buf.read(1600, 1700).any()  # past the end
    assert not buf.read(-50, 0).any()  # before the start


def test_buffer_grows_trims_and_keeps_indices():
    buf = SampleBuffer()
    for at in range(0, 100_000, 320):  # many appends: capacity grows
        buf.write(at, ramp(320, at))
    buf.trim_before(60_000)
    assert buf.start == 60_000
    assert not buf.read(59_000, 60_000).any()
    np.testing.assert_array_equal(buf.read(60_000, 61_000), ramp(1000, 60_000))
    buf.write(buf.end, ramp(500, buf.end))  # append after trimming
    np.testing.assert_array_equal(buf.read(99_800, 100_500), ramp(700, 99_800))
    buf.truncate(80_000)
    assert buf.end == 80_000 and not buf.read(80_000, 80_010).any()
    with pytest.raises(ValueError, match="before buffer start"):
        buf.write(10, ramp(5))
    buf.reset(200)
    assert (buf.start, buf.end) == (200, 200)


# -- SessionTimeline ---------------------------------------------------------------------


def make_timeline(max_queued_s: float = 30.0) -> SessionTimeline:
    return SessionTimeline(SessionClock(t0=T0, delay_s=0.24), max_queued_s)


def test_speech_lands_on_next_frame_boundary_and_frame_audio_is_exact():
    tl = make_timeline()
    audio = ramp(5000, 1)  # nonzero everywhere
    placed = tl.place(audio, now=T0 + 0.05, utterance_id="a", final=True)
    # 50 ms after t0: the arrival slot of frame 1 (40 ms) has begun, frame 2's has not
    assert placed.start == 2 * F and placed.utterance.start_frame == 2
    assert placed.utterance.end_frame == 2 + -(-5000 // F)
    assert not tl.frame_audio(1).any()
    joined = np.concatenate([tl.frame_audio(k) for k in range(2, placed.utterance.end_frame)])
    np.testing.assert_array_equal(joined[:5000], audio)
    assert not joined[5000:].any()  # the partial last frame is padded with silence
    assert tl.marks(2) == {"utterance_start": ["a"]}
    assert tl.marks(placed.utterance.end_frame - 1) == {
        "utterance_end": ["a"], "utterance_played": {"a": {"played_ms": 5000 // 16, "interrupted": False}}}
    assert tl.speaking(2) and not tl.speaking(1) and not tl.speaking(placed.utterance.end_frame)


def test_streamed_utterance_is_contiguous_and_next_one_starts_on_a_frame():
    tl = make_timeline()
    first = tl.place(ramp(300, 1), T0, "u", final=False)
    second = tl.place(ramp(300, 301), T0 + 0.001, "u", final=True)  # same utterance
    assert second.utterance is first.utterance and second.start == first.start + 300
    third = tl.place(ramp(100, 9), T0 + 0.002, None, final=True)  # queued behind speech
    assert third.start == F  # rounded up to the frame after sample 600
    np.testing.assert_array_equal(tl.frame_audio(0)[:600], ramp(600, 1))
    assert not tl.frame_audio(0)[600:].any()


def test_backpressure_bounds_queued_speech():
    tl = make_timeline(max_queued_s=1.0)
    tl.place(silence(0.6) + 0.1, T0, None, True)
    with pytest.raises(Backpressure, match="limit is 1 s"):
        tl.place(silence(0.6) + 0.1, T0, None, True)
    assert tl.queued_seconds(T0) == pytest.approx(0.6)
    # once the first piece has played out, the same push is accepted
    tl.place(silence(0.6) + 0.1, T0 + 0.6, None, True)
    assert tl.queued_seconds(T0 + 0.6) <= 1.0


def test_interrupt_cuts_from_next_presented_frame_and_bumps_epoch():
    tl = make_timeline()
    tl.place(ramp(40 * F, 1), T0, "long", final=True)  # frames 0..39
    tl.place(ramp(5 * F, 1), T0, "later", final=True)  # frames 40..44, not started
    now = T0 + 0.24 + 10 * 0.04 + 0.01  # frame 10 is on screen
    cut = tl.interrupt(now)
    assert cut == 11 and tl.epoch == 1
    assert tl.frame_audio(10).any() and not tl.frame_audio(11).any()
    assert "later" not in tl.utterances
    assert tl.utterances["long"].end_frame == 11
    assert all(p.start + len(p.samples) <= cut * F for p in tl.unreleased)


# -- FeatureBatcher / FeatureStage ----------------------------------------------------------


class CountingFeaturizer(ProceduralFeaturizer):  # stateful: featurizes silent frames too
    """The procedural featurizer, recording how many requests each call carried."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def featurize(self, requests):
        self.calls.append(len(requests))
        return super().featurize(requests)


def push(session_id: str, epoch: int, start: int, samples: np.ndarray, final: bool) -> AudioPush:
    """A push of a session opened by make_batcher (due now: deadlines play no part here)."""
    return AudioPush(session_id, epoch, start, samples, final, StageSpec("default", avatar_frames=5), 0.0)


def make_batcher(speech_detector, featurizer=None, sessions=("s",), schedule="streaming"):
    batcher = FeatureBatcher(featurizer or ProceduralFeaturizer(), speech_detector)
    for sid in sessions:
        batcher.open(sid, StageSpec("default", avatar_frames=5, schedule=schedule))
    return batcher


def test_frames_become_ready_after_their_lookahead(speech_detector):
    batcher = make_batcher(speech_detector)
    voice = speech()
    lookahead = batcher.lookahead_ms * 16

    async def run():
        got = await batcher.process(push("s", 0, 0, voice[: 10 * F + 100], final=False))
        assert [j.frame_index for j in got] == list(range((10 * F + 100 - lookahead) // F))
        rest = await batcher.process(push("s", 0, 10 * F + 100, voice[10 * F + 100 :], final=True))
        return got + rest

    jobs = asyncio.run(run())
    n = -(-len(voice) // F)
    assert [j.frame_index for j in jobs] == list(range(n))  # every frame once, in order
    assert all(j.avatar == "default" for j in jobs)
    assert all(j.avatar_frame == [0, 1, 2, 3, 4, 4, 3, 2, 1, 0][j.frame_index % 10] for j in jobs)  # MuseTalk order
    speaking = [j for j in jobs if j.speech]
    assert len(speaking) > n // 2
    assert all(j.features is not None for j in speaking)
    assert all(j.features is None for j in jobs if not j.speech)


def features_by_push_size(speech_detector, step: int) -> list[FrameJob]:
    """FrameJobs of one TTS phrase pushed `step` samples at a time."""
    voice = speech()

    async def run() -> list[FrameJob]:
        batcher, jobs = make_batcher(speech_detector), []
        for at in range(0, len(voice), step):
            piece = voice[at : at + step]
            jobs += await batcher.process(push("s", 0, at, piece, final=at + step >= len(voice)))
        return jobs

    return asyncio.run(run())


def assert_same_frames(a: list[FrameJob], b: list[FrameJob]) -> None:
    assert [j.frame_index for j in a] == [j.frame_index for j in b]
    assert [j.speech for j in a] == [j.speech for j in b]
    for ja, jb in zip(a, b):
        if ja.speech:
            np.testing.assert_allclose(ja.features, jb.features, atol=1e-4)


def test_features_do_not_depend_on_push_size(speech_detector):
    """20 ms chunks, whole frames or odd 1000-sample pieces: the same frames and features."""
    reference = features_by_push_size(speech_detector, 320)
    for step in (F, 1000):
        assert_same_frames(reference, features_by_push_size(speech_detector, step))


def test_features_with_multi_frame_pushes_match_chunked_pushes(speech_detector):
    assert_same_frames(features_by_push_size(speech_detector, 320), features_by_push_size(speech_detector, 3 * F))


def test_silence_is_not_speech_and_gaps_are_never_computed(speech_detector):
    batcher = make_batcher(speech_detector)
    voice = speech()
    n = -(-len(voice) // F)

    async def run():
        quiet = await batcher.process(push("s", 0, 0, silence(0.4), final=True))
        tone = await batcher.process(push("s", 0, 50 * F, voice, final=True))  # gap: frames 10..49
        return quiet, tone

    quiet, tone = asyncio.run(run())
    assert [j.frame_index for j in quiet] == list(range(10))
    assert not any(j.speech for j in quiet)
    assert [j.frame_index for j in tone] == list(range(50, 50 + n))
    assert sum(j.speech for j in tone) > n // 2


def test_one_featurizer_call_serves_many_sessions_without_cross_talk(speech_detector):
    voices = {"a": speech(), "b": speech("Streaming avatars need steady latency."), "c": silence(1.0)}
    counting = CountingFeaturizer()
    shared = make_batcher(speech_detector, counting, sessions=tuple(voices))

    async def run_shared():
        return await asyncio.gather(*(shared.process(push(s, 0, 0, v, final=True)) for s, v in voices.items()))

    results = dict(zip(voices, asyncio.run(run_shared())))
    assert counting.calls == [3]  # one call for all; the stateful featurizer sees silence too
    for sid, voice in voices.items():
        solo = make_batcher(speech_detector, sessions=(sid,))
        alone = asyncio.run(solo.process(push(sid, 0, 0, voice, final=True)))
        assert all(j.session_id == sid for j in results[sid])
        assert [j.speech for j in results[sid]] == [j.speech for j in alone]
        for js, ja in zip(results[sid], alone):
            if ja.speech:
                np.testing.assert_array_equal(js.features, ja.features)
    assert not any(j.speech for j in results["c"])


def test_interrupt_drops_old_epoch_audio(speech_detector):
    batcher = make_batcher(speech_detector)
    voice = speech()

    async def run():
        before = await batcher.process(push("s", 0, 0, voice[: 20 * F], final=False))
        await batcher.interrupt("s", 1, 12)
        stale = await batcher.process(push("s", 0, 20 * F, voice[20 * F : 30 * F], final=True))
        fresh = await batcher.process(push("s", 1, 12 * F, voice[: 10 * F], final=True))
        return before, stale, fresh

    before, stale, fresh = asyncio.run(run())
    assert all(j.epoch == 0 for j in before)
    assert stale == []  # pushed with the old epoch: ignored
    assert [j.frame_index for j in fresh] == list(range(12, 22))
    assert all(j.epoch == 1 for j in fresh)


def test_batch16_schedule_waits_for_sixteen_frames_and_right_context(speech_detector):
    batcher = make_batcher(speech_detector, schedule="batch16")
    voice = speech()

    async def run():
        early = await batcher.process(push("s", 0, 0, voice[: 16 * F + 3199], final=False))
        block = await batcher.process(push("s", 0, 16 * F + 3199, voice[16 * F + 3199 : 16 * F + 3200], final=False))
        return early, block

    early, block = asyncio.run(run())
    assert early == []  # 16 frames but 1 sample short of 200 ms right context
    assert [j.frame_index for j in block] == list(range(BATCH16_FRAMES))


def test_unknown_session_is_a_typed_error(speech_detector):
    batcher = make_batcher(speech_detector)
    with pytest.raises(UnknownSession, match="nope"):
        asyncio.run(batcher.interrupt("nope", 1, 0))


def test_a_replayed_push_computes_its_frames_again(speech_detector):
    """A push whose round failed is sent again (replay): the stage that already saw it
    computes its frames again, as a new segment, and the next push continues it."""
    batcher = make_batcher(speech_detector)
    voice = speech()

    async def run():
        first = await batcher.process(push("s", 0, 0, voice[: 20 * F], final=False))
        again = await batcher.process(replace(push("s", 0, 10 * F, voice[10 * F : 20 * F], final=False), replay=True))
        rest = await batcher.process(push("s", 0, 20 * F, voice[20 * F : 30 * F], final=True))
        return first, again, rest

    first, again, rest = asyncio.run(run())
    assert [j.frame_index for j in first] == list(range(19))  # frame 19 waits for its lookahead
    assert [j.frame_index for j in again] == list(range(10, 19))
    assert [j.frame_index for j in rest] == list(range(19, 30))


# -- RenderQueue / BatchWorker ------------------------------------------------------------


def job(session: str, k: int, epoch: int = 0) -> FrameJob:
    return FrameJob(session, epoch, k, "default", 0, True)


def test_queue_takes_oldest_deadline_first_and_drops_stale_and_late():
    async def run():
        queue = RenderQueue(max_batch=3)
        futures = queue.submit([job("a", 5), job("b", 1), job("a", 3, epoch=0), job("b", 2)], T0)
        late = queue.submit([job("c", 0)], T0 - 1.0)  # frame 0 of c was due a second ago
        fresh = queue.submit([job("a", 4, epoch=1)], T0)
        queue.set_epoch("a", 1)  # interrupt: a's epoch-0 jobs are stale
        first = queue.next_batch(now=T0)
        second = queue.next_batch(now=T0)
        return queue, futures, late, fresh, first, second

    queue, futures, late, fresh, first, second = asyncio.run(run())
    assert [(e.job.session_id, e.job.frame_index) for e in first] == [("b", 1), ("b", 2), ("a", 4)]
    assert second == []
    assert futures[0].result() is DropReason.STALE_EPOCH and futures[2].result() is DropReason.STALE_EPOCH
    assert late[0].result() is DropReason.SHED
    assert queue.stats.dropped_stale == 2 and queue.stats.dropped_late == 1
    assert not fresh[0].done()  # in a batch, waiting for its render


def test_worker_batches_across_sessions_up_to_max_batch():
    batches: list[list[tuple[str, int]]] = []

    def render(jobs: list[FrameJob]) -> list[np.ndarray]:
        batches.append([(j.session_id, j.frame_index) for j in jobs])
        return [np.full((2, 2, 3), j.frame_index, np.uint8) for j in jobs]

    async def run():
        worker = BatchWorker(RenderQueue(max_batch=4), render)
        origin = time.monotonic() + 1e6  # deadlines far in the future (the queue's own clock)
        jobs = {s: [FrameJob(s, 0, k, "default", 0, True) for k in range(3)] for s in "abc"}
        return await asyncio.gather(*(worker.run(js, origin) for js in jobs.values())), worker

    results, worker = asyncio.run(run())
    for images in results:
        assert [int(im[0, 0, 0]) for im in images] == [0, 1, 2]
    assert [len(b) for b in batches] == [4, 4, 1]
    assert {s for s, _ in batches[0]} == {"a", "b", "c"}  # one batch, many sessions
    assert worker.queue.stats.max_batch_seen == 4


def test_worker_failure_reaches_every_waiting_caller_as_a_drop_reason():
    def render(jobs):
        raise RuntimeError("renderer exploded")

    async def run():
        worker = BatchWorker(RenderQueue(max_batch=8), render)
        far = time.monotonic() + 1e6
        return await asyncio.gather(
            worker.run([FrameJob("a", 0, 0, "default", 0, True)], far),
            worker.run([FrameJob("b", 0, 0, "default", 0, True)], far),
        )

    outcomes = asyncio.run(run())
    assert outcomes == [[DropReason.STAGE_ERROR], [DropReason.STAGE_ERROR]]


def test_a_restarted_batcher_reopens_sessions_from_their_push(speech_detector):
    """A batcher that never saw a session (it restarted) rebuilds its stage from the push."""
    batcher = FeatureBatcher(ProceduralFeaturizer(), speech_detector)
    voice = speech()
    spec = StageSpec("default", avatar_frames=5)
    start = 40 * F  # the session was already 40 frames in when this batcher came up

    async def run():
        return await batcher.process_pushes([AudioPush("s", 2, start, voice, True, spec, 0.3)])

    [jobs] = asyncio.run(run())
    assert jobs and jobs[0].frame_index == 40 and all(j.epoch == 2 for j in jobs)
    assert batcher.stages["s"].spec == spec


def test_a_stage_that_missed_audio_does_not_finish_its_stale_frames(speech_detector):
    """A failover moves a session's pushes to another batcher and later back: the first one
    still holds frames that waited for lookahead. They were served by the other batcher, so
    the jump drops them (finished from stale audio they would come back as late frames)."""
    batcher = make_batcher(speech_detector)
    voice = np.concatenate([speech()] * 3)

    async def run():
        for k in range(40):  # frame by frame, the utterance goes on (not final)
            await batcher.process(push("s", 0, k * F, voice[k * F:(k + 1) * F], final=False))
        # frames 40..99 went to another batcher; this one gets the session back at frame 100
        return await batcher.process(push("s", 0, 100 * F, voice[100 * F:110 * F], final=True))

    jobs = asyncio.run(run())
    assert [j.frame_index for j in jobs] == list(range(100, 110))


def test_a_stateless_featurizer_is_not_asked_for_silent_frames(speech_detector):
    class Stateless(CountingFeaturizer):
        stateful = False  # like the MuseTalk featurizer: every window stands alone

    counting = Stateless()
    batcher = make_batcher(speech_detector, counting, sessions=("talk", "quiet"))

    async def run():
        return await asyncio.gather(
            batcher.process(push("talk", 0, 0, speech(), final=True)),
            batcher.process(push("quiet", 0, 0, silence(1.0), final=True)),
        )

    talk, quiet = asyncio.run(run())
    assert counting.calls == [1]
    assert all(j.features is None for j in quiet)
    assert any(j.features is not None for j in talk)
