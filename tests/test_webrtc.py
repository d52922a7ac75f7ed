"""WebRTC media: tracks fed by one session clock, the session peer, microphone input (the
encoders alone: test_encoders.py).

Unit tests drive `SessionMedia` with frame generators made here; the loopback tests connect
a real aiortc client to a `SessionPeer` (iceServers=[] on both sides) over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gc
import time

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from ray_lipsync.clock import SAMPLES_PER_FRAME, video_pts
from ray_lipsync.heap import freeze_startup_heap
from ray_lipsync.types import OutputFrame
from ray_lipsync.webrtc.encoder import Vp8Stream
from ray_lipsync.webrtc.peer import SessionPeer, parse_offer
from ray_lipsync.webrtc.tracks import SessionMedia
from ray_lipsync.webrtc.client import PlaybackTrack, ReceiverClient
from helpers import make_frame


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


# -- the media source ------------------------------------------------------------------------


def test_media_fans_out_one_to_two_and_reports_frames_in_order():
    async def main():
        sent: list[int] = []
        recorded: list[int] = []
        media = SessionMedia(frame_list(40), now=lambda: 0.0, video_queue=40,
                             record_sent=lambda f: recorded.append(f.frame_index),
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


def test_a_still_picture_is_sent_ever_more_sparsely_and_a_change_at_once():
    """Repeats of one read-only picture (an idle still avatar): the gap between the frames
    sent grows by one frame per frame sent, up to still_every; a new picture goes at once;
    audio and the frame reports stay whole."""
    from ray_lipsync.webrtc.encoder import STILL_AFTER_FRAMES as AFTER

    still = np.full((1, 32, 32, 3), 80, np.uint8)
    still.flags.writeable = False  # like Avatar.frames: every idle frame is a new view of it
    speech = range(AFTER + 125, AFTER + 135)
    total = AFTER + 165

    def image(k: int) -> np.ndarray:
        if k in speech:  # a fresh picture each frame
            return np.full((32, 32, 3), k, np.uint8)
        return still[0]

    async def frames():
        for k in range(total):
            frame = make_frame(k)
            frame.image = image(k)
            yield frame
            await asyncio.sleep(0)

    async def main():
        reported: list[int] = []
        media = SessionMedia(frames(), now=lambda: 0.0, video_queue=total, still_every=5,
                             on_frame_sent=lambda f: reported.append(f.frame_index))
        video, audio = [], []
        await asyncio.gather(drain(media.video, video), drain(media.audio, audio))
        return media, [p.pts // 3600 for p in video], audio, reported

    media, shown, audio, reported = asyncio.run(main())
    # the first AFTER + 1 frames in full (the picture and its repeats), then gaps 2 .. 5, each
    # held 5 frames sent: Chromium's freeze rule (an interval over max(3 x, + 150 ms) the mean
    # of the last 30) never fires, with >= 30 ms to spare
    assert shown[:AFTER + 1] == list(range(AFTER + 1))
    gaps = [b - a for a, b in zip(shown, shown[1:])]
    assert sorted(set(gaps[:shown.index(speech[0]) - 1])) == [1, 2, 3, 4, 5]
    for i, gap in enumerate(gaps):
        recent = [40 * g for g in gaps[max(0, i - 30):i]] or [40]
        mean = sum(recent) / len(recent)
        assert 40 * gap <= max(3 * mean, mean + 150) - 30, (i, gaps)
    assert list(speech) == [k for k in shown if k in speech]  # speech: every frame
    after = shown.index(speech[-1]) + 1
    assert shown[after:after + AFTER + 1] == list(range(speech[-1] + 1, speech[-1] + AFTER + 2))
    assert max(gaps) <= 5
    c, left_out = media.counters, media.video.encoder.frames_left_out
    assert c.video_frames_sent + left_out == total and left_out >= 15
    assert c.audio_chunks_sent == len(audio) == 2 * total
    assert reported == list(range(total))


def test_media_with_dtx_leaves_silence_out_without_holding_up_frames():
    """Audio chunks that DTX leaves out free the audio queue like sent ones: a silence far
    longer than the queue still reports every frame, in order, and the speech after it
    goes out whole."""
    total, talk = 120, range(100, 120)
    tone = (np.sin(np.arange(SAMPLES_PER_FRAME) * 0.2) * 0.3).astype(np.float32)

    async def frames():
        for k in range(total):
            yield make_frame(k, audio=tone if k in talk else None)
            await asyncio.sleep(0)

    async def main():
        reported: list[int] = []
        media = SessionMedia(frames(), now=lambda: 0.0, video=False, audio_queue=4, opus_dtx=True,
                             on_frame_sent=lambda f: reported.append(f.frame_index))
        audio: list = []
        await drain(media.audio, audio)
        return media, audio, reported

    media, audio, reported = asyncio.run(main())
    c = media.counters
    assert reported == list(range(total))
    assert c.audio_chunks_sent == len(audio) and c.audio_chunks_sent + c.audio_chunks_left_out == 2 * total
    assert c.audio_chunks_left_out >= 150  # most of the 200 silent chunks
    assert sum(1 for p in audio if p.pts >= 2 * talk.start * 320) == 2 * len(talk)


def test_writable_or_requested_frames_are_never_left_out():
    from ray_lipsync.webrtc.loop import picture_key

    stream = Vp8Stream(still_every=5)
    writable = np.full((32, 32, 3), 7, np.uint8)
    assert picture_key(writable) is None  # never the same picture: its pixels may have changed in place
    stream.encode(writable, 0)
    assert not any(stream.skips(writable) for _ in range(20))
    frozen = np.full((1, 32, 32, 3), 7, np.uint8)
    frozen.flags.writeable = False
    assert picture_key(frozen[0]) is not None and picture_key(frozen[0]) == picture_key(frozen[0]) != picture_key(writable)
    stream.encode(frozen[0], 3600)
    skipped = [stream.skips(frozen[0]) or bool(stream.encode(frozen[0], 0)) and False for _ in range(60)]
    assert any(skipped)
    stream.request_keyframe()  # the receiver lost the picture: frames go out until it has one
    assert not stream.skips(frozen[0])


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


def test_a_track_stopped_while_waiting_ends_its_recv():
    async def never():
        await asyncio.Event().wait()
        yield make_frame(0)

    async def main():
        media = SessionMedia(never(), now=lambda: 0.0)
        waiting = asyncio.ensure_future(media.video.recv())
        await asyncio.sleep(0.01)
        media.video.stop()
        with pytest.raises(MediaStreamError):
            await asyncio.wait_for(waiting, 1.0)
        await media.stop()

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


def test_peer_rejects_a_bad_offer_and_closes_cleanly():
    async def main():
        peer = SessionPeer(None)  # the offer is checked before the session is touched
        with pytest.raises(ValueError, match="v=0"):
            await peer.answer("not an sdp")
        await peer.close()
        with pytest.raises(ValueError, match="closed"):
            await peer.answer("v=0\r\n")
        return peer.connection_state

    assert asyncio.run(main()) == "closed"


def test_ice_servers_are_validated():
    from ray_lipsync.webrtc.peer import ice_configuration

    config = ice_configuration([{"urls": "stun:stun.example.org:3478"}])
    assert config.iceServers[0].urls == "stun:stun.example.org:3478"
    assert ice_configuration(None).iceServers == []
    with pytest.raises(ValueError, match="urls"):
        ice_configuration([{"url": "stun:x"}])


# -- loopback: a real aiortc client against SessionPeer on LocalPipeline sessions -----------


def tone(seconds: float, hz: float = 440.0, amp: float = 0.5, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def loud_ms(signal: np.ndarray, rate: int, threshold: float = 0.05) -> int:
    """Milliseconds of `signal` whose 10 ms RMS is above `threshold`."""
    win = rate // 100
    n = signal.size // win
    rms = np.sqrt((signal[: n * win].reshape(n, win) ** 2).mean(axis=1))
    return int((rms > threshold).sum() * 10)


async def connect(session, client: ReceiverClient, **peer_kwargs) -> SessionPeer:
    peer = SessionPeer(session, **peer_kwargs)
    answer = await peer.answer(**(await client.offer()))
    assert answer["type"] == "answer" and "m=video" in answer["sdp"]
    await client.accept(answer)
    return peer


@pytest.mark.slow  # ~12 s: the fast lane stays under 2 minutes
def test_session_over_webrtc_timing_audio_interrupt_events_and_one_to_two(lipsync_settings):
    """The issue's checks on one LocalPipeline session seen through a real aiortc client."""
    from ray_lipsync.streaming.local import LocalPipeline

    async def main():
        pipeline = LocalPipeline(lipsync_settings)
        session = await pipeline.create_session()
        sent: list[OutputFrame] = []
        client = ReceiverClient()
        peer = await connect(session, client, on_frame_sent=sent.append, still_every=1)
        first = await client.wait_first_video(timeout=5)

        t0 = time.monotonic()  # 10 s of frames, with 1 s of speech in the middle
        await asyncio.sleep(3.0)
        speech = await session.push_audio(tone(1.0), utterance_id="tone")
        await asyncio.sleep(7.0)
        fps = client.received.fps(t0, time.monotonic())
        pts = [p for p, t in zip(client.received.video_pts, client.received.video_times) if t >= t0]
        speech_audio = client.received.audio_signal()
        rate = client.received.audio_rate

        long = await session.push_audio(tone(3.0, hz=330), utterance_id="long")
        await asyncio.sleep(1.0)
        last_fanned = peer.media.counters.frames_in  # frames already handed to the tracks
        cut_at = sent[-1].frame_index + (peer.media.counters.frames_in - peer.media.counters.frames_reported)
        await session.interrupt()
        await asyncio.sleep(1.0)
        await pipeline.close_session(session.session_id)
        await peer.wait_closed()
        await client.close()
        await pipeline.shutdown()
        return locals()

    r = asyncio.run(main())
    peer, sent = r["peer"], r["sent"]
    assert r["first"] < 2.0  # first frame within 2 s of connect
    # 25 +/- 1 fps over 10 s: with still_every=1 the stream carries every frame, also the
    # silent ones (pts on the 90 kHz clock) ...
    pts = r["pts"]
    assert len(pts) >= 240 and (pts[-1] - pts[0]) / 90_000 >= 9.5, (len(pts), pts[-1] - pts[0])
    steps = [b - a for a, b in zip(pts, pts[1:])]
    assert all(d > 0 and d % 3600 == 0 for d in steps)  # in order, no repeats, on the clock
    missing = sum(d // 3600 - 1 for d in steps)
    assert missing <= r["peer"].counters.video_frames_dropped  # only counted drops leave gaps
    # ... and they arrive at that rate (a little slack for a loaded shared CI machine)
    assert 22.5 <= r["fps"] <= 27.5, r["fps"]
    got = loud_ms(r["speech_audio"], r["rate"])
    assert abs(got - r["speech"].duration_ms) <= 40, (got, r["speech"].duration_ms)

    # events: utterance marks reach on_frame_sent, in order
    marks = [(k, f.frame_index) for f in sent for k in f.meta.get("utterance_start", []) + f.meta.get("utterance_end", [])]
    tone_frames = [k for u, k in marks if u == "tone"]
    assert len(tone_frames) == 2 and tone_frames[1] - tone_frames[0] == r["speech"].duration_ms // 40 - 1
    assert any(u == "long" for u, _ in marks)

    # interrupt: no audio of the old speech later than 2 frames after the cut
    cut = r["cut_at"]
    late = [f.frame_index for f in sent if f.frame_index >= cut + 2 and np.abs(f.audio).max() > 0.01]
    assert late == [], (cut, late[:5])
    assert any(np.abs(f.audio).max() > 0.1 for f in sent if f.frame_index < cut)

    # one video frame per two audio chunks over the whole session; a video frame is only
    # dropped (counted) if the encoder fell behind, which a loaded CI machine may cause
    c = peer.counters
    assert c.audio_chunks_sent == 2 * (c.video_frames_sent + c.video_frames_dropped) == 2 * len(sent)
    assert c.video_frames_dropped <= 0.02 * len(sent), c
    assert peer.connection_state == "closed"


def test_microphone_track_is_resampled_and_pushed_as_one_utterance(lipsync_settings):
    from ray_lipsync.streaming.local import LocalPipeline

    async def main():
        pipeline = LocalPipeline(lipsync_settings)
        session = await pipeline.create_session()
        sent: list[OutputFrame] = []
        client = ReceiverClient(mic=PlaybackTrack(tone(0.8, hz=300, amp=0.4)))
        peer = await connect(session, client, on_frame_sent=sent.append)
        await client.wait_first_video(timeout=5)
        await asyncio.sleep(2.0)
        mic = peer.mic
        await peer.close()
        await client.close()
        await pipeline.shutdown()
        ours = ("mic-", "media-watch-", "session-media", "peer-close")
        left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(ours)]
        assert left == []  # close() leaves no task of the peer behind
        return mic, sent

    mic, sent = asyncio.run(main())
    assert mic is not None
    assert mic.samples_pushed >= int(0.8 * 16000)  # the tone, resampled to 16 kHz
    starts = [u for f in sent for u in f.meta.get("utterance_start", [])]
    assert starts == ["mic-0"]  # one utterance while the client kept sending
    loud = [f for f in sent if np.abs(f.audio).max() > 0.1]
    assert 0.6 <= len(loud) * 0.04 <= 1.0  # the spoken part came back out at 16 kHz


@pytest.mark.ray
@pytest.mark.slow  # ~30 s: Ray start + actors
def test_ray_pipeline_session_streams_over_webrtc(lipsync_settings):
    """The same media path on a RayPipeline session (real Ray actors)."""
    ray = pytest.importorskip("ray")
    from actors.runtime import init_ray
    from actors.pipeline import RayPipeline

    async def main():
        pipeline = await RayPipeline.connect(lipsync_settings)
        session = await pipeline.create_session()
        sent: list[OutputFrame] = []
        client = ReceiverClient()
        peer = await connect(session, client, on_frame_sent=sent.append)
        first = await client.wait_first_video(timeout=10)
        await asyncio.sleep(0.5)
        speech = await session.push_audio(tone(1.0), utterance_id="tone")
        await asyncio.sleep(2.5)
        audio, rate = client.received.audio_signal(), client.received.audio_rate
        await pipeline.close_session(session.session_id)
        await peer.wait_closed()
        await client.close()
        await pipeline.shutdown()
        return first, speech, audio, rate, peer.counters, peer.network()["frames_left_out"], sent

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # as a gateway does once started (ray_lipsync.heap): this process holds the heap of every
    # test before it, whose full collection can hold the sender past its queue (one run of
    # the suite dropped 7 frames here; its cause was not pinned down)
    freeze_startup_heap()
    try:
        first, speech, audio, rate, counters, left_out, sent = asyncio.run(main())
    finally:
        gc.unfreeze()
        ray.shutdown()
    assert first < 2.0
    assert abs(loud_ms(audio, rate) - speech.duration_ms) <= 40
    assert counters.video_frames_dropped == 0
    assert counters.audio_chunks_sent == 2 * (counters.video_frames_sent + left_out) == 2 * len(sent)
    assert [u for f in sent for u in f.meta.get("utterance_end", [])] == ["tone"]

