"""Turning HTTP request bodies into 16 kHz samples pushed to a session, as they arrive.

`stream_upload` decodes a (possibly chunked) WAV / L16 body piece by piece and pushes samples
to the session while the upload continues; the size limit is enforced while streaming.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from ray_lipsync.api.client import GatewayClient
from ray_lipsync.config import Settings
from ray_lipsync.errors import AudioTooLarge, MalformedAudio

PUSH_SAMPLES = 3200  # push to the session in pieces of >= 200 ms


def _too_large(settings: Settings) -> AudioTooLarge:
    return AudioTooLarge(f"audio upload exceeds {settings.audio.max_bytes} bytes; send a "
                         "shorter clip or split it into several uploads")


async def stream_upload(client: GatewayClient, settings: Settings, *, session_id: str | int,
                        token: str | None, content_type: str | None,
                        body: AsyncIterator[bytes], interrupt: bool = False,
                        compat: bool = False) -> dict[str, Any]:
    """Decode `body` incrementally and push it as one utterance: {utterance_id, duration_ms}."""
    from ray_lipsync.audio import open_stream, parse_content_type

    decoder = open_stream(parse_content_type(content_type or ""), settings.audio)
    received = 0
    pending: list[np.ndarray] = []
    pending_n = 0
    pushed = 0
    result: dict[str, Any] | None = None

    async def push(samples: np.ndarray) -> None:
        nonlocal result, pushed
        result = await client.call(
            "push_audio", session_id=session_id, token=token, samples=samples,
            utterance_id=result["utterance_id"] if result else None,
            interrupt=interrupt and result is None, compat=compat)
        pushed += len(samples)

    async for piece in body:
        received += len(piece)
        if received > settings.audio.max_bytes:
            raise _too_large(settings)
        samples = decoder.feed(piece)
        if len(samples):
            pending.append(samples)
            pending_n += len(samples)
        if pending_n >= PUSH_SAMPLES:
            await push(np.concatenate(pending))
            pending, pending_n = [], 0
    tail = decoder.close()
    if len(tail):
        pending.append(tail)
    if pending and sum(len(p) for p in pending):
        await push(np.concatenate(pending))
    if result is None:
        raise MalformedAudio("the upload held no audio samples; send a non-empty WAV or L16 body")
    return {"utterance_id": result["utterance_id"], "duration_ms": pushed * 1000 // 16000}


async def push_decoded(client: GatewayClient, *, session_id: str | int, token: str | None,
                       samples: np.ndarray, interrupt: bool = False,
                       compat: bool = False) -> dict[str, Any]:
    """Push already-decoded samples (TTS, whole files) as one utterance."""
    if len(samples) == 0:
        raise MalformedAudio("nothing to say: the audio is empty")
    result = await client.call("push_audio", session_id=session_id, token=token,
                               samples=samples, interrupt=interrupt, compat=compat)
    return {"utterance_id": result["utterance_id"], "duration_ms": len(samples) * 1000 // 16000}


def parse_form(content_type: str, body: bytes) -> dict[str, tuple[bytes, str | None]]:
    """multipart/form-data fields as {name: (payload, content type or None)} (stdlib parser)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ValueError("expected a multipart/form-data body")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise ValueError("malformed multipart/form-data body")
    fields: dict[str, tuple[bytes, str | None]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            payload = part.get_payload(decode=True) or b""
            ctype = part.get("content-type")
            fields[str(name)] = (payload, str(ctype) if ctype else None)
    return fields
