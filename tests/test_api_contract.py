"""The HTTP API's contract: documented status codes and error bodies, all-or-nothing uploads
(413 / 429 leave nothing queued), truncated WAVs, the API key for session creation, the offer
timeout and the INFO log lines of session create/close. Real HTTP through the ASGI app over
the real pipeline (LocalPipeline)."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import numpy as np
import pytest

from ray_lipsync.api.http_errors import ERROR_DESCRIPTIONS
from ray_lipsync.api.routes import build_api
from helpers import connect, make, new_session, pieces, variant
from speech import to_wav_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"




async def queued(client: httpx.AsyncClient, sid: str, auth: dict) -> float:
    return (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()["queued_audio_s"]


def test_openapi_documents_error_codes_with_the_error_body(lipsync_settings):
    schema = build_api(lipsync_settings, None).openapi()  # type: ignore[arg-type]
    text = str(schema)
    assert "HTTPValidationError" not in text and "ValidationError" not in schema["components"]["schemas"]
    expected = {
        ("post", "/v1/sessions"): {400, 401, 403, 404, 503},
        ("post", "/v1/sessions/{session_id}/offer"): {400, 401, 403, 404, 410},
        ("post", "/v1/sessions/{session_id}/audio"): {400, 401, 403, 404, 410, 413, 415, 422, 429},
        ("post", "/v1/sessions/{session_id}/speak"): {400, 401, 403, 404, 410, 413, 429},
        ("post", "/v1/sessions/{session_id}/interrupt"): {401, 403, 404, 410},
        ("get", "/v1/sessions/{session_id}"): {401, 403, 404},
        ("delete", "/v1/sessions/{session_id}"): {401, 403, 404},
        ("get", "/v1/sessions/{session_id}/events"): {401, 403, 404},
    }
    for (method, path), codes in expected.items():
        responses = schema["paths"][path][method]["responses"]
        documented = {int(c) for c in responses if c[0] in "45"}
        assert codes <= documented, (method, path, documented)
        for code in documented:
            ref = responses[str(code)]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody") and code in ERROR_DESCRIPTIONS
    assert set(schema["components"]["schemas"]["ErrorBody"]["required"]) == {"error", "detail"}


async def test_error_bodies_for_405_404_and_validation(lipsync_settings):
    gateway, client = make(lipsync_settings)
    async with client:
        r = await client.put("/v1/sessions")
        assert r.status_code == 405 and r.json() == {"error": "method_not_allowed",
                                                    "detail": "Method Not Allowed"}
        r = await client.get("/v1/nothing-here")
        assert r.status_code == 404 and set(r.json()) == {"error", "detail"}
        r = await client.post("/v1/sessions", json={"avatar": 5})
        assert r.status_code == 400 and r.json()["error"] == "bad_request"
        await gateway.shutdown()


async def test_uploads_are_queued_whole_or_not_at_all(lipsync_settings):
    gateway, client = make(variant(lipsync_settings, pipeline={"audio_buffer_s": 2.0}))
    async with client:
        sid, auth = await new_session(client)
        url = f"/v1/sessions/{sid}/audio"
        wav = {**auth, "Content-Type": "audio/wav"}
        tone = (0.3 * np.sin(np.arange(16000 * 3) * 0.05)).astype(np.float32)
        # longer than the buffer can ever hold: 413 (known length, and chunked), nothing queued
        r = await client.post(url, content=to_wav_bytes(tone), headers=wav)
        assert r.status_code == 413 and "split" in r.json()["detail"], r.text
        r = await client.post(url, content=pieces(to_wav_bytes(tone)), headers=wav)
        assert r.status_code == 413
        assert await queued(client, sid, auth) == 0
        # fits: accepted whole; a second one that does not fit now: 429 + Retry-After, nothing queued
        r = await client.post(url, content=to_wav_bytes(tone[:24000]), headers=wav)
        assert r.status_code == 202 and r.json()["duration_ms"] == 1500
        # presented no sooner than the adaptive D's floor after it came, at most its upper bound
        # (on the first frame boundary after it: + a frame)
        pipeline = lipsync_settings.pipeline
        assert pipeline.playout_min_ms - 1 <= r.json()["starts_in_ms"] <= pipeline.playout_delay_ms + 41, r.text
        before = await queued(client, sid, auth)
        r = await client.post(url, content=pieces(to_wav_bytes(tone[:24000])), headers=wav)
        assert r.status_code == 429 and r.json()["error"] == "backpressure"
        assert 1 <= int(r.headers["Retry-After"]) <= 2
        assert await queued(client, sid, auth) <= before  # the rejected upload left nothing
        # /speak longer than the buffer can ever hold: 413
        r = await client.post(f"/v1/sessions/{sid}/speak", headers=auth,
                              json={"text": "This sentence is far too long to fit into a two "
                                            "second speech buffer, whatever the server does."})
        assert r.status_code == 413
        # a WAV whose data chunk is shorter than its header says: 422, nothing queued
        await client.post(f"/v1/sessions/{sid}/interrupt", headers=auth)
        whole = to_wav_bytes(tone[:8000])
        r = await client.post(url, content=whole[: len(whole) - 1000], headers=wav)
        assert r.status_code == 422 and "truncated" in r.json()["detail"]
        assert await queued(client, sid, auth) == 0
        await gateway.shutdown()


async def test_api_key_guards_session_creation(lipsync_settings):
    gateway, client = make(variant(lipsync_settings, serve={"api_keys": ["k-one", "k-two"]}))
    async with client:
        r = await client.post("/v1/sessions", json={})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        r = await client.post("/v1/sessions", json={}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        r = await client.post("/v1/sessions", json={}, headers={"Authorization": "Bearer k-two"})
        assert r.status_code == 201
        assert gateway.session_count == 1
        await gateway.shutdown()


async def test_offer_timeout_frees_sessions_and_create_close_are_logged(lipsync_settings, caplog):
    caplog.set_level(logging.INFO, logger="ray_lipsync")
    gateway, client = make(variant(lipsync_settings, serve={"offer_timeout_s": 0.4}))
    async with client:
        waiting, _ = await new_session(client)
        connected, auth = await new_session(client)
        receiver = await connect(client, connected, auth)
        deadline = time.monotonic() + 5
        while waiting in gateway.session_ids() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert gateway.session_ids() == [connected]  # the one with a peer stays
        await client.delete(f"/v1/sessions/{connected}", headers=auth)
        await receiver.close()
        await gateway.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"session {waiting} created (avatar default)" in lines
    assert f"session {waiting} closed: no WebRTC offer within 0.4 s" in lines
    assert f"session {connected} closed: closed by client" in lines

