"""A video avatar's idle cycle is encoded once per session and then sent again (webrtc/loop.py):
the packets decode to the same pictures, speech after it starts with a keyframe, a keyframe
request or a new bitrate is answered by the encoder, a still picture is never recorded."""

from __future__ import annotations

import av
import numpy as np
import pytest

from ray_lipsync.avatar.model import mirror_index
from ray_lipsync.webrtc.encoder import Vp8Stream
from ray_lipsync.webrtc.loop import ENTRY_EVERY, RECORD_AFTER, IdleLoop

SIDE = 96
N_SOURCE = 30  # source frames: a mirrored cycle of 60 output frames


def source_frames(n: int = N_SOURCE) -> np.ndarray:
    """Read-only frames of a moving picture, as an avatar store hands them out."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    frames = np.stack([
        np.stack([(128 + 100 * np.sin((x + 3 * k) / 9.0)), (128 + 100 * np.cos((y - 2 * k) / 7.0)),
                  np.full((SIDE, SIDE), 40.0 + 4 * k)], axis=-1)
        for k in range(n)]).astype(np.uint8)
    frames.flags.writeable = False
    return frames


class Receiver:
    """A VP8 decoder fed every packet in order, as a WebRTC receiver would be."""

    def __init__(self) -> None:
        self.codec = av.CodecContext.create("vp8", "r")

    def show(self, packet: av.Packet) -> np.ndarray:
        frames = self.codec.decode(av.Packet(bytes(packet)))
        assert len(frames) == 1
        return frames[0].to_ndarray(format="rgb24")


def send(stream: Vp8Stream, image: np.ndarray, k: int) -> tuple[av.Packet, bool]:
    """What the session's video track does per frame: (packet, replayed)."""
    packet = stream.replay(image, 3600 * k)
    if packet is not None:
        return packet, True
    return stream.encode(image, 3600 * k), False


def until_replaying(stream: Vp8Stream, frames: np.ndarray, receiver: Receiver | None = None) -> int:
    """Send the mirrored cycle of `frames` until the stream sends it again: the next frame's k."""
    k = 0
    while not stream.loop.replaying:
        packet = send(stream, frames[mirror_index(k, len(frames))], k)[0]
        if receiver is not None:
            receiver.show(packet)
        k += 1
    return k


def error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_the_idle_cycle_is_sent_again_and_decodes_to_the_same_pictures():
    frames = source_frames()
    stream, receiver = Vp8Stream(bitrate=300_000), Receiver()
    period = 2 * N_SOURCE
    first_pass: dict[int, np.ndarray] = {}
    replayed_at = []
    for k in range(6 * period):
        image = frames[mirror_index(k, N_SOURCE)]
        packet, replayed = send(stream, image, k)
        shown = receiver.show(packet)
        assert error(shown, image) < 6, f"frame {k} decodes to another picture"
        if replayed:
            replayed_at.append(k)
            # the recorded packet shows exactly what the encoder's own packet showed the first time
            np.testing.assert_array_equal(shown, first_pass[k % period])
        elif k % period not in first_pass and k >= RECORD_AFTER:
            first_pass[k % period] = shown
    # recording starts after RECORD_AFTER frames and takes one period; replay starts at the
    # next entry point, then never stops while the cycle goes on
    assert replayed_at, "the cycle was never sent again"
    assert replayed_at[0] <= RECORD_AFTER + 2 * period + ENTRY_EVERY
    assert replayed_at == list(range(replayed_at[0], 6 * period))
    assert stream.frames_replayed == len(replayed_at) and stream.loop.recordings == 1


def test_speech_after_a_replay_starts_with_a_keyframe_and_decodes():
    frames = source_frames()
    stream, receiver = Vp8Stream(bitrate=300_000), Receiver()
    k = until_replaying(stream, frames, receiver)
    keyframes = stream.keyframes
    speech = np.array(frames[mirror_index(k, N_SOURCE)])  # writable: a frame made for the session
    speech[40:60, 30:70] = 255
    packet, replayed = send(stream, speech, k)
    assert not replayed and packet.is_keyframe and stream.keyframes == keyframes + 1
    assert error(receiver.show(packet), speech) < 6
    for j in range(k + 1, k + 10):
        image = np.array(frames[mirror_index(j, N_SOURCE)])
        packet, replayed = send(stream, image, j)
        assert not replayed and error(receiver.show(packet), image) < 6


def test_a_keyframe_request_during_a_replay_is_answered_by_the_encoder():
    frames = source_frames()
    stream = Vp8Stream(bitrate=300_000)
    k = until_replaying(stream, frames)
    stream.request_keyframe()
    packet, replayed = send(stream, frames[mirror_index(k, N_SOURCE)], k)
    assert not replayed and packet.is_keyframe
    # the recording stays: the cycle is sent again from its next entry point
    for j in range(k + 1, k + 1 + ENTRY_EVERY + 1):
        if send(stream, frames[mirror_index(j, N_SOURCE)], j)[1]:
            break
    else:
        pytest.fail("the replay did not resume at the next entry point")


def test_a_new_bitrate_drops_the_recording():
    frames = source_frames()
    stream = Vp8Stream(bitrate=300_000)
    k = until_replaying(stream, frames)
    stream.set_target_bitrate(150_000)  # a lower rate applies at the next frame
    packet, replayed = send(stream, frames[mirror_index(k, N_SOURCE)], k)
    assert not replayed and packet.is_keyframe and stream.bitrate == 150_000
    keyframes = stream.keyframes
    replayed = [send(stream, frames[mirror_index(j, N_SOURCE)], j)[1] for j in range(k + 1, k + 2 * N_SOURCE)]
    assert not any(replayed), "a recording at the old bitrate was sent"
    # a bitrate may still be ramping: no new recording (and its keyframe) for a while
    assert stream.keyframes == keyframes


def test_a_still_picture_is_never_recorded():
    still = source_frames(1)[0]
    stream = Vp8Stream(bitrate=300_000)
    for k in range(300):
        if not stream.skips(still):
            assert not send(stream, still, k)[1]
    assert stream.keyframes == 1 and stream.frames_replayed == 0


def test_a_cycle_longer_than_the_limit_is_not_recorded():
    loop = IdleLoop(max_frames=20)
    frames = source_frames()
    stream = Vp8Stream(bitrate=300_000)
    stream.loop = loop
    for k in range(8 * N_SOURCE):
        assert not send(stream, frames[mirror_index(k, N_SOURCE)], k)[1]
    assert loop.recordings == 0


def test_another_loop_after_the_recorded_one_is_recorded_in_its_turn():
    """The idle cycle is recorded, then the avatar shows another clip's loop (a state): once
    that went on for longer than the first recording without meeting it, it is recorded and
    sent again."""
    frames = source_frames()
    idle, clip = frames[:15], frames[15:]
    stream = Vp8Stream(bitrate=300_000)
    k = until_replaying(stream, idle)
    recorded = stream.loop.recordings
    replayed = []
    for j in range(k, k + 400):
        replayed.append(send(stream, clip[mirror_index(j, 15)], j)[1])
    assert stream.loop.recordings == recorded + 1 and replayed[-1], "the clip's loop was never sent again"
