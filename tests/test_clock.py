"""The media clock: frame k <-> chunks 2k, 2k+1 <-> samples [640k, 640k+640) <-> PTS 3600k."""

from __future__ import annotations

import pytest

from ray_lipsync import clock
from ray_lipsync.clock import SessionClock


@pytest.mark.parametrize("k", [0, 1, 2, 24, 25, 1000, 90_000])
def test_frame_chunks_samples_and_pts_agree(k: int) -> None:
    first, second = clock.chunks_of_frame(k)
    assert (first, second) == (2 * k, 2 * k + 1)
    assert clock.frame_of_chunk(first) == clock.frame_of_chunk(second) == k
    start, stop = clock.sample_range(k)
    assert (start, stop) == (640 * k, 640 * k + 640)
    assert start == first * clock.CHUNK_SAMPLES and stop == (second + 1) * clock.CHUNK_SAMPLES
    assert clock.video_pts(k) == 3600 * k
    assert clock.audio_pts(first) == 320 * first
    assert clock.audio_pts(first, rate=48_000) == 960 * first  # Opus's RTP clock
    # 25 frames are exactly one second on every clock
    assert clock.video_pts(k + 25) - clock.video_pts(k) == clock.VIDEO_CLOCK_HZ
    assert clock.sample_range(k + 25)[0] - start == clock.SAMPLE_RATE


def test_frame_count_and_readiness() -> None:
    assert clock.frames_in_samples(16_000) == 25  # floor(duration x 25)
    assert clock.frames_in_samples(16_000 + 639) == 25
    assert clock.frames_in_samples(16_000 + 640) == 26
    lookahead = clock.ms_to_samples(40)
    assert lookahead == 640
    assert clock.frames_ready(640, lookahead) == 0  # frame 0 needs 40 ms past its end
    assert clock.frames_ready(1280, lookahead) == 1
    assert clock.frames_ready(100, lookahead) == 0


def test_session_clock_presents_frame_k_at_t0_plus_d_plus_40k() -> None:
    c = SessionClock(t0=1000.0, delay_s=0.3)
    assert c.presentation_time(0) == pytest.approx(1000.3)
    assert c.presentation_time(25) == pytest.approx(1001.3)
    assert c.chunk_time(2 * 7) == pytest.approx(c.presentation_time(7))
    assert c.chunk_time(2 * 7 + 1) == pytest.approx(c.presentation_time(7) + 0.02)
    assert c.frame_at(1000.3) == 0
    assert c.frame_at(1000.3 + 0.0399) == 0
    assert c.frame_at(1001.3 + 1e-6) == 25
    assert c.frame_at(1000.0) < 0  # before the first presentation
