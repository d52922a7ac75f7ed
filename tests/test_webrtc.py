"""WebRTC media: tracks fed by one session clock, the session peer, microphone input.

Unit tests drive `SessionMedia` with frame generators made here; the loopback tests connect
a real aiortc client to a `SessionPeer` (iceServers=[] on both sides) over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
import pytest
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

from ray_lipsync.clock import SAMPLES_PER_FRAME, SessionClock, video_pts
from ray_lipsync.types import OutputFrame
from ray_lipsync.webrtc import SessionMedia, SessionPeer, audio_chunks, parse_offer, video_frame
from ray_lipsync.webrtc.client import ReceiverClient


def make_frame(k: int, *, audio: np.ndarray | None = None, size: int = 64, t: float = 0.0) -> OutputFrame:
    image = np.full((size, size, 3), k % 256, dtype=np.uint8)
    samples = np.zeros(SAMPLES_PER_FRAME, np.float32) if audio is None else audio
    return OutputFrame("s", 0, k, image, samples, video_pts(k), t)


async def frame_list(n: int):
    for k in range(n):
        yield make_frame(k)
        await asyncio.sleep(0)


async def drain(track, into: list) -> None:
    while True:
        try:
            into.append(await track.recv())
        except MediaStreamError:
            return


# -- frame conversion ------------------------------------------------------------------------


def test_video_frame_carries_the_clock_pts():
    out = video_frame(make_frame(7))
    assert out.format.name == "rgb24"
    assert out.pts == 7 * 3600 and out.time_base == fractions.Fraction(1, 90000)
    assert out.to_ndarray(format="rgb24")[0, 0, 0] == 7


def test_audio_chunks_are_two_20ms_s16_frames_with_sample_pts():
    ramp = np.linspace(-1, 1, SAMPLES_PER_FRAME, dtype=np.float32)
    first, second = audio_chunks(make_frame(5, audio=ramp))
    for i, chunk in enumerate((first, second)):
        assert chunk.format.name == "s16" and chunk.layout.name == "mono"
        assert chunk.sample_rate == 16000 and chunk.samples == 320
        assert chunk.time_base == fractions.Fraction(1, 16000)
        assert chunk.pts == (2 * 5 + i) * 320
    # frame k and its chunks share one presentation time
    assert first.pts / 16000 == video_frame(make_frame(5)).pts / 90000
    pcm = np.concatenate([first.to_ndarray().ravel(), second.to_ndarray().ravel()])
    assert pcm[0] == -32767 and pcm[-1] == 32767


def test_missing_audio_is_sent_as_silence_not_a_gap():
    frame = make_frame(1)
    frame.audio = np.zeros(10, np.float32)  # short
    chunks = audio_chunks(frame)
    assert [c.samples for c in chunks] == [320, 320]
    assert not any(c.to_ndarray().any() for c in chunks)


# -- the media source ------------------------------------------------------------------------


def test_media_fans_out_one_to_two_and_reports_frames_in_order():
    async def main():
        sent: list[int] = []
        recorded: list[int] = []
        media = SessionMedia(frame_list(40), now=lambda: 0.0, record_sent=lambda f: recorded.append(f.frame_index),
                             on_frame_sent=lambda f: sent.append(f.frame_index))
        video, audio = [], []
        await asyncio.gather(drain(media.video, video), drain(media.audio, audio))
        return media, video, audio, sent, recorded

    media, video, audio, sent, recorded = asyncio.run(main())
    c = media.counters
    assert (c.frames_in, c.video_frames_sent, c.audio_chunks_sent, c.video_frames_dropped) == (40, 40, 80, 0)
    assert c.audio_chunks_sent == 2 * c.video_frames_sent
    assert [f.pts for f in video] == [video_pts(k) for k in range(40)]
    assert [a.pts for a in audio] == [320 * i for i in range(80)]
    assert sent == recorded == list(range(40))


def test_lagging_video_drops_oldest_but_never_audio():
    async def main():
        reported: list[int] = []
        media = SessionMedia(frame_list(30), on_frame_sent=lambda f: reported.append(f.frame_index),
                             video_queue=3, now=lambda: 0.0)
        audio: list = []
        await drain(media.audio, audio)  # video sender stuck until the stream ended
        video: list = []
        await drain(media.video, video)
        return media, video, audio, reported

    media, video, audio, reported = asyncio.run(main())
    c = media.counters
    assert c.audio_chunks_sent == 60 and len(audio) == 60
    assert c.video_frames_sent == 3 and c.video_frames_dropped == 27
    assert [f.pts for f in video] == [video_pts(k) for k in (27, 28, 29)]  # the newest survive
    assert reported == list(range(30))  # every frame reported once, in order


def test_stop_ends_tracks_and_task():
    async def forever():
        k = 0
        while True:
            yield make_frame(k)
            k += 1
            await asyncio.sleep(0.001)

    async def main():
        media = SessionMedia(forever(), now=lambda: 0.0)
        await media.video.recv()
        await media.stop()
        assert not media.running
        with pytest.raises(MediaStreamError):
            await media.audio.recv()

    asyncio.run(main())


def test_frames_due_before_the_connection_are_skipped_with_their_marks_kept():
    async def late():
        for k in range(10):
            frame = make_frame(k, t=float(k))  # presentation times 0..9 s
            if k == 2:
                frame.meta = {"utterance_start": ["u1"]}
            yield frame

    async def main():
        reported: list[OutputFrame] = []
        media = SessionMedia(late(), on_frame_sent=reported.append, now=lambda: 6.0)
        video, audio = [], []
        await asyncio.gather(drain(media.video, video), drain(media.audio, audio))
        return media, reported

    media, reported = asyncio.run(main())
    assert media.counters.frames_skipped_at_join == 6  # frames 0..5 were overdue at 6.0 s
    assert [f.frame_index for f in reported] == [6, 7, 8, 9]
    assert reported[0].meta["utterance_start"] == ["u1"]
    assert media.counters.audio_chunks_sent == 2 * media.counters.video_frames_sent == 8


# -- offers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sdp, kind, fragment",
    [
        ("v=0\r\n", "answer", "type 'offer'"),
        ("", "offer", "empty"),
        ("hello", "offer", "v=0"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "offer", "no audio or video"),
        ("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96\r\n", "offer", "malformed"),
    ],
)
def test_bad_offers_raise_value_error(sdp, kind, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_offer(sdp, kind)


# -- loopback: a real aiortc client against SessionPeer --------------------------------------


class ClockSession:
    """A minimal clock-paced session (stand-in until streaming.Session is used here).

    Frame k is yielded at its presentation time with the pushed speech (or silence); speech
    frames are brighter, so the video shows what is playing.
    """

    def __init__(self, size: int = 96) -> None:
        self.session_id = "loop"
        self.epoch = 0
        self.clock = SessionClock(time.time(), 0.04)  # sessions time frames on wall time
        self._size = size
        self._audio = np.zeros(0, np.float32)
        self._speech_from = 0  # absolute sample index where queued speech starts
        self._closed = False
        self.sent: list[OutputFrame] = []
        self.pushed: list[tuple[str | None, int]] = []

    async def push_audio(self, samples: np.ndarray, utterance_id: str | None = None):
        self.pushed.append((utterance_id, samples.size))
        if self._audio.size == 0:
            now_frame = max(0, self.clock.frame_at(time.time()) + 1)
            self._speech_from = now_frame * SAMPLES_PER_FRAME
        self._audio = np.concatenate([self._audio, samples.astype(np.float32)])

    async def interrupt(self) -> int:
        self.epoch += 1
        self._audio = np.zeros(0, np.float32)
        return self.epoch

    async def close(self) -> None:
        self._closed = True

    def record_sent(self, frame: OutputFrame) -> None:
        self.sent.append(frame)

    async def frames(self):
        k = max(0, self.clock.frame_at(time.time()))
        while not self._closed:
            delay = self.clock.presentation_time(k) - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            start = k * SAMPLES_PER_FRAME - self._speech_from
            audio = np.zeros(SAMPLES_PER_FRAME, np.float32)
            if self._audio.size and start >= 0 and start < self._audio.size:
                piece = self._audio[start : start + SAMPLES_PER_FRAME]
                audio[: piece.size] = piece
            speech = bool(np.abs(audio).max() > 0)
            image = np.full((self._size, self._size, 3), 200 if speech else 40, np.uint8)
            yield OutputFrame(self.session_id, self.epoch, k, image, audio, video_pts(k),
                              self.clock.presentation_time(k), speech=speech)
            k += 1


def tone(seconds: float, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def loud_ms(signal: np.ndarray, rate: int, threshold: float = 0.05) -> int:
    """Milliseconds of `signal` whose 10 ms RMS is above `threshold`."""
    win = rate // 100
    n = signal.size // win
    rms = np.sqrt((signal[: n * win].reshape(n, win) ** 2).mean(axis=1))
    return int((rms > threshold).sum() * 10)


async def connect(session, **peer_kwargs) -> tuple[SessionPeer, ReceiverClient]:
    peer = SessionPeer(session, **peer_kwargs)
    client = ReceiverClient(mic=peer_kwargs.pop("mic", None) if False else None)
    answer = await peer.answer(**(await client.offer()))
    assert answer["type"] == "answer" and "m=video" in answer["sdp"]
    await client.accept(answer)
    return peer, client


def test_loopback_streams_first_frame_fps_audio_and_one_to_two():
    async def main():
        session = ClockSession()
        sent_frames: list[OutputFrame] = []
        peer, client = await connect(session, on_frame_sent=sent_frames.append)
        first = await client.wait_first_video(timeout=5)
        await session.push_audio(tone(0.6))
        t0 = time.monotonic()
        await asyncio.sleep(2.0)
        fps = client.received.fps(t0, time.monotonic())
        await session.close()
        await asyncio.sleep(0.3)
        await peer.close()
        await client.close()
        return session, peer, client, first, fps, sent_frames

    session, peer, client, first, fps, sent_frames = asyncio.run(main())
    assert first < 2.0
    assert 23 <= fps <= 27
    c = peer.counters
    assert c.video_frames_dropped == 0
    assert c.audio_chunks_sent == 2 * c.video_frames_sent
    assert [f.frame_index for f in session.sent] == [f.frame_index for f in sent_frames]
    assert client.received.video_size == (96, 96)
    got = loud_ms(client.received.audio_signal(), client.received.audio_rate)
    assert abs(got - 600) <= 40, got
    assert peer.connection_state == "closed"
