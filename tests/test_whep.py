"""WHEP playback of a session (draft-ietf-wish-whep) through the real HTTP API.

An independent client speaks the draft with aiortc (POST application/sdp -> 201 + answer +
Location, DELETE that location) against the in-process gateway on the real pipeline; several
viewers watch one session and get its media from one shared encode. The browser side
(Chromium speaking WHEP with fetch + RTCPeerConnection) is tests/test_whep_browser.py.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from ray_lipsync.clock import PTS_PER_FRAME
from ray_lipsync.webrtc.client import ReceiverClient
from helpers import loud_ms, make, new_session, paced_frames, sent_times, variant
from speech import speech, to_wav_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def whep_viewer(client, sid: str, auth: dict) -> tuple[ReceiverClient, str]:
    """A WHEP viewer as the draft has it: (the aiortc client, its resource location)."""
    viewer = ReceiverClient(ice_servers=[], keep_audio=True)
    offer = await viewer.offer()
    r = await client.post(f"/v1/sessions/{sid}/whep", content=offer["sdp"],
                          headers={**auth, "Content-Type": "application/sdp"})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"] == "application/sdp"
    location = r.headers["location"]
    assert location.startswith(f"/v1/sessions/{sid}/whep/")
    await viewer.accept({"sdp": r.text, "type": "answer"})
    await viewer.wait_first_video(timeout=5)
    return viewer, location


async def test_whep_refuses_what_the_draft_refuses(lipsync_settings):
    gateway, client = make(variant(lipsync_settings, whep={"max_viewers": 1}))
    async with client:
        sid, auth = await new_session(client)
        _, other_auth = await new_session(client)
        url = f"/v1/sessions/{sid}/whep"
        sdp = {"Content-Type": "application/sdp"}
        assert (await client.post(url, content="v=0", headers=sdp)).status_code == 401
        assert (await client.post(url, content="v=0", headers={**other_auth, **sdp})).status_code == 403
        r = await client.post(url, content="v=0", headers={**auth, "Content-Type": "text/plain"})
        assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")
        r = await client.post(url, content="garbage", headers={**auth, **sdp})
        assert (r.status_code, r.json()["error"]) == (400, "bad_request") and "Traceback" not in r.text
        r = await client.post(url, content=b"\xff\xfe", headers={**auth, **sdp})
        assert r.status_code == 400
        viewer, location = await whep_viewer(client, sid, auth)
        second = ReceiverClient(ice_servers=[])
        r = await client.post(url, content=(await second.offer())["sdp"], headers={**auth, **sdp})
        assert (r.status_code, r.json()["error"]) == (429, "limit_reached")  # whep.max_viewers
        r = await client.patch(location, content="a=candidate:1", headers={**auth, "Content-Type": "application/trickle-ice-sdpfrag"})
        assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed") and r.headers["allow"] == "DELETE"
        assert (await client.delete(location, headers=other_auth)).status_code == 403
        assert (await client.delete(location, headers=auth)).status_code == 200
        assert (await client.delete(location, headers=auth)).json()["error"] == "unknown_output"
        assert gateway._entries[sid].whep.shared is None  # nobody watches: the encode stopped
        await viewer.close()
        await second.close()
        await gateway.shutdown()


@pytest.mark.slow
async def test_several_whep_viewers_share_one_encode_of_the_session(lipsync_settings):
    """Two WHEP viewers (no WebRTC offer on the session at all) both get the speech at 25 fps
    with its audio; the shared encode encodes each frame once; one viewer leaving does not
    disturb the other."""
    gateway, client = make(lipsync_settings)
    async with client:
        sid, auth = await new_session(client)
        first, first_location = await whep_viewer(client, sid, auth)
        second, _ = await whep_viewer(client, sid, auth)
        shared = gateway._entries[sid].whep.shared
        encoded_before, first_frame, t0 = shared.frames_encoded, shared.last_frame, time.monotonic()
        voice = speech()
        r = await client.post(f"/v1/sessions/{sid}/audio", content=to_wav_bytes(voice),
                              headers={**auth, "Content-Type": "audio/wav"})
        assert r.status_code == 202
        seconds = len(voice) / 16000
        await asyncio.sleep(seconds + 0.8)
        encoded = shared.frames_encoded - encoded_before
        assert encoded == shared.last_frame - first_frame, "each frame is encoded once, for every viewer"
        for viewer in (first, second):
            assert viewer.received.fps(t0 + 0.7, t0 + seconds) >= 22
            assert loud_ms(viewer.received.audio_signal(), viewer.received.audio_rate) >= 0.5 * seconds * 1000
        assert (await client.delete(first_location, headers=auth)).status_code == 200
        frames = second.received.video_frames
        await asyncio.sleep(0.5)
        assert second.received.video_frames > frames and second.connection_state == "connected"
        state = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
        assert state["connection_state"] == "new"  # the session's own peer was never used
        await first.close()
        await second.close()
        await gateway.shutdown()


async def test_whep_video_leaves_its_hold_after_the_audio():
    """webrtc.video_hold_ms for WHEP viewers (plain <video> players): the shared encode's
    frame k leaves a viewer's video track at its presentation time + the hold (never
    earlier), its audio at the presentation time, with nothing dropped."""
    from ray_lipsync.webrtc.bandwidth import BitrateBounds
    from ray_lipsync.webrtc.whep import SharedEncode

    hold, n, t0 = 0.04, 25, time.time() + 0.2
    # a few more frames than taken: the tracks stop when the source ends
    shared = SharedEncode(paced_frames(n + 5, t0), BitrateBounds(), video_hold=hold)
    video, audio = shared.track("video"), shared.track("audio")
    shared.add("viewer", [video, audio])
    sent_video, sent_audio = await asyncio.gather(sent_times(video, n), sent_times(audio, 2 * n))
    await shared.close()
    assert video.dropped == 0 and [pts for _, pts in sent_video] == [PTS_PER_FRAME * k for k in range(n)]
    video_late = [t - (t0 + pts / 90000) for t, pts in sent_video]
    audio_late = [t - (t0 + pts / 16000) for t, pts in sent_audio]
    assert min(video_late) > hold - 0.002, min(video_late)
    assert statistics.median(video_late) < hold + 0.03, statistics.median(video_late)
    assert statistics.median(audio_late) < 0.01, statistics.median(audio_late)
