"""Lip sync on the wire: audio and video leave at their session-clock times, as Opus + VP8.

aiortc's RTCP sender report pairs the RTP timestamp of the last packet sent with the wall time
it was sent. Frame k (RTP 3600k) and chunk 2k (RTP 960 * 2k) are handed to the senders at
the session clock's `presentation_time(k)`, chunk 2k+1 20 ms later, so the reports of both
streams carry that one clock: a receiver maps frame k and chunk 2k to the same NTP time.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from aiortc.codecs.opus import OpusEncoder

from helpers import TONE, make_frame, paced_frames, sent_times
from ray_lipsync.clock import PTS_PER_FRAME
from ray_lipsync.webrtc.client import ReceiverClient
from ray_lipsync.webrtc.encoder import OpusStream
from ray_lipsync.webrtc.peer import SessionPeer
from ray_lipsync.webrtc.tracks import SessionMedia, audio_chunks


def test_opus_packets_leave_with_their_own_chunk():
    """One packet per 20 ms chunk at once (aiortc's resampling encoder lags a chunk)."""
    stream, packer = OpusStream(), OpusEncoder()
    for k in range(3):
        for i, chunk in enumerate(audio_chunks(make_frame(k, audio=TONE))):
            packet = stream.encode(chunk)
            payloads, timestamp = packer.pack(packet)  # what aiortc's sender does with it
            assert len(payloads) == 1 and payloads[0]
            assert timestamp == 960 * (2 * k + i)  # RTP clock 48 kHz


def test_audio_and_video_leave_at_the_session_clock_times():
    async def main():
        t0 = time.time() + 0.2
        media = SessionMedia(paced_frames(40, t0), video_queue=40)
        video, audio = await asyncio.gather(sent_times(media.video, 40), sent_times(media.audio, 80))
        await media.stop()
        return t0, video, audio

    t0, video, audio = asyncio.run(main())
    # audio chunk c leaves at t0 + 20 ms * c (never early), video frame k at t0 + 40 ms * k + encode
    audio_late = [sent - (t0 + pts / 16000) for sent, pts in audio]
    video_late = [sent - (t0 + pts / 90000) for sent, pts in video]
    assert min(audio_late) > -0.002 and min(video_late) > -0.002
    assert statistics.median(audio_late) < 0.01, statistics.median(audio_late)
    assert statistics.median(video_late) < 0.02, statistics.median(video_late)
    # chunk 2k+1 leaves a chunk after chunk 2k: packets every 20 ms, not in pairs every 40 ms
    gaps = [b[0] - a[0] for a, b in zip(audio[0::2], audio[1::2])]
    assert statistics.median(gaps) > 0.015, statistics.median(gaps)
    # the (send time, RTP time) pairs of both streams: one mapping, frame k ~ chunk 2k
    skew = [v[0] - a[0] for v, a in zip(video, audio[0::2])]
    assert abs(statistics.median(skew)) < 0.015, statistics.median(skew)


def test_a_video_hold_sends_each_frame_that_long_after_its_audio():
    """webrtc.video_hold_ms: frame k's VP8 leaves at its presentation time + the hold (never
    earlier), its audio still at the presentation time, and no frame is dropped for it."""
    hold = 0.04

    async def main():
        t0 = time.time() + 0.2
        media = SessionMedia(paced_frames(40, t0), video_hold=hold)  # default queue bound + the frames held
        video, audio = await asyncio.gather(sent_times(media.video, 40), sent_times(media.audio, 80))
        await media.stop()
        return t0, video, audio, media.counters

    t0, video, audio, counters = asyncio.run(main())
    assert counters.video_frames_dropped == 0
    assert [pts for _, pts in video] == [PTS_PER_FRAME * k for k in range(40)]
    video_late = [sent - (t0 + pts / 90000) for sent, pts in video]
    audio_late = [sent - (t0 + pts / 16000) for sent, pts in audio]
    assert min(video_late) > hold - 0.002, min(video_late)
    assert hold - 0.002 < statistics.median(video_late) < hold + 0.03, statistics.median(video_late)
    assert statistics.median(audio_late) < 0.01, statistics.median(audio_late)


def test_answer_sends_opus_and_vp8_in_one_stream(lipsync_settings):
    from ray_lipsync.streaming.local import LocalPipeline

    async def main():
        pipeline = LocalPipeline(lipsync_settings)
        session = await pipeline.create_session()
        client = ReceiverClient()
        peer = SessionPeer(session)
        answer = await peer.answer(**(await client.offer()))
        await peer.close()
        await client.close()
        await pipeline.shutdown()
        return answer["sdp"]

    sdp = asyncio.run(main())
    sections = sdp.split("m=")[1:]
    audio = next(s for s in sections if s.startswith("audio"))
    video = next(s for s in sections if s.startswith("video"))
    assert [line.split()[1].split("/")[0] for line in audio.splitlines() if line.startswith("a=rtpmap:")] == ["opus"]
    msids = {line.split()[0] for s in (audio, video) for line in s.splitlines() if line.startswith("a=msid:")}
    assert len(msids) == 1, msids  # one stream id: the browser syncs the two tracks
