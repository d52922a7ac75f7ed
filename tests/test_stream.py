"""The streaming WebSocket (GET /v1/sessions/{id}/stream) over real TCP: uvicorn serves the
API on the real pipeline (LocalPipeline + SessionPeer), a `websockets` client streams PCM16,
an aiortc client receives the avatar; playback events are checked against what it heard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import numpy as np
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from ray_lipsync.audio import resample
from ray_lipsync.webrtc.client import ReceiverClient
from helpers import loud_ms, variant
from servers import running_server
from speech import speech

pytestmark = pytest.mark.anyio
PORT = 19011


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


async def new_session(http: httpx.AsyncClient) -> tuple[str, str]:
    r = await http.post("/v1/sessions", json={})
    assert r.status_code == 201, r.text
    return r.json()["session_id"], r.json()["token"]


async def connect_peer(http: httpx.AsyncClient, sid: str, token: str) -> ReceiverClient:
    receiver = ReceiverClient(ice_servers=[])
    r = await http.post(f"/v1/sessions/{sid}/offer", json=await receiver.offer(),
                        headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    await receiver.accept(r.json())
    await receiver.wait_first_video(timeout=5)
    return receiver


async def next_event(ws, kind: str, timeout: float = 15) -> dict:
    """The next server event of type `kind` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if message["type"] == kind:
            return message


async def test_refused_before_upgrade_with_the_http_codes(lipsync_settings):
    async with running_server(lipsync_settings, PORT) as (_, base):
        async with httpx.AsyncClient(base_url=base) as http:
            sid, token = await new_session(http)
        ws_base = base.replace("http", "ws")
        cases = [(f"/v1/sessions/{sid}/stream", {}, 401),
                 (f"/v1/sessions/{sid}/stream?token=nope", {}, 403),
                 (f"/v1/sessions/gw1.nosuchsession/stream?token={token}", {}, 404),
                 (f"/v1/sessions/{sid}/stream?rate=4000", {"Authorization": f"Bearer {token}"}, 400),
                 (f"/v1/sessions/{sid}/stream?rate=abc&token={token}", {}, 400)]
        for path, headers, status in cases:
            with pytest.raises(InvalidStatus) as refused:
                async with websockets.connect(ws_base + path, additional_headers=headers):
                    pass
            response = refused.value.response
            assert response.status_code == status, (path, response.status_code)
            body = json.loads(response.body)
            assert set(body) == {"error", "detail"}, body
        # the bearer header works as well as ?token=
        async with websockets.connect(f"{ws_base}/v1/sessions/{sid}/stream",
                                      additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            await ws.send("not json")
            error = await next_event(ws, "error", 5)
            assert error["error"] == "bad_request" and "JSON" in error["detail"]
            await ws.send(json.dumps({"type": "shout"}))
            assert "unknown message type" in (await next_event(ws, "error", 5))["detail"]
            await ws.send(json.dumps({"type": "flush"}))  # nothing to flush: no event, still open
            await ws.ping()


async def test_stream_flush_clear_and_playback_positions(lipsync_settings):
    """24 kHz PCM in odd-sized messages -> one utterance per flush; played_ms exact; clear
    cuts the playing utterance (its played_ms = what was sent) and drops the queued one."""
    first = speech("The quick brown fox jumps over the lazy dog.")
    long = speech("Streaming avatars need steady latency, and a voice agent needs to know "
                  "exactly how much of its answer the user heard before an interruption.")
    rate = 24000
    async with running_server(lipsync_settings, PORT + 1) as (gateway, base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            sid, token = await new_session(http)
            receiver = await connect_peer(http, sid, token)
            url = f"{base.replace('http', 'ws')}/v1/sessions/{sid}/stream?rate={rate}&token={token}"
            async with websockets.connect(url) as ws:
                data = pcm16(resample(first, 16000, rate))
                for i in range(0, len(data), 3001):  # odd sizes: samples split across messages
                    await ws.send(data[i:i + 3001])
                await ws.send(json.dumps({"type": "flush"}))
                started = await next_event(ws, "playback.started")
                heard_from = receiver.received.audio_samples
                finished = await next_event(ws, "playback.finished")
                assert finished["utterance_id"] == started["utterance_id"]
                assert finished["interrupted"] is False
                expected_ms = round(len(first) * 1000 / 16000)
                assert abs(finished["played_ms"] - expected_ms) <= 2, (finished, expected_ms)
                await asyncio.sleep(0.3)
                heard = receiver.received.audio_signal()[heard_from:]
                assert abs(loud_ms(heard, receiver.received.audio_rate) - loud_ms(first, 16000)) <= 80

                # a long utterance, then one queued behind it; clear while the first plays
                await ws.send(pcm16(resample(long, 16000, rate)))
                await ws.send(json.dumps({"type": "flush"}))
                await ws.send(pcm16(resample(first, 16000, rate)))
                await ws.send(json.dumps({"type": "flush"}))
                playing = await next_event(ws, "playback.started")
                heard_from = receiver.received.audio_samples
                await asyncio.sleep(1.5)
                await ws.send(json.dumps({"type": "clear"}))
                cleared_at = time.monotonic()
                ends = [await next_event(ws, "playback.finished") for _ in range(2)]
                assert time.monotonic() - cleared_at < 0.5
                cut = next(e for e in ends if e["utterance_id"] == playing["utterance_id"])
                queued = next(e for e in ends if e["utterance_id"] != playing["utterance_id"])
                assert cut["interrupted"] is True and queued == {
                    "type": "playback.finished", "utterance_id": queued["utterance_id"],
                    "played_ms": 0, "interrupted": True}
                assert cut["played_ms"] % 40 == 0  # cut on a frame: whole 20 ms chunks
                assert 1300 <= cut["played_ms"] <= 1900, cut
                await asyncio.sleep(0.5)
                heard = receiver.received.audio_signal()[heard_from:]
                rate_out = receiver.received.audio_rate
                # what the peer heard of the cut utterance is what played_ms says
                assert abs(loud_ms(heard, rate_out) - loud_ms(long[: cut["played_ms"] * 16], 16000)) <= 80

                # the session goes away: the socket says so and closes
                r = await http.delete(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 204
                closed = await next_event(ws, "session.closed", 5)
                assert closed["reason"] == "closed by client"
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
            await receiver.close()


async def test_a_full_buffer_holds_the_stream_back_and_drops_nothing(lipsync_settings):
    settings = variant(lipsync_settings, pipeline={"audio_buffer_s": 1.5})
    clip = np.concatenate([speech("Hello there, how are you today?")] * 3)  # ~4.5 s > 1.5 s buffer
    async with running_server(settings, PORT + 2) as (gateway, base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            sid, token = await new_session(http)
            receiver = await connect_peer(http, sid, token)
            url = f"{base.replace('http', 'ws')}/v1/sessions/{sid}/stream?token={token}"
            queued: list[float] = []

            async def watch() -> None:
                while True:
                    r = await http.get(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"})
                    queued.append(r.json()["queued_audio_s"])
                    await asyncio.sleep(0.1)

            watcher = asyncio.create_task(watch())
            async with websockets.connect(url) as ws:
                data = pcm16(clip)
                for i in range(0, len(data), 6400):  # 200 ms messages, as fast as TCP takes them
                    await ws.send(data[i:i + 6400])
                await ws.send(json.dumps({"type": "flush"}))
                finished = await next_event(ws, "playback.finished", 20)
            watcher.cancel()
            await receiver.close()
    assert finished["interrupted"] is False
    assert abs(finished["played_ms"] - len(clip) * 1000 // 16000) <= 2  # nothing dropped
    assert max(queued) <= 1.5 + 0.05 and max(queued) > 1.0, queued  # bounded, and it did fill


async def test_a_bounded_read_ahead_refuses_a_flood_and_plays_what_it_read(lipsync_settings):
    """Behind a proxy that reads without backpressure (Serve), the socket reads eagerly: past
    `read_ahead_s` of audio waiting for the buffer it says 'too_far_ahead' and closes with
    1008; the audio it read before still plays, to the end."""
    settings = variant(lipsync_settings, pipeline={"audio_buffer_s": 1.5})
    clip = np.concatenate([speech("Hello there, how are you today?")] * 4)  # ~6 s
    async with running_server(settings, PORT + 4, stream_read_ahead_s=1.0) as (gateway, base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            sid, token = await new_session(http)
            auth = {"Authorization": f"Bearer {token}"}
            receiver = await connect_peer(http, sid, token)
            heard_from = receiver.received.audio_samples
            url = f"{base.replace('http', 'ws')}/v1/sessions/{sid}/stream?token={token}"
            async with websockets.connect(url) as ws:
                data = pcm16(clip)

                async def flood() -> None:
                    with contextlib.suppress(websockets.ConnectionClosed):
                        for i in range(0, len(data), 3200):  # 100 ms messages, fast
                            await ws.send(data[i:i + 3200])
                            await asyncio.sleep(0.005)
                        await ws.send(json.dumps({"type": "flush"}))

                sender = asyncio.create_task(flood())
                refused = await next_event(ws, "error", 20)
                assert refused["error"] == "too_far_ahead", refused
                await asyncio.wait_for(ws.wait_closed(), 5)
                assert ws.close_code == 1008
                await sender
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:  # what was read plays out
                state = (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()
                if state["queued_audio_s"] == 0 and not state.get("speaking"):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            heard = receiver.received.audio_signal()[heard_from:]
            heard_ms = loud_ms(heard, receiver.received.audio_rate)
            await receiver.close()
    clip_loud_per_s = loud_ms(clip, 16000) / (len(clip) / 16000)
    # buffer 1.5 s + read-ahead 1.0 s (+ one message) of the clip played, not less, not all
    assert (1.5 + 0.8) * clip_loud_per_s - 150 <= heard_ms <= (1.5 + 1.2) * clip_loud_per_s + 150, heard_ms


async def test_http_interrupt_cuts_the_streamed_utterance_and_more_audio_starts_anew(lipsync_settings):
    clip = speech("Streaming avatars need steady latency, even when they are interrupted.")
    async with running_server(lipsync_settings, PORT + 3) as (_, base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            sid, token = await new_session(http)
            auth = {"Authorization": f"Bearer {token}"}
            receiver = await connect_peer(http, sid, token)
            url = f"{base.replace('http', 'ws')}/v1/sessions/{sid}/stream?token={token}"
            async with websockets.connect(url) as ws:
                await ws.send(pcm16(clip))  # no flush yet: the utterance stays open
                started = await next_event(ws, "playback.started")
                await asyncio.sleep(0.8)
                cut = (await http.post(f"/v1/sessions/{sid}/interrupt", headers=auth)).json()
                assert cut["utterance_id"] == started["utterance_id"] and cut["interrupted"] is True
                finished = await next_event(ws, "playback.finished")
                assert finished["utterance_id"] == cut["utterance_id"]
                assert (finished["played_ms"], finished["interrupted"]) == (cut["played_ms"], True)
                await ws.send(pcm16(clip[:16000]))
                await ws.send(json.dumps({"type": "flush"}))
                again = await next_event(ws, "playback.started")
                assert again["utterance_id"] != started["utterance_id"]
                done = await next_event(ws, "playback.finished")
                assert done["utterance_id"] == again["utterance_id"] and done["interrupted"] is False
                assert abs(done["played_ms"] - 1000) <= 2
            await receiver.close()
