"""HTTP API over an in-process gateway (no Ray): every route and every error case.

The lip-sync pipeline is a small stand-in (`StubPipeline`, also used by test_serve.py in Ray
workers) with the Pipeline / Session interface, so these tests exercise the service layer.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
import wave
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from ray_lipsync.api.client import LocalClient
from ray_lipsync.api.gateway import Gateway, home_of
from ray_lipsync.api.routes import build_api
from ray_lipsync.config import Settings
from ray_lipsync.errors import AvatarNotFound, UnknownSession
from ray_lipsync.types import OutputFrame

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class StubUtterance:
    utterance_id: str
    start_frame: int
    end_frame: int
    duration_ms: int


@dataclass
class StubStats:
    session_id: str
    replica: str
    epoch: int
    speaking: bool
    frames_sent: int
    frames_dropped: int
    latency_ms_p50: float | None
    queued_audio_s: float


class StubSession:
    """Keeps pushed audio on a frame timeline; frames() yields one frame per 640 samples."""

    def __init__(self, session_id: str) -> None:
        self.session_id, self.epoch, self.closed = session_id, 0, False
        self.samples = 0
        self.utterances: dict[str, StubUtterance] = {}
        self._ids = itertools.count()

    async def push_audio(self, samples: np.ndarray, utterance_id: str | None = None) -> StubUtterance:
        start = self.samples // 640
        self.samples += len(samples)
        if utterance_id is None:
            utterance_id = f"u{next(self._ids)}"
            self.utterances[utterance_id] = StubUtterance(utterance_id, start, start, 0)
        u = self.utterances[utterance_id]
        u.end_frame, u.duration_ms = self.samples // 640, (self.samples - u.start_frame * 640) // 16
        return u

    async def interrupt(self) -> int:
        self.epoch += 1
        self.samples = 0
        return self.epoch

    async def close(self) -> None:
        self.closed = True

    def frames(self):
        async def gen():
            for k in range(max(1, self.samples // 640)):
                meta = {}
                for u in self.utterances.values():
                    if u.start_frame == k:
                        meta.setdefault("utterance_start", []).append(u.utterance_id)
                    if max(u.end_frame - 1, u.start_frame) == k:
                        meta.setdefault("utterance_end", []).append(u.utterance_id)
                yield OutputFrame(self.session_id, self.epoch, k, np.zeros((8, 8, 3), np.uint8),
                                  np.zeros(640, np.float32), 3600 * k, 0.04 * k, speech=True, meta=meta)
        return gen()

    def stats(self) -> StubStats:
        return StubStats(self.session_id, "stub-replica", self.epoch, self.samples > 0, 0, 0,
                         None, self.samples / 16000)


class StubPipeline:
    def __init__(self, settings: Settings) -> None:
        self._sessions: dict[str, StubSession] = {}
        self.closed: list[str] = []
        self._ids = itertools.count()

    async def create_session(self, avatar: str = "default", backend: str | None = None) -> StubSession:
        if avatar != "default":
            raise AvatarNotFound(f"no avatar {avatar!r}")
        session = StubSession(f"s{next(self._ids)}")
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str) -> StubSession:
        if session_id not in self._sessions:
            raise UnknownSession(session_id)
        return self._sessions[session_id]

    async def close_session(self, session_id: str) -> None:
        await self.get(session_id).close()
        del self._sessions[session_id]
        self.closed.append(session_id)

    def sessions(self) -> list[StubSession]:
        return list(self._sessions.values())

    async def shutdown(self) -> None:
        for sid in list(self._sessions):
            await self.close_session(sid)


class StubPeer:
    """Stands in for SessionPeer (WebRTC is E1's and tested there): sends every frame at once."""

    instances: list["StubPeer"] = []

    def __init__(self, session, *, ice_servers, on_frame_sent, on_closed) -> None:
        self.session, self.on_frame_sent, self.on_closed = session, on_frame_sent, on_closed
        self.connection_state, self.closed = "new", False
        StubPeer.instances.append(self)

    async def answer(self, sdp: str, type: str = "offer") -> dict:
        if not sdp.startswith("v=0"):
            raise ValueError("malformed SDP offer: it must start with 'v=0'")
        self.connection_state = "connected"
        return {"sdp": "v=0 answer", "type": "answer"}

    async def send_all(self) -> None:
        async for frame in self.session.frames():
            self.on_frame_sent(frame)

    async def close(self) -> None:
        self.closed, self.connection_state = True, "closed"


def make(settings: Settings | None = None):
    settings = settings or Settings()
    gateway = Gateway(settings, StubPipeline(settings), "gw1", peer_factory=StubPeer)
    app = build_api(settings, LocalClient(gateway))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return gateway, client


async def new_session(client: httpx.AsyncClient) -> tuple[str, dict]:
    r = await client.post("/v1/sessions", json={"avatar": "default"})
    assert r.status_code == 201, r.text
    body = r.json()
    return body["session_id"], {"Authorization": f"Bearer {body['token']}"}


def wav_bytes(seconds: float = 0.5, rate: int = 22050, channels: int = 2) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.repeat(tone[:, None], channels, axis=1).tobytes())
    return buf.getvalue()


def audio_module_ready() -> bool:
    try:
        from ray_lipsync.audio import open_stream, parse_content_type  # noqa: F401
    except ImportError:
        return False
    return True


needs_audio = pytest.mark.skipif(not audio_module_ready(), reason="ray_lipsync.audio not landed")


async def test_session_lifecycle_and_auth_errors():
    gateway, client = make()
    async with client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert "default" in (await client.get("/v1/avatars")).json()["avatars"]
        sid, auth = await new_session(client)
        assert home_of(sid) == ("gw1", None)
        state = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
        assert state["gateway"] == "gw1" and state["speaking"] is False
        assert (await client.get(f"/v1/sessions/{sid}")).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert (await client.get(f"/v1/sessions/{sid}", headers=bad)).status_code == 403
        assert (await client.get("/v1/sessions/gw1.unknown", headers=auth)).status_code == 404
        assert (await client.get("/v1/sessions/../x", headers=auth)).status_code == 404
        r = await client.post(f"/v1/sessions/{sid}/interrupt", headers=auth)
        assert r.json() == {"epoch": 1}
        assert (await client.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
        assert (await client.get(f"/v1/sessions/{sid}", headers=auth)).status_code == 404
        assert gateway.pipeline.closed == ["s0"] and gateway.session_count == 0


async def test_bad_json_and_bodies_are_400():
    _, client = make()
    async with client:
        r = await client.post("/v1/sessions", content=b"{not json",
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "bad_request"
        assert (await client.post("/v1/sessions", json={"avatar": ""})).status_code == 400
        assert (await client.post("/v1/sessions", json={"avatar": "nobody"})).status_code == 404
        sid, auth = await new_session(client)
        r = await client.post(f"/v1/sessions/{sid}/offer", json={"sdp": "garbage"}, headers=auth)
        assert r.status_code == 400 and "SDP" in r.json()["detail"]
        r = await client.post(f"/v1/sessions/{sid}/offer", json={"sdp": "v=0", "type": "answer"},
                              headers=auth)
        assert r.status_code == 400
        r = await client.post(f"/v1/sessions/{sid}/offer", json={"sdp": "v=0"}, headers=auth)
        assert r.json() == {"sdp": "v=0 answer", "type": "answer"}
        r = await client.post(f"/v1/sessions/{sid}/offer", json={"sdp": "v=0"}, headers=auth)
        assert r.status_code == 409


async def test_full_gateway_answers_503_with_retry_after():
    _, client = make(Settings(serve={"max_sessions": 2}))
    async with client:
        await new_session(client)
        await new_session(client)
        r = await client.post("/v1/sessions", json={})
        assert r.status_code == 503 and r.headers["Retry-After"].isdigit()


async def test_events_follow_sent_frames_and_close():
    gateway, client = make()
    async with client:
        sid, auth = await new_session(client)
        token = auth["Authorization"].split()[1]
        await gateway.push_audio(sid, token, np.zeros(6400, np.float32))
        await client.post(f"/v1/sessions/{sid}/offer", json={"sdp": "v=0"}, headers=auth)
        received: list[tuple[str, dict]] = []

        async def listen():
            async for item in gateway.events(sid, token, keepalive_s=5):
                received.append(item)

        task = asyncio.create_task(listen())
        await asyncio.sleep(0)
        await StubPeer.instances[-1].send_all()
        await gateway.close(sid, token)
        await asyncio.wait_for(task, 5)
        assert [e for e, _ in received] == ["utterance.start", "utterance.end", "session.closed"]
        assert received[0][1]["utterance_id"] == received[1][1]["utterance_id"] == "u0"
        assert StubPeer.instances[-1].closed
        snap = gateway.metrics_snapshot()
        assert snap["frames_sent"] == 10 and sum(snap["latency_buckets"]) == 10
        text = (await client.get("/metrics")).text
        assert 'lipsync_frames_sent_total{replica="gw1"} 10.0' in text
        assert "lipsync_frame_latency_ms_bucket" in text


async def test_idle_timeout_and_peer_disconnect_free_sessions():
    gateway, client = make(Settings(serve={"idle_timeout_s": 0.3}))
    async with client:
        sid, auth = await new_session(client)
        deadline = time.monotonic() + 5
        while gateway.session_count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gateway.session_count == 0 and gateway.pipeline.closed == ["s0"]
        sid, auth = await new_session(client)
        await client.post(f"/v1/sessions/{sid}/offer", json={"sdp": "v=0"}, headers=auth)
        StubPeer.instances[-1].on_closed()
        await asyncio.sleep(0.05)
        assert gateway.session_count == 0 and StubPeer.instances[-1].closed
        await gateway.shutdown()
        assert not gateway._closing and gateway._reaper is None


@needs_audio
async def test_audio_upload_and_errors():
    gateway, client = make(Settings(audio={"max_bytes": 100_000}))
    async with client:
        sid, auth = await new_session(client)
        url = f"/v1/sessions/{sid}/audio"

        async def chunks(data: bytes):
            for i in range(0, len(data), 4096):
                yield data[i:i + 4096]

        r = await client.post(url, content=chunks(wav_bytes(0.5)),
                              headers={**auth, "Content-Type": "audio/wav"})
        assert r.status_code == 202, r.text
        assert abs(r.json()["duration_ms"] - 500) <= 2
        pcm = (np.zeros(16000, "<i2")).tobytes()
        r = await client.post(url + "?interrupt=true", content=pcm,
                              headers={**auth, "Content-Type": "audio/L16;rate=16000;channels=1"})
        assert r.status_code == 202 and r.json()["duration_ms"] == 1000
        r = await client.post(url, content=b"hello", headers={**auth, "Content-Type": "text/plain"})
        assert r.status_code == 415
        r = await client.post(url, content=b"RIFF\x00\x00", headers={**auth, "Content-Type": "audio/wav"})
        assert r.status_code == 422
        r = await client.post(url, content=chunks(wav_bytes(3.0)),
                              headers={**auth, "Content-Type": "audio/wav"})
        assert r.status_code == 413


async def test_livetalking_routes_only_with_flag():
    _, off = make()
    async with off:
        assert (await off.post("/offer", json={"sdp": "v=0", "type": "offer"})).status_code == 404
        assert (await off.post("/is_speaking", json={"sessionid": 1})).status_code == 404
    gateway, client = make(Settings(serve={"livetalking_compat": True}))
    async with client:
        r = (await client.post("/offer", json={"sdp": "v=0", "type": "offer"})).json()
        sessionid = r["sessionid"]
        assert isinstance(sessionid, int) and r["type"] == "answer"
        assert (await client.post("/is_speaking", json={"sessionid": sessionid})).json() == \
            {"code": 0, "data": False}
        assert (await client.post("/interrupt_talk", json={"sessionid": sessionid})).json()["code"] == 0
        r = await client.post("/human", json={"sessionid": sessionid, "type": "chat", "text": "hi"})
        assert r.json()["code"] == -1
        r = await client.post("/is_speaking", json={"sessionid": 12345})
        assert r.status_code == 404 and r.json()["code"] == -1
        r = await client.post("/human", content=b"{", headers={"Content-Type": "application/json"})
        assert r.status_code == 400
