"""A session over real HTTP with a real WebRTC receiver: what the fault tests and the
failover benchmark drive (`Talker`), and speech to keep it talking (`long_speech`)."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
from speech import silence, speech, to_wav_bytes

from ray_lipsync.webrtc.client import ReceiverClient

_CLIPS: dict[float, np.ndarray] = {}


def long_speech(seconds: float) -> np.ndarray:
    """About `seconds` of continuous TTS speech (a phrase repeated, 0.3 s pauses)."""
    if seconds not in _CLIPS:
        phrase = np.concatenate([speech("Every stage of the pipeline survives its own death."), silence(0.3)])
        _CLIPS[seconds] = np.tile(phrase, int(np.ceil(seconds * 16000 / len(phrase))))[: int(seconds * 16000)]
    return _CLIPS[seconds]


class Talker:
    """A session over real HTTP with a real WebRTC receiver consuming its frames."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.receiver = ReceiverClient(ice_servers=[], keep_audio=False)

    async def open(self) -> "Talker":
        r = await self.http.post("/v1/sessions", json={})
        assert r.status_code == 201, r.text
        body = r.json()
        self.sid, self.auth = body["session_id"], {"Authorization": f"Bearer {body['token']}"}
        r = await self.http.post(f"/v1/sessions/{self.sid}/offer", json=await self.receiver.offer(),
                                 headers=self.auth)
        assert r.status_code == 200, r.text
        await self.receiver.accept(r.json())
        await self.receiver.wait_first_video(timeout=20)
        return self

    async def say(self, seconds: float) -> float:
        """Queue about `seconds` of speech; returns when its last frame is due (monotonic)."""
        clip = long_speech(seconds)
        r = await self.http.post(f"/v1/sessions/{self.sid}/audio", content=to_wav_bytes(clip),
                                 headers={**self.auth, "Content-Type": "audio/wav"})
        assert r.status_code == 202, r.text
        return time.monotonic() + len(clip) / 16000 + 1.0

    async def state(self) -> dict:
        r = await self.http.get(f"/v1/sessions/{self.sid}", headers=self.auth)
        assert r.status_code == 200, r.text
        return r.json()

    async def close(self) -> None:
        await self.http.delete(f"/v1/sessions/{self.sid}", headers=self.auth)
        await self.receiver.close()


async def until(predicate, timeout: float, step: float = 0.25):
    """Poll the coroutine function `predicate` until it returns a true value (returned) or
    `timeout` passes (its last value is returned)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)
