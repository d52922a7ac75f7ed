"""LiveTalking-compatible routes on the real pipeline (LocalPipeline + SessionPeer + TTS)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from ray_lipsync.webrtc.client import ReceiverClient
from helpers import loud_ms, make, variant
from speech import speech, to_wav_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def multipart(fields: dict[str, bytes], boundary: str = "lipsyncboundary") -> tuple[bytes, str]:
    parts = []
    for name, payload in fields.items():
        extra = '; filename="speech.wav"\r\nContent-Type: audio/wav' if name == "file" else ""
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'
                     .encode() + payload + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def wait_speaking(client, sessionid: int, expected: bool, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        r = await client.post("/is_speaking", json={"sessionid": sessionid})
        if r.json()["data"] is expected or time.monotonic() > deadline:
            return r.json()["data"]
        await asyncio.sleep(0.05)


async def test_livetalking_routes_only_with_flag(lipsync_settings):
    gateway, off = make(lipsync_settings)
    async with off:
        assert (await off.post("/offer", json={"sdp": "v=0", "type": "offer"})).status_code == 404
        assert (await off.post("/is_speaking", json={"sessionid": 1})).status_code == 404
    await gateway.shutdown()


async def test_livetalking_client_flow(lipsync_settings):
    """/offer -> /human (echo, TTS) -> /is_speaking -> /interrupt_talk -> /humanaudio."""
    gateway, client = make(variant(lipsync_settings, serve={"livetalking_compat": True}))
    receiver = ReceiverClient(ice_servers=[])
    async with client:
        r = await client.post("/offer", json={"sdp": "garbage", "type": "offer"})
        assert r.json()["code"] == -1 and r.status_code == 400 and gateway.session_count == 0
        r = (await client.post("/offer", json=await receiver.offer())).json()
        sessionid = r["sessionid"]
        assert isinstance(sessionid, int) and r["type"] == "answer"
        await receiver.accept(r)
        await receiver.wait_first_video(timeout=5)
        assert await wait_speaking(client, sessionid, False) is False

        r = await client.post("/human", json={"sessionid": sessionid, "type": "echo",
                                              "text": "Hello there, how are you today?"})
        assert r.json()["code"] == 0
        assert await wait_speaking(client, sessionid, True) is True
        r = await client.post("/interrupt_talk", json={"sessionid": sessionid})
        assert r.json()["code"] == 0
        assert await wait_speaking(client, sessionid, False, timeout=0.5) is False

        clip = speech("Streaming avatars need steady latency.")
        body, ctype = multipart({"sessionid": str(sessionid).encode(), "file": to_wav_bytes(clip)})
        heard_from = len(receiver.received.audio)
        r = await client.post("/humanaudio", content=body, headers={"Content-Type": ctype})
        assert r.json() == {"code": 0, "msg": "ok"}
        assert await wait_speaking(client, sessionid, True) is True
        assert await wait_speaking(client, sessionid, False, timeout=10) is False
        await asyncio.sleep(0.3)
        heard = receiver.received.audio[heard_from:]

        r = await client.post("/human", json={"sessionid": sessionid, "type": "chat", "text": "hi"})
        assert r.json()["code"] == -1
        r = await client.post("/is_speaking", json={"sessionid": 12345})
        assert r.status_code == 404 and r.json()["code"] == -1
        r = await client.post("/human", content=b"{", headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        body, ctype = multipart({"sessionid": str(sessionid).encode()})
        r = await client.post("/humanaudio", content=body, headers={"Content-Type": ctype})
        assert r.json()["code"] == -1 and "file" in r.json()["msg"]
    await gateway.shutdown()
    await receiver.close()
    got = loud_ms(np.concatenate(heard), receiver.received.audio_rate)
    # the whole clip arrives: within 100 ms of its 2.1 s (a loaded machine's receiver may
    # conceal a few late packets; 60 ms failed once in a full run)
    assert abs(got - loud_ms(clip, 16000)) <= 100, (got, loud_ms(clip, 16000))
