"""Adaptive playout delay: the policy, where utterances land, and sessions whose D changes.

The session-level test runs a LocalPipeline in real time (procedural backend): D may only
change between utterances, every utterance's audio is exact and contiguous, and every frame
keeps the one clock mapping (frame k at t0 + D_clock + 40k).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from pydantic import ValidationError
from helpers import (
    F,
    Receiver,
    assert_audio_is,
    assert_clock,
    push_in_real_time,
    tuned,
)
from speech import speech

from ray_lipsync.clock import SessionClock
from ray_lipsync.config import PipelineConfig
from ray_lipsync.streaming.local import LocalPipeline
from ray_lipsync.streaming.playout import PlayoutPolicy, new_clock
from ray_lipsync.streaming.timeline import SessionTimeline


def policy(**fields: object) -> PlayoutPolicy:
    base = {"playout_delay_ms": 300, "playout_min_ms": 100, "playout_margin_ms": 40,
            "playout_window": 10, "playout_initial_ms": 250}
    return PlayoutPolicy.from_config(PipelineConfig(**{**base, **fields}))


# -- the policy ---------------------------------------------------------------------------


def test_fixed_playout_is_always_the_configured_delay():
    fixed = policy(playout_adaptive=False)
    assert fixed.delay_s([500.0] * 20) == 0.3
    assert fixed.delay_s([]) == 0.3
    clock = new_clock(fixed, now=1000.0)
    assert (clock.t0, clock.delay_s) == (1000.0, 0.3)


def test_adaptive_delay_is_p99_plus_margin_within_bounds():
    p = policy()
    assert p.delay_s([]) == 0.25  # nothing measured yet
    assert p.delay_s([80.0] * 9 + [110.0]) == pytest.approx(0.15)
    assert p.delay_s([10.0] * 10) == 0.1  # lower bound
    assert p.delay_s([900.0] * 10) == 0.3  # upper bound
    # only the last `window` frames count: an old spike is forgotten
    assert p.delay_s([900.0] + [70.0] * 10) == pytest.approx(0.11)


def test_adaptive_clock_shows_frame_0_at_the_lower_bound():
    clock = new_clock(policy(), now=1000.0)
    assert clock.delay_s == 0.3
    assert clock.presentation_time(0) == pytest.approx(1000.1)


def test_lower_bound_above_upper_bound_is_refused():
    with pytest.raises(ValidationError, match="playout_min_ms"):
        PipelineConfig(playout_delay_ms=100, playout_min_ms=200)


# -- the timeline -------------------------------------------------------------------------


def test_new_utterances_land_d_after_arrival_and_streams_keep_their_d():
    clock = SessionClock(t0=1000.0, delay_s=0.3)
    timeline = SessionTimeline(clock, max_queued_s=30)
    voice = np.full(10 * F, 0.1, np.float32)
    first = timeline.place(voice, 1001.0, "a", True, delay_s=0.12).utterance
    assert clock.presentation_time(first.start_frame) >= 1001.12
    assert clock.presentation_time(first.start_frame) < 1001.12 + 0.04  # the next frame boundary
    # pushed while the first is queued: starts right after it, whatever its own D
    second = timeline.place(voice, 1001.05, "b", True, delay_s=0.12).utterance
    assert second.start_sample == first.end_sample
    # a streamed utterance keeps the D it started with, pieces stay contiguous
    t = 1003.0
    streamed = timeline.place(voice[:320], t, "c", False, delay_s=0.2).utterance
    assert clock.presentation_time(streamed.start_frame) >= t + 0.2
    for i in range(1, 5):
        timeline.place(voice[:320], t + 0.02 * i, "c", i == 4, delay_s=0.12)
    assert streamed.end_sample == streamed.start_sample + 5 * 320
    assert streamed.delay_s == 0.2


# -- sessions -----------------------------------------------------------------------------


async def two_utterances(pipeline: LocalPipeline, voice: np.ndarray, reply: np.ndarray):
    """One session speaks `voice`, then (after a pause) `reply`; both whole pushes."""
    session = await pipeline.create_session()
    rx = Receiver(session)
    pushed_a = time.time()
    a = await session.push_audio(voice, "a")
    await rx.until_frame(a.end_frame + 10)
    pushed_b = time.time()
    b = await session.push_audio(reply, "b")
    await rx.until_frame(b.end_frame + 3)
    received = await rx.stop()
    await pipeline.shutdown()
    return session, (a, pushed_a), (b, pushed_b), received


def test_d_changes_between_utterances_and_speech_stays_exact(lipsync_settings):
    settings = tuned(lipsync_settings, playout_delay_ms=600, playout_min_ms=80,
                     playout_initial_ms=600, playout_margin_ms=40)
    voice, reply = speech("Hello there, how are you today?"), speech("Fine.")
    session, (a, at_a), (b, at_b), received = asyncio.run(
        two_utterances(LocalPipeline(settings), voice, reply))
    assert_clock(received, session)  # one mapping frame -> time for the whole session
    clock = session.clock
    d_a = clock.presentation_time(a.start_frame) - at_a
    d_b = clock.presentation_time(b.start_frame) - at_b
    assert a.delay_s == 0.6 and 0.6 <= d_a < 0.6 + 0.04 + 0.02
    needs = session.playout_needs_ms()
    # measured for every speech frame; whether any needed more than its own 40 ms slot depends
    # on the machine's speed (a run where every frame was ready ~0-35 ms early read all < 0)
    assert len(needs) >= a.end_frame - a.start_frame
    assert 0.08 <= b.delay_s <= max(0.08, max(needs) / 1000 + 0.04 + 1e-9)  # p99 + margin
    assert b.delay_s < 0.6, "the second utterance gets the measured, shorter D"
    assert b.delay_s <= d_b < b.delay_s + 0.04 + 0.02
    # speech exact and contiguous: a's samples from its first frame, then silence, then b's
    out = np.concatenate([r.frame.audio for r in received if a.start_frame <= r.frame.frame_index < b.start_frame])
    np.testing.assert_array_equal(out[: len(voice)], voice)
    assert not out[len(voice):].any()
    assert_audio_is([r for r in received if r.frame.frame_index >= b.start_frame], b.start_frame, reply)
    assert session.frames_dropped == 0


async def two_streamed_utterances(pipeline: LocalPipeline, voice: np.ndarray, reply: np.ndarray):
    """Like a microphone: both utterances arrive in 20 ms pieces in real time."""
    session = await pipeline.create_session()
    rx = Receiver(session)
    a = await push_in_real_time(session, voice, "a")
    await rx.until_frame(a.end_frame + 5)
    b = await push_in_real_time(session, reply, "b")
    await rx.until_frame(b.end_frame + 3)
    received = await rx.stop()
    await pipeline.shutdown()
    return session, a, b, received


def test_streamed_speech_gets_the_d_it_needs(lipsync_settings):
    settings = tuned(lipsync_settings, playout_delay_ms=600, playout_min_ms=40,
                     playout_initial_ms=400, playout_margin_ms=40)
    voice, reply = speech("Hello there."), speech("Streaming avatars need steady latency.")
    session, _, b, received = asyncio.run(two_streamed_utterances(LocalPipeline(settings), voice, reply))
    assert_clock(received, session)
    # a real-time frame waits for its own 40 ms of audio (and the lookahead) before it can start
    assert b.delay_s >= 0.04 + 0.04
    assert b.delay_s < 0.4
    assert_audio_is([r for r in received if r.frame.frame_index >= b.start_frame], b.start_frame, reply)
    late = [r for r in received if b.start_frame <= r.frame.frame_index < b.end_frame and r.frame.dropped]
    assert not late, f"{len(late)} frames of the streamed reply missed their time with D={b.delay_s:.3f}"


NONE = {False: [], True: []}  # a session's needs before it measured any


def test_a_new_session_starts_from_what_other_sessions_needed():
    p = policy()
    assert p.seeded([]) == p and p.delay_for(NONE, streamed=False) == 0.25  # playout_initial_ms
    assert p.seeded([80.0] * 10).delay_for(NONE, streamed=False) == pytest.approx(0.12)
    fixed = policy(playout_adaptive=False)
    assert fixed.seeded([80.0] * 10).delay_for(NONE, streamed=False) == 0.3


def test_an_utterance_reads_the_needs_of_its_kind():
    """Pushed whole and streamed utterances need different D (a streamed frame also waits for
    its own audio): each reads its kind's needs, its session's own first, then the other
    sessions'; with none of its kind anywhere, the other kind's; else playout_initial_ms."""
    p = policy().seeded([80.0] * 10, [190.0] * 10)  # other sessions: whole 80 ms, streamed 190 ms
    assert p.delay_for(NONE, streamed=False) == pytest.approx(0.12)
    assert p.delay_for(NONE, streamed=True) == pytest.approx(0.23)
    own = {False: [70.0] * 10, True: []}  # this session pushed whole speech so far
    assert p.delay_for(own, streamed=False) == pytest.approx(0.11)
    assert p.delay_for(own, streamed=True) == pytest.approx(0.23)  # the others' streams, not its own whole
    only_streams = policy().seeded([], [190.0] * 10)
    assert only_streams.delay_for(NONE, streamed=False) == pytest.approx(0.23)  # nothing whole measured
    assert only_streams.delay_for(own, streamed=False) == pytest.approx(0.11)


async def spoken(pipeline: LocalPipeline, voice: np.ndarray, utterance_id: str):
    """A new session says `voice` (pushed whole) until its end is out: (it, its needs)."""
    session = await pipeline.create_session()
    rx = Receiver(session)
    utt = await session.push_audio(voice, utterance_id)
    await rx.until_frame(utt.end_frame + 2)
    await rx.stop()
    return session, session.playout_needs_ms()


def first_utterances(settings, close_first: bool):
    """A first session speaks once; a second one (after the first closed, or beside it) is
    created and pushes its first utterance: (that push, the first session's needs)."""

    async def main():
        pipeline = LocalPipeline(settings)
        first, needs = await spoken(pipeline, speech("Fine."), "a")
        if close_first:
            await pipeline.close_session(first.session_id)
        second = await pipeline.create_session()
        pushed = await second.push_audio(speech("Fine."), "b")
        await pipeline.shutdown()
        return pushed, needs

    return asyncio.run(main())


def test_second_session_first_utterance_uses_the_first_sessions_needs(lipsync_settings):
    settings = tuned(lipsync_settings, playout_delay_ms=600, playout_min_ms=80, playout_initial_ms=600)
    pushed, needs = first_utterances(settings, close_first=False)
    assert needs
    assert pushed.delay_s < 0.6
    assert pushed.delay_s == pytest.approx(max(0.08, min(0.6, sorted(needs)[int(0.99 * len(needs))] / 1000 + 0.04)))


def test_a_session_after_a_closed_one_starts_from_what_that_one_needed(lipsync_settings):
    """One session at a time (a voice agent's usual case): the second session's first
    utterance gets the D the closed first one needed, not playout_initial_ms."""
    settings = tuned(lipsync_settings, playout_delay_ms=600, playout_min_ms=80, playout_initial_ms=600)
    pushed, needs = first_utterances(settings, close_first=True)
    assert needs
    assert pushed.delay_s < 0.6


def test_a_stream_beside_it_does_not_set_a_pushed_utterances_first_d(lipsync_settings):
    """A closed session pushed whole speech; a talker streams in real time and stays: a new
    session's first utterance, pushed whole, gets the D the whole speech needed (the
    streamed frames' needs, which hold the wait for their own audio, are kept apart)."""
    settings = tuned(lipsync_settings, playout_delay_ms=600, playout_min_ms=40, playout_initial_ms=600)

    async def main():
        pipeline = LocalPipeline(settings)
        first, whole = await spoken(pipeline, speech("Fine."), "a")
        await pipeline.close_session(first.session_id)
        talker = await pipeline.create_session()
        rx = Receiver(talker)
        streamed = await push_in_real_time(talker, speech("Streaming avatars need steady latency."), "t")
        await rx.until_frame(streamed.end_frame + 2)
        talker_needs = (talker.playout_needs_ms(), talker.playout_needs_ms(streamed=True))
        new = await pipeline.create_session()
        pushed = await new.push_audio(speech("Fine."), "b")
        await rx.stop()
        await pipeline.shutdown()
        return whole, talker_needs, pushed

    whole, (talker_whole, talker_streamed), pushed = asyncio.run(main())
    assert talker_streamed and not talker_whole, talker_whole
    p99 = sorted(whole)[int(0.99 * len(whole))] / 1000
    assert pushed.delay_s == pytest.approx(max(0.04, min(0.6, p99 + 0.04)))


def test_a_starting_gateway_speaks_once_so_the_first_session_starts_measured(lipsync_settings):
    """Gateway.warm_playout: a throwaway session speaks through the pipeline at start, so the
    very first client session's first utterance gets a measured D, not playout_initial_ms;
    the throwaway session is gone afterwards and was never a client's."""
    from ray_lipsync.api.gateway import Gateway

    settings = tuned(lipsync_settings, playout_delay_ms=600, playout_min_ms=80, playout_initial_ms=600)

    async def main():
        pipeline = LocalPipeline(settings)
        gateway = Gateway(settings, pipeline, "gw1")
        warmed = await gateway.warm_playout()
        left = (len(pipeline.sessions()), gateway.session_count, gateway.metrics.sessions_created)
        created = await gateway.create_session()
        session = pipeline.get(gateway._entries[created["session_id"]].session.session_id)
        pushed = await session.push_audio(speech("Fine."), "first")
        await gateway.shutdown()
        await pipeline.shutdown()
        return warmed, left, pushed

    warmed, left, pushed = asyncio.run(main())
    assert warmed and left == (0, 0, 0)
    assert pushed.delay_s < 0.6


def test_frame_timings_keep_each_speech_frames_latency_and_need():
    from types import SimpleNamespace

    from ray_lipsync.clock import SAMPLES_PER_FRAME
    from ray_lipsync.streaming.timings import FrameTimings

    timings = FrameTimings()
    utterance = SimpleNamespace(placed_at=100.0, start_frame=10, streamed=False)  # first pushed at t = 100 s
    timings.audio_ready(10 * SAMPLES_PER_FRAME, 13 * SAMPLES_PER_FRAME, when=100.05)  # frames 10-12
    # frame 12 (80 ms into its utterance) back at 100.2 s: needed 120 ms of D, 150 ms latency
    latency = timings.result(12, 100.2, utterance, served=True)
    assert latency == pytest.approx(150.0) and list(timings.needs_ms[False]) == [pytest.approx(120.0)]
    timings.record_latency(latency)
    assert timings.latency_quantiles(0.5, 0.99) == [pytest.approx(150.0)] * 2
    assert timings.result(11, 100.3, utterance, served=False) == pytest.approx(250.0)  # shed: no need
    timings.shown(10)
    assert timings.result(10, 100.4, utterance, served=True) is None  # shown before it came back
    assert len(timings.needs_ms[False]) == 2 and not timings.needs_ms[True]
    assert FrameTimings().latency_quantiles(0.5) == [None]
