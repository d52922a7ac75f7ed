"""Bitrate that follows the link: the controller's policy, the encoder's rate changes, the RTCP
feedback on a real aiortc sender, and Opus FEC as the client's offer asks (fast, no network)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ray_lipsync.clock import video_pts
from ray_lipsync.webrtc.bandwidth import AUDIO_RESERVE_BPS, BitrateBounds, BitrateController
from ray_lipsync.webrtc.encoder import RAISE_GAP_FRAMES, OpusStream, Vp8Stream

BOUNDS = BitrateBounds(min_bps=100_000, start_bps=500_000, max_bps=1_000_000)


def busy(controller: BitrateController, bps: float, now: float) -> None:
    """The encoder sent at `bps` over the last second (so growth is not application-limited)."""
    controller.on_sent(int(bps / 8), now)


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="min <= start <= max"):
        BitrateBounds(min_bps=600_000, start_bps=500_000, max_bps=1_000_000)
    with pytest.raises(ValueError, match="fraction_lost"):
        BitrateController(BOUNDS).on_report(1.5, None, 1.0)


def test_heavy_loss_cuts_the_target_and_low_loss_grows_it_back():
    c = BitrateController(BOUNDS, now=0.0)
    assert c.target_bps == 500_000
    c.on_report(0.5, 0.05, 1.0)  # half the packets lost: cut by a quarter
    assert c.target_bps == 375_000
    c.on_report(0.05, 0.05, 2.0)  # 5 %: hold
    assert c.target_bps == 375_000
    now = 2.0
    for _ in range(5):  # loss-free and busy: +8 % a second
        now += 1.0
        busy(c, 2 * c.target_bps, now)
        c.on_report(0.0, 0.05, now)
    assert c.target_bps == pytest.approx(375_000 * 1.08 ** 5, rel=0.01)


def test_growth_is_bounded_by_what_was_sent():
    c = BitrateController(BOUNDS, now=0.0)
    for t in range(1, 30):  # a silent avatar sends ~20 kbit/s: loss-free reports prove nothing more
        busy(c, 20_000, float(t))
        c.on_report(0.0, 0.05, float(t))
    assert c.target_bps == 500_000


def test_a_growing_round_trip_cuts_the_target():
    c = BitrateController(BOUNDS, now=0.0)
    c.on_report(0.0, 0.05, 1.0)
    c.on_report(0.0, 0.40, 2.0)  # a queue of 350 ms on the path
    assert c.target_bps == int(500_000 * 0.85)


def test_cuts_from_one_congestion_do_not_compound():
    c = BitrateController(BOUNDS, now=0.0)
    c.on_report(0.4, None, 1.0)
    c.on_report(0.4, None, 1.1)  # the same episode, reported again 100 ms later
    assert c.target_bps == 400_000


def test_remb_caps_the_target_with_room_for_the_audio_and_bounds_hold():
    c = BitrateController(BOUNDS, now=0.0)
    c.on_remb(300_000, 1.0)
    assert c.target_bps == 300_000 - AUDIO_RESERVE_BPS and c.remb_bps == 300_000
    c.on_remb(50_000, 2.0)
    assert c.target_bps == BOUNDS.min_bps  # never below the configured floor
    c.on_remb(5_000_000, 3.0)
    assert c.target_bps == 500_000  # REMB caps, it does not raise


def moving(k: int) -> np.ndarray:
    """A 128x128 picture with a moving bar (content that costs bits every frame)."""
    image = np.full((128, 128, 3), 80, np.uint8)
    y = 20 + (k * 7) % 80
    image[y:y + 20, 30:100] = (k * 37) % 255
    return image


def test_encoder_takes_a_lower_target_at_once_and_a_higher_one_after_a_gap():
    stream = Vp8Stream(bitrate=500_000)
    for k in range(5):
        stream.encode(moving(k), video_pts(k))
    stream.set_target_bitrate(520_000)  # within 15 %: not worth a reopening (and its keyframe)
    assert not stream.encode(moving(5), video_pts(5)).is_keyframe and stream.bitrate == 500_000
    stream.set_target_bitrate(200_000)  # a decrease: at the next frame, with a keyframe
    assert stream.encode(moving(6), video_pts(6)).is_keyframe
    assert stream.bitrate == 200_000 and stream.reopens == 1
    stream.set_target_bitrate(400_000)  # an increase waits RAISE_GAP_FRAMES since the reopening
    keys = [stream.encode(moving(7 + k), video_pts(7 + k)).is_keyframe for k in range(RAISE_GAP_FRAMES)]
    assert keys.index(True) == RAISE_GAP_FRAMES - 1 and stream.bitrate == 400_000
    with pytest.raises(ValueError):
        stream.set_target_bitrate(0)


def test_encoder_rate_follows_a_low_target_and_keyframes_stay_small():
    """CBR with capped keyframes: at 150 kbit/s, 4 s of content that would take more stay
    near the target, and no keyframe takes more than a few frames' budget."""
    rates = {}
    for target in (150_000, 600_000):
        stream = Vp8Stream(bitrate=target, keyframe_interval=50)
        sizes, keys = [], []
        for k in range(100):
            image = np.repeat(np.repeat(moving(k), 4, 0), 4, 1)  # 512x512
            packet = stream.encode(image, video_pts(k))
            sizes.append(packet.size)
            keys.append(packet.is_keyframe)
        rates[target] = 8 * sum(sizes[25:]) / 3.0
        per_frame = target / 8 / 25
        assert max(s for s, key in zip(sizes, keys) if key) < 6 * per_frame + 8_000
    assert rates[150_000] < 1.3 * 150_000
    assert rates[600_000] > rates[150_000]


def test_opus_fec_and_dtx_as_the_offer_asks():
    from ray_lipsync.webrtc.peer import asks_opus, parse_offer

    def offer(fmtp: str) -> str:
        return ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
                "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n"
                f"a=rtpmap:111 opus/48000/2\r\n{fmtp}")

    assert asks_opus(parse_offer(offer("a=fmtp:111 minptime=10;useinbandfec=1\r\n"), "offer"), "useinbandfec")
    assert not asks_opus(parse_offer(offer("a=fmtp:111 minptime=10\r\n"), "offer"), "useinbandfec")
    dtx = parse_offer(offer("a=fmtp:111 minptime=10;useinbandfec=1;usedtx=1\r\n"), "offer")
    assert asks_opus(dtx, "usedtx") and not asks_opus(parse_offer(offer("a=fmtp:111 usedtx=0\r\n"), "offer"), "usedtx")
    # libopus with FEC writes other packets (each also carries a coarse copy of the previous)
    import fractions

    import av

    from ray_lipsync.clock import CHUNK_SAMPLES, SAMPLE_RATE

    def packets(fec: bool) -> list[bytes]:
        stream, out = OpusStream(fec=fec), []
        t = np.arange(CHUNK_SAMPLES * 20) / SAMPLE_RATE
        pcm = (np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) * 8000).astype(np.int16)
        for i in range(20):
            chunk = av.AudioFrame.from_ndarray(pcm[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES].reshape(1, -1),
                                               format="s16", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = SAMPLE_RATE, i * CHUNK_SAMPLES, fractions.Fraction(1, SAMPLE_RATE)
            out.append(bytes(stream.encode(chunk)))
        return out

    assert packets(True)[10:] != packets(False)[10:]


def test_link_feedback_on_a_real_aiortc_sender():
    """PLI makes a keyframe; REMB sets the encoder's target (the audio's share taken off only when
    it names the audio too); receiver reports are read back through getStats, and the loss is
    taken from their cumulative counts; aiortc's own handling still runs."""
    from aiortc import RTCPeerConnection
    from aiortc.rtp import RTCP_PSFB_APP, RTCP_PSFB_PLI, RtcpPsfbPacket, RtcpReceiverInfo, RtcpRrPacket, pack_remb_fci

    from ray_lipsync.webrtc.rtcp import LinkFeedback

    now = [10.0]

    async def main():
        pc = RTCPeerConnection()
        sender = pc.addTransceiver("video", direction="sendonly").sender
        stream = Vp8Stream()
        link = LinkFeedback(stream, BitrateController(BOUNDS, now=0.0), clock=lambda: now[0])
        link.attach(sender)
        image = np.full((32, 32, 3), 90, np.uint8)
        for k in range(13):
            stream.encode(image, video_pts(k))
        await sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=0))
        keyframe = stream.encode(image, video_pts(13)).is_keyframe
        wanted = []
        for ssrcs in ([7, 8], [7]):
            await sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0,
                                                            fci=pack_remb_fci(300_000, ssrcs)))
            wanted.append(stream._wanted)
        own = next(s.ssrc for s in (await sender.getStats()).values() if s.type == "outbound-rtp")
        for lost in (0, 50):  # two reports a second apart: 50 packets lost in between
            report = RtcpReceiverInfo(ssrc=own, fraction_lost=0, packets_lost=lost,
                                      highest_sequence=100, jitter=0, lsr=0, dlsr=0)
            await sender._handle_rtcp_packet(RtcpRrPacket(ssrc=1, reports=[report]))
            await asyncio.sleep(0.05)  # the report is read back through getStats in a task
            now[0] += 1.0
        stats = link.stats()
        link.close()
        await pc.close()
        return keyframe, wanted, stats

    keyframe, wanted, stats = asyncio.run(main())
    assert keyframe
    assert wanted == [300_000 - AUDIO_RESERVE_BPS, 300_000]
    assert stats.keyframe_requests == 1 and stats.remb_bps == 300_000
    assert stats.reports == 1 and stats.loss == 1.0  # nothing was sent: all 50 lost
    assert stats.target_bps == 250_000  # the loss cut the estimate (500k) by half, under REMB's
