"""The session's encoders on their own: VP8 (`Vp8Stream`), Opus (`OpusStream`), and the two
20 ms audio chunks of each frame (`audio_chunks`)."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from helpers import make_frame
from ray_lipsync.clock import SAMPLES_PER_FRAME, video_pts
from ray_lipsync.webrtc.encoder import Vp8Stream
from ray_lipsync.webrtc.tracks import audio_chunks


def test_vp8_stream_encodes_frames_at_the_clock_pts_and_decodes_back():
    stream = Vp8Stream()
    decoder = av.CodecContext.create("libvpx", "r")
    y, x = np.mgrid[0:64, 0:96]
    base = np.stack([x * 2, y * 3, (x + y)], axis=-1).astype(np.uint8)  # smooth, like a face
    for k in range(30):
        image = base.copy()
        image[20:40, 30:60] = (k * 8) % 256  # a moving "mouth"
        packet = stream.encode(image, video_pts(k))
        assert packet.pts == 3600 * k and packet.time_base == fractions.Fraction(1, 90000)
        assert packet.is_keyframe == (k == 0)  # then only on request or every 10 s
        decoded = decoder.decode(packet)[0].to_ndarray(format="rgb24")
        assert decoded.shape == image.shape
        assert np.abs(decoded.astype(int) - image.astype(int)).mean() < 6


def test_vp8_keyframe_on_interval_and_on_request_at_most_every_gap():
    from ray_lipsync.webrtc.encoder import KEYFRAME_REQUEST_GAP

    stream = Vp8Stream(keyframe_interval=30)
    image = np.full((32, 32, 3), 90, np.uint8)
    keys = [stream.encode(image, video_pts(k)).is_keyframe for k in range(31)]
    assert keys == [True] + [False] * 29 + [True]
    stream.request_keyframe()  # one frame after a keyframe: honoured once the gap has passed
    keys = [stream.encode(image, video_pts(31 + k)).is_keyframe for k in range(KEYFRAME_REQUEST_GAP)]
    assert keys == [False] * (KEYFRAME_REQUEST_GAP - 1) + [True]
    with pytest.raises(ValueError, match="uint8 RGB"):
        stream.encode(np.zeros((32, 32), np.uint8), 0)


def test_audio_chunks_are_two_20ms_s16_frames_with_sample_pts():
    ramp = np.linspace(-1, 1, SAMPLES_PER_FRAME, dtype=np.float32)
    first, second = audio_chunks(make_frame(5, audio=ramp))
    for i, chunk in enumerate((first, second)):
        assert chunk.format.name == "s16" and chunk.layout.name == "mono"
        assert chunk.sample_rate == 16000 and chunk.samples == 320
        assert chunk.time_base == fractions.Fraction(1, 16000)
        assert chunk.pts == (2 * 5 + i) * 320
    # frame k and its chunks share one presentation time
    assert first.pts / 16000 == video_pts(5) / 90000
    pcm = np.concatenate([first.to_ndarray().ravel(), second.to_ndarray().ravel()])
    assert pcm[0] == -32767 and pcm[-1] == 32767


def test_opus_silence_reuses_the_packet_libopus_settled_on():
    """Digital silence: once libopus repeats one packet, later silent chunks get it without an
    encode, byte for byte what libopus makes (checked against a second encoder that encodes
    every chunk); sound afterwards is encoded again and decodes as the same sound (libopus's
    state after fewer silent chunks differs a little, so its bytes do too)."""
    from ray_lipsync.webrtc.encoder import OpusStream
    from ray_lipsync.webrtc.tracks import pcm_chunk

    t = np.arange(320 * 10) / 16000
    tone = (np.sin(2 * np.pi * 300 * t) * 8000).astype(np.int16)
    pcm = np.concatenate([tone, np.zeros(320 * 40, np.int16), tone])
    for fec in (False, True):
        reusing, reference = OpusStream(fec=fec), OpusStream(fec=fec)
        got, want = [], []
        for i in range(len(pcm) // 320):
            got.append(bytes(reusing.encode(pcm_chunk(pcm[i * 320:(i + 1) * 320], i))))
            packet = reference._codec.encode(pcm_chunk(pcm[i * 320:(i + 1) * 320], i))[0]
            want.append(bytes(packet))
        assert got[:50] == want[:50]
        heard = [decode_opus(packets)[-960 * 10:] for packets in (got, want)]  # the tone, at 48 kHz
        rms = lambda x: float(np.sqrt(np.mean(x ** 2)))  # noqa: E731
        assert rms(heard[0] - heard[1]) < 0.05 * rms(heard[1]), (rms(heard[0] - heard[1]), rms(heard[1]))
        assert 30 <= reusing.chunks_reused < 40  # the silence after it settled; never the tone
        assert reference.chunks_reused == 0


def test_opus_dtx_sends_one_empty_frame_per_400ms_of_settled_silence():
    """DTX: settled silence goes out as a 1-byte packet (the TOC byte of the silent packet,
    one empty frame) every DTX_EVERY_CHUNKS chunks, the chunks between are left out; the
    tone after it is encoded as without DTX, and libopus decodes the whole stream."""
    from ray_lipsync.webrtc.encoder import DTX_EVERY_CHUNKS, OpusStream
    from ray_lipsync.webrtc.tracks import pcm_chunk

    t = np.arange(320 * 10) / 16000
    tone = (np.sin(2 * np.pi * 300 * t) * 8000).astype(np.int16)
    pcm = np.concatenate([tone, np.zeros(320 * 100, np.int16), tone])
    for fec in (False, True):
        dtx, plain = OpusStream(fec=fec, dtx=True), OpusStream(fec=fec)
        sent, plain_sent = [], []
        for i in range(len(pcm) // 320):
            chunk = pcm[i * 320:(i + 1) * 320]
            packet = dtx.encode(pcm_chunk(chunk, i))
            sent.append(None if packet is None else (i, bytes(packet)))
            plain_sent.append(bytes(plain.encode(pcm_chunk(chunk, i))))
        kept = [p for p in sent if p is not None]
        settled = next(i for i, p in enumerate(sent) if p is None) - 1  # the first DTX packet
        dtx_packets = [(i, data) for i, data in kept if 10 < i < 110 and len(data) == 1]
        assert [i for i, _ in dtx_packets] == list(range(settled, 110, DTX_EVERY_CHUNKS))
        assert all(data[0] == plain_sent[i][0] & 0xFC for i, data in dtx_packets)  # its TOC, code 0
        assert dtx.chunks_left_out == sent.count(None) == 100 - (settled - 10) - len(dtx_packets)
        assert [data for i, data in kept if i >= 110] == plain_sent[110:]  # the tone: as without DTX
        assert len(decode_opus([data for _, data in kept])) > 0


def decode_opus(packets: list[bytes]) -> np.ndarray:
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout = 48000, "mono"
    return np.concatenate([f.to_ndarray().astype(np.float32).reshape(-1)
                           for p in packets for f in decoder.decode(av.Packet(p))])


def test_missing_audio_is_sent_as_silence_not_a_gap():
    frame = make_frame(1)
    frame.audio = np.zeros(10, np.float32)  # short
    chunks = audio_chunks(frame)
    assert [c.samples for c in chunks] == [320, 320]
    assert not any(c.to_ndarray().any() for c in chunks)
