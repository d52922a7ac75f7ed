"""Standard egress of a session: recording to MP4 and restream to a real RTMP server.

Through the real HTTP API over an in-process gateway on the real pipeline (procedural backend,
offline TTS speech): what is written is decoded back with PyAV and checked as a viewer would
see it: H.264 at 25 fps, AAC carrying the session's speech, the mouth moving while it is
heard. The RTMP server is Debian's nginx with libnginx-mod-rtmp (tests/rtmp_server.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from ray_lipsync.egress.fanout import SessionFanout
from ray_lipsync.egress.sink import TargetRefused
from ray_lipsync.egress.targets import check_reachable, parse_target
from ray_lipsync.types import OutputFrame
from helpers import connect, make, new_session, variant
from rtmp_server import rtmp_server
from speech import speech, to_wav_bytes

pytestmark = pytest.mark.anyio

LOUD_RMS = 0.02  # a 40 ms frame of audio this loud is speech (-34 dBFS)
MOUTH_MOVES = 1.5  # mean luma change of the mouth box from the frame before: a moving mouth


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- what a container holds, as a viewer sees and hears it ---------------------------------


@dataclass
class Decoded:
    """A decoded egress output: per video frame its time and mouth motion; the audio."""

    video_codec: str
    audio_codec: str
    frame_times: np.ndarray  # s
    mouth: np.ndarray  # mean |luma - the frame before's| in the mouth box, per frame
    audio: np.ndarray  # mono float32 at 16 kHz, from its first sample on
    average_rate: float
    audio_start: float  # s, the time of the first audio frame

    @property
    def fps(self) -> float:
        span = self.frame_times[-1] - self.frame_times[0]
        return (len(self.frame_times) - 1) / span

    def loud_frames(self) -> np.ndarray:
        """Per 40 ms of audio (aligned with video frame k at t = 0.04 k): whether it is speech."""
        n = len(self.audio) // 640
        rms = np.sqrt((self.audio[: n * 640].reshape(n, 640) ** 2).mean(axis=1))
        return rms > LOUD_RMS


def mouth_box(avatar) -> tuple[slice, slice]:
    """Rows and columns of the lower half of the avatar's face crop (where the mouth moves)."""
    x1, y1, x2, y2 = (int(v) for v in avatar.crop_boxes[0])
    return slice(y1 + (y2 - y1) // 2, y2), slice(x1, x2)


def decode(path: Path, box: tuple[slice, slice]) -> Decoded:
    times, mouth, before, audio_start = [], [], None, None
    resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
    audio: list[np.ndarray] = []
    with av.open(str(path)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        names = (video.codec_context.name, sound.codec_context.name)
        rate = float(video.average_rate or 0)
        for frame in container.decode(video, sound):
            if isinstance(frame, av.VideoFrame):
                luma = frame.to_ndarray(format="gray")[box].astype(np.float32)
                times.append(float(frame.time))
                mouth.append(float(np.abs(luma - (luma if before is None else before)).mean()))
                before = luma
            else:
                audio_start = float(frame.time) if audio_start is None else audio_start
                audio += [r.to_ndarray().reshape(-1) for r in resampler.resample(frame)]
    return Decoded(*names, np.array(times), np.array(mouth),
                   np.concatenate(audio) if audio else np.zeros(0, np.float32), rate,
                   audio_start if audio_start is not None else float("nan"))


def assert_talking_avatar(out: Decoded, speech_s: float) -> None:
    """H.264 + AAC, 25 fps, the speech heard, the mouth moving while it is heard, in sync."""
    assert (out.video_codec, out.audio_codec) == ("h264", "aac")
    # the output starts with a keyframe, with its audio (none lost; MPEG-TS starts at 1.4 s)
    assert abs(out.frame_times[0] - out.audio_start) <= 0.04, (out.frame_times[0], out.audio_start)
    assert out.fps == pytest.approx(25.0, rel=0.02)
    assert out.average_rate == pytest.approx(25.0, rel=0.02)
    loud = out.loud_frames()
    assert loud.sum() * 0.04 >= 0.6 * speech_s, "the session's speech is in the audio"
    n = min(len(loud), len(out.mouth))
    loud, mouth = loud[:n], out.mouth[:n]
    first, last = int(np.flatnonzero(loud)[0]), int(np.flatnonzero(loud)[-1])
    # still outside the speech: from 10 frames in (the encoder's first frames settle) to the
    # speech, and from 3 frames after it (the mouth closes)
    still = np.r_[mouth[10:first - 1], mouth[last + 4:]]
    assert len(still) > 10, "silence around the speech"
    assert mouth[first:last + 1].mean() > MOUTH_MOVES > 5 * still.mean(), (mouth[first:last + 1].mean(), still.mean())
    first_move = int(np.argmax(mouth[10:] > MOUTH_MOVES)) + 10
    assert abs(first - first_move) <= 3, "mouth and sound start together (within 120 ms)"


async def speak(client, sid: str, auth: dict) -> float:
    """Speak a phrase through POST /audio; returns its length (s)."""
    voice = speech()
    r = await client.post(f"/v1/sessions/{sid}/audio", content=to_wav_bytes(voice),
                          headers={**auth, "Content-Type": "audio/wav"})
    assert r.status_code == 202, r.text
    return len(voice) / 16000


async def until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# -- the fan-out ---------------------------------------------------------------------------


def _frame(k: int) -> OutputFrame:
    return OutputFrame("s", 0, k, np.zeros((2, 2, 3), np.uint8), np.zeros(640, np.float32), 3600 * k, 0.04 * k)


def collect_events(gateway, sid: str, token: str) -> tuple[list[tuple[str, dict]], asyncio.Task]:
    """The session's SSE events, collected in the background: (events so far, the task)."""
    events: list[tuple[str, dict]] = []

    async def listen() -> None:
        async for event, data in gateway.events(sid, token, keepalive_s=5):
            events.append((event, data))

    return events, asyncio.create_task(listen())


async def test_a_slow_output_loses_its_own_frames_never_the_others():
    """One reader of the frames; a consumer that reads nothing loses its oldest frames
    (counted) while the other gets every frame; the reading stops with the last output."""
    started = []

    async def frames():
        started.append(time.monotonic())
        for k in range(100):
            yield _frame(k)
            await asyncio.sleep(0)

    drops: list[tuple[str, int]] = []
    fanout = SessionFanout(frames, on_drop=lambda name, f: drops.append((name, f.frame_index)))
    stuck = fanout.attach("stuck", 5)
    fast = fanout.attach("fast", 5)
    got = [f.frame_index async for f in fast]
    assert got == list(range(100))
    assert stuck.dropped == 95 and len(drops) == 95 and drops[0] == ("stuck", 0)
    assert [stuck.get(0).frame_index for _ in range(5)] == [95, 96, 97, 98, 99]
    assert len(started) == 1 and not fanout.running
    await fanout.close()
    late = fanout.attach("late", 5)
    assert late.closed and late.get(0) is None  # the session ended: nothing more comes


# -- restream targets: the SSRF rules ------------------------------------------------------


@pytest.mark.parametrize("url, why", [
    ("file:///etc/passwd", "scheme"), ("http://example.com/x", "scheme"), ("/tmp/x.flv", "scheme"),
    ("rtmp://user:pw@example.com/app/key", "credentials"), ("rtmp://example.com", "stream key"),
    ("srt://example.com", "port"), ("rtmp://exa mple.com/app/key", "spaces"), ("rtmp:///app/key", "host"),
])
def test_restream_urls_of_the_wrong_form_are_refused(url, why):
    with pytest.raises(ValueError, match=why):
        parse_target(url)


def test_srt_is_taken_where_an_ffmpeg_can_send_it_and_refused_with_a_reason_elsewhere():
    from ray_lipsync.egress.relay import can_send

    if can_send("srt", "mpegts"):
        assert parse_target("srt://example.com:9000?latency=200").format == "mpegts"
    else:
        with pytest.raises(ValueError, match="cannot send srt"):
            parse_target("srt://example.com:9000")
    assert parse_target("rtmps://example.com/app/key").port == 443


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.10", "169.254.169.254",
                                  "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0", "[fe80::1]"])
def test_restream_targets_on_internal_addresses_are_refused_unless_allowed(host):
    target = parse_target(f"rtmp://{host}:1935/live/key")
    with pytest.raises(TargetRefused, match="non-public"):
        check_reachable(target, allow_private=False)
    check_reachable(target, allow_private=True)
    assert target.shown.endswith("/live/***") and "key" not in target.shown


async def test_restream_and_recording_routes_validate_and_authorize(lipsync_settings):
    gateway, client = make(lipsync_settings)
    async with client:
        sid, auth = await new_session(client)
        _, other_auth = await new_session(client)
        url = f"/v1/sessions/{sid}/restream"
        for body, code, error in [({"url": "file:///etc/passwd"}, 400, "bad_request"),
                                  ({"url": "rtmp://localhost:1935/live/key"}, 400, "target_refused"),
                                  ({"url": "rtmp://metadata.invalid/live/key"}, 400, "bad_request"),
                                  ({"uri": "rtmp://x/y/z"}, 400, "bad_request"), ({}, 400, "bad_request")]:
            r = await client.post(url, json=body, headers=auth)
            assert (r.status_code, r.json()["error"]) == (code, error), r.text
            assert "Traceback" not in r.text and "127.0.0.1" not in r.text  # no resolved address
        assert (await client.post(url, json={"url": "rtmp://x/y/z"})).status_code == 401
        assert (await client.get(url, headers=other_auth)).status_code == 403  # another session's token
        assert (await client.delete(f"{url}/nope", headers=auth)).json()["error"] == "unknown_output"
        assert (await client.get(url, headers=auth)).json() == {"restreams": []}
        rec = f"/v1/sessions/{sid}/recording"
        assert (await client.get(rec, headers=auth)).status_code == 404
        assert (await client.delete(rec, headers=auth)).status_code == 404
        assert (await client.post(rec, headers=other_auth)).status_code == 403
        await gateway.shutdown()


# -- recording -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_recording_is_the_session_as_a_viewer_sees_it(lipsync_settings, tmp_path):
    """POST starts, DELETE stops, GET returns the MP4: H.264 + AAC at 25 fps with the speech
    and the mouth moving with it; recorded while a WebRTC viewer watches, which still gets
    every frame; the file goes with the session."""
    gateway, client = make(lipsync_settings)
    async with client:
        sid, auth = await new_session(client)
        receiver = await connect(client, sid, auth)
        rec = f"/v1/sessions/{sid}/recording"
        r = await client.post(rec, headers=auth)
        assert r.status_code == 201 and r.json()["state"] == "starting"
        assert (await client.post(rec, headers=auth)).status_code == 409  # one at a time
        assert (await client.get(rec, headers=auth)).json()["error"] == "conflict"  # still running
        await asyncio.sleep(1.0)
        spoken_at = time.monotonic()
        seconds = await speak(client, sid, auth)
        await asyncio.sleep(seconds + 1.0)
        r = await client.delete(rec, headers=auth)
        state = r.json()
        assert r.status_code == 200 and state["state"] == "stopped", state
        assert state["seconds"] > seconds + 1.0 and state["packets_dropped"] == 0
        r = await client.get(rec, headers=auth)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        path = tmp_path / "recording.mp4"
        path.write_bytes(r.content)
        entry = gateway._entries[sid]
        assert entry.egress._worker is None  # the encode stopped with its last output
        decoded = decode(path, mouth_box(entry.session.avatar))
        assert_talking_avatar(decoded, seconds)
        assert len(decoded.frame_times) >= 25 * (seconds + 1.5)
        status = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
        assert status["connection_state"] == "connected"
        files = list((lipsync_settings.home / "recordings").rglob(f"{sid}*.mp4"))
        assert len(files) == 1
        assert (await client.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
        assert not files[0].exists()  # removed with the session (recording.keep_dir unset)
        # the viewer got the speech at 25 fps while it was recorded
        assert receiver.received.fps(spoken_at + 0.6, spoken_at + seconds - 0.2) >= 22
        await receiver.close()
        await gateway.shutdown()


async def test_recording_stops_at_its_limit_and_the_session_goes_on(lipsync_settings, tmp_path):
    """recording.max_seconds stops it (state stopped with the reason, SSE event); without a
    WebRTC viewer; recording.keep_dir keeps the file after the session closed."""
    keep = tmp_path / "kept"
    settings = variant(lipsync_settings, recording={"max_seconds": 1.0, "keep_dir": str(keep)})
    gateway, client = make(settings)
    async with client:
        sid, auth = await new_session(client)
        token = auth["Authorization"].split()[1]
        events, listener = collect_events(gateway, sid, token)
        assert (await client.post(f"/v1/sessions/{sid}/recording", headers=auth)).status_code == 201

        async def stopped() -> bool:
            return any(e == "recording.state" and d["state"] == "stopped" for e, d in events)

        await until(stopped, what="the recording to stop at its limit")
        outputs = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()["outputs"]
        assert outputs["recording"]["state"] == "stopped" and outputs["restreams"] == 0
        final = [d for e, d in events if e == "recording.state"]
        assert [d["state"] for d in final] == ["live", "stopped"]
        assert "recording.max_seconds" in final[-1]["stopped_reason"]
        assert 0.9 <= final[-1]["seconds"] <= 1.0
        state = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
        assert state["session_id"] == sid  # the session goes on
        r = await client.get(f"/v1/sessions/{sid}/recording", headers=auth)
        assert r.status_code == 200 and len(r.content) > 1000
        assert (await client.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
        await asyncio.wait_for(listener, 5)
        kept = list(keep.glob(f"{sid}.*.mp4"))
        assert len(kept) == 1 and kept[0].stat().st_size == len(r.content)
        await gateway.shutdown()


async def test_recording_stops_at_its_byte_limit(lipsync_settings):
    settings = variant(lipsync_settings, recording={"max_bytes": 60_000})
    gateway, client = make(settings)
    async with client:
        sid, auth = await new_session(client)
        assert (await client.post(f"/v1/sessions/{sid}/recording", headers=auth)).status_code == 201

        async def stopped() -> bool:
            outputs = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()["outputs"]
            return outputs["recording"]["state"] == "stopped"

        await until(stopped, what="the recording to stop at recording.max_bytes")
        state = (await client.delete(f"/v1/sessions/{sid}/recording", headers=auth)).json()
        assert "recording.max_bytes" in state["stopped_reason"] and 0 < state["bytes"] <= 60_000
        r = await client.get(f"/v1/sessions/{sid}/recording", headers=auth)
        assert r.status_code == 200 and len(r.content) < 70_000  # the media and the MP4's index
        await gateway.shutdown()


# -- restream to a real RTMP server --------------------------------------------------------


@pytest.mark.slow
async def test_a_stuck_restream_target_never_holds_up_the_recording_or_the_viewer(lipsync_settings, tmp_path):
    """A target that accepts the connection and never answers (the RTMP handshake hangs, in
    the target's relay process: PyAV would hold the GIL through it): the recording of the same
    encode and the WebRTC viewer go on; DELETE answers within its 2 s (the relay is killed)."""
    import socket

    from helpers import free_port

    settings = variant(lipsync_settings, restream={"allow_private_addresses": True})
    gateway, client = make(settings)
    with socket.create_server(("127.0.0.1", free_port())) as silent:  # accepts (backlog), never reads
        async with client:
            sid, auth = await new_session(client)
            receiver = await connect(client, sid, auth)
            url = f"rtmp://127.0.0.1:{silent.getsockname()[1]}/live/key"
            r = await client.post(f"/v1/sessions/{sid}/restream", json={"url": url}, headers=auth)
            assert r.status_code == 201
            assert (await client.post(f"/v1/sessions/{sid}/recording", headers=auth)).status_code == 201
            t0 = time.monotonic()
            await asyncio.sleep(2.0)
            listed = (await client.get(f"/v1/sessions/{sid}/restream", headers=auth)).json()["restreams"][0]
            assert listed["state"] == "starting"  # the target never took the stream
            state = (await client.delete(f"/v1/sessions/{sid}/recording", headers=auth)).json()
            assert state["state"] == "stopped" and state["seconds"] >= 1.5  # recorded all along
            assert receiver.received.fps(t0 + 0.3, t0 + 1.9) >= 4  # a still avatar: >= still_fps
            started = time.monotonic()
            r = await client.delete(f"/v1/sessions/{sid}/restream/{listed['restream_id']}", headers=auth)
            assert r.status_code == 204 and time.monotonic() - started < 3
            await receiver.close()
            await gateway.shutdown()



@pytest.mark.slow
async def test_restream_to_rtmp_is_retried_when_the_server_drops(lipsync_settings, tmp_path):
    """POST a restream to nginx-rtmp on loopback (allowed by restream.allow_private_addresses):
    the stream nginx receives is H.264 at 25 fps + AAC with the session's speech and the mouth
    moving with it, the same encode as the recording's; the target is retried while nginx is
    down (state retrying, the error, SSE events) and goes live again when it is back."""
    from helpers import free_port

    settings = variant(lipsync_settings, restream={"allow_private_addresses": True})
    gateway, client = make(settings)
    with rtmp_server(free_port()) as server:
        async with client:
            sid, auth = await new_session(client)
            token = auth["Authorization"].split()[1]
            events, listener = collect_events(gateway, sid, token)
            url = f"/v1/sessions/{sid}/restream"
            r = await client.post(url, json={"url": server.url("first")}, headers=auth)
            assert r.status_code == 201, r.text
            rid = r.json()["restream_id"]
            assert r.json()["url"].endswith("/live/***")
            assert (await client.post(f"/v1/sessions/{sid}/recording", headers=auth)).status_code == 201

            async def state(wanted: str) -> bool:
                listed = (await client.get(url, headers=auth)).json()["restreams"]
                return listed[0]["state"] == wanted

            await until(lambda: state("live"), what="the restream to go live")
            await asyncio.sleep(0.8)
            seconds = await speak(client, sid, auth)
            await asyncio.sleep(seconds + 1.0)
            entry = gateway._entries[sid]
            assert entry.egress._worker.frames_dropped == 0
            server.stop()  # the target drops
            await until(lambda: state("retrying"), what="the restream to retry")
            listed = (await client.get(url, headers=auth)).json()["restreams"][0]
            assert listed["error"] and listed["retries"] >= 1
            received = tmp_path / "first.flv"
            received.write_bytes(server.recording("first").read_bytes())
            server.start()
            await until(lambda: state("live"), timeout=20, what="the restream to be live again")
            assert (await client.delete(f"{url}/{rid}", headers=auth)).status_code == 204
            assert (await client.get(url, headers=auth)).json() == {"restreams": []}
            await client.delete(f"/v1/sessions/{sid}/recording", headers=auth)
            recording = tmp_path / "recording.mp4"
            recording.write_bytes((await client.get(f"/v1/sessions/{sid}/recording", headers=auth)).content)
            await client.delete(f"/v1/sessions/{sid}", headers=auth)
            await asyncio.wait_for(listener, 5)
            states = [d["state"] for e, d in events if e == "restream.state" and d["restream_id"] == rid]
            assert states[:3] == ["live", "retrying", "live"] and states[-1] == "stopped", states
            await gateway.shutdown()
    box = mouth_box(entry.session.avatar)
    assert_talking_avatar(decode(received, box), seconds)
    # encoded once: the restream and the recording carry the same H.264 packets
    assert len(video_payloads(received) & video_payloads(recording)) > 50


@pytest.mark.slow
async def test_restream_to_srt_through_the_system_ffmpeg(lipsync_settings, tmp_path):
    """srt:// (MPEG-TS) to an SRT listener (FFmpeg on loopback): the talking avatar arrives.
    PyAV's wheels have no SRT: the target's relay is then the system's ffmpeg."""
    import subprocess

    from helpers import free_port
    from ray_lipsync.egress.relay import ffmpeg_sends, pyav_sends

    if not (pyav_sends("srt", "mpegts") or ffmpeg_sends("srt")):
        pytest.skip("no FFmpeg with SRT (apt-get install ffmpeg)")
    port, received = free_port(), tmp_path / "srt.ts"
    listener = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i",
                                 f"srt://127.0.0.1:{port}?mode=listener", "-c", "copy", "-f", "mpegts",
                                 str(received)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    settings = variant(lipsync_settings, restream={"allow_private_addresses": True})
    gateway, client = make(settings)
    try:
        async with client:
            sid, auth = await new_session(client)
            url = f"/v1/sessions/{sid}/restream"
            r = await client.post(url, json={"url": f"srt://127.0.0.1:{port}?latency=120000"}, headers=auth)
            assert r.status_code == 201, r.text
            rid = r.json()["restream_id"]

            async def live() -> bool:
                return (await client.get(url, headers=auth)).json()["restreams"][0]["state"] == "live"

            await until(live, what="the SRT restream to go live")
            await asyncio.sleep(0.8)
            seconds = await speak(client, sid, auth)
            await asyncio.sleep(seconds + 1.0)
            assert (await client.delete(f"{url}/{rid}", headers=auth)).status_code == 204
            box = mouth_box(gateway._entries[sid].session.avatar)
            await gateway.shutdown()
        listener.wait(10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert_talking_avatar(decode(received, box), seconds)


def video_payloads(path: Path) -> set[bytes]:
    with av.open(str(path)) as container:
        return {bytes(p) for p in container.demux(video=0) if p.size}
