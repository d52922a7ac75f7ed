"""Playback positions on the session timeline: what an utterance's end mark says was played
(exact to the sample, gaps of a stalled stream excluded), what an interrupt cut, and that a
streamed utterance gets no end mark before its last piece."""

from __future__ import annotations

import numpy as np

from ray_lipsync.clock import SAMPLES_PER_FRAME, SessionClock
from ray_lipsync.errors import Backpressure
from ray_lipsync.streaming.timeline import SessionTimeline

T0 = 1000.0
F = SAMPLES_PER_FRAME


def timeline(max_queued_s: float = 30.0) -> SessionTimeline:
    return SessionTimeline(SessionClock(t0=T0, delay_s=0.24), max_queued_s)


def tone(n: int) -> np.ndarray:
    return np.full(n, 0.25, np.float32)


def end_marks(tl: SessionTimeline, frames: range) -> dict:
    out = {}
    for k in frames:
        out.update(tl.marks(k).get("utterance_played", {}))
    return out


def test_an_open_streamed_utterance_has_no_end_until_its_last_piece():
    tl = timeline()
    first = tl.place(tone(1000), T0, "u", final=False)
    assert tl.open_utterance == "u"
    assert end_marks(tl, range(0, 20)) == {}  # its audio ran out, but more is coming
    # the stream stalls past its audio: the last piece lands later, after a gap of silence
    last = tl.place(tone(500), T0 + 1.0, "u", final=True)
    assert last.start > first.start + 1000 and tl.open_utterance is None
    utt = last.utterance
    assert end_marks(tl, range(0, utt.end_frame)) == {"u": {"played_ms": 1500 // 16, "interrupted": False}}


def test_an_interrupt_reports_what_it_cut_and_what_never_started():
    tl = timeline()
    tl.place(tone(16000), T0, "playing", final=True)  # frames 0..24
    tl.place(tone(8000), T0, "queued", final=True)  # right after it
    cut_frame = tl.interrupt(T0 + 0.24 + 0.4)  # presentation clock: frame 10 is on screen
    assert cut_frame == 11
    cut = tl.last_cut
    assert cut.cut_frame == 11 and cut.dropped == ["queued"]
    assert cut.playing == [("playing", 11 * F)]  # frames 0..10 are its played audio
    assert tl.marks(10)["utterance_played"] == {"playing": {"played_ms": 11 * 40, "interrupted": True}}


def test_backpressure_says_when_the_audio_would_fit():
    tl = timeline(max_queued_s=2.0)
    tl.place(tone(24000), T0, None, final=True)
    try:
        tl.place(tone(16000), T0, None, final=True)
    except Backpressure as error:
        assert abs(error.retry_after_s - 0.5) < 0.05  # 1.5 s queued + 1 s - 2 s
    else:
        raise AssertionError("a full buffer took more audio")
