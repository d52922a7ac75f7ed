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

from ray_lipsync.api.client import GatewayAPI
from ray_lipsync.config import Settings
from ray_lipsync.errors import AudioTooLarge, MalformedAudio

PUSH_SAMPLES = 3200  # push to the session in pieces of >= 200 ms
HOLD_SAMPLES = 320  # kept back until the upload ends, so the final push is never empty


def _too_large(settings: Settings) -> AudioTooLarge:
    return AudioTooLarge(f"audio upload exceeds {settings.audio.max_bytes} bytes; send a "
                         "shorter clip or split it into several uploads")


async def stream_upload(client: GatewayAPI, settings: Settings, *, session_id: str | int,
                        token: str | None, content_type: str | None,
                        body: AsyncIterator[bytes], interrupt: bool = False,
                        compat: bool = False) -> dict[str, Any]:
    """Decode `body` incrementally and push it as one utterance: {utterance_id, duration_ms}.

    Pieces go out with final=False while the upload continues; a tail of HOLD_SAMPLES is
    kept back so that the last push (final=True) is never empty. If the upload fails midway
    (too large, malformed) the part already pushed is closed as a finished utterance.
    """
    from ray_lipsync.audio import open_stream, parse_content_type

    decoder = open_stream(parse_content_type(content_type or ""), settings.audio)
    received = 0
    pending = _Pending()
    pushed = 0
    result: dict[str, Any] | None = None

    async def push(samples: np.ndarray, final: bool) -> None:
        nonlocal result, pushed
        result = await client.push_audio(session_id=session_id, token=token, samples=samples,
            utterance_id=result["utterance_id"] if result else None,
            interrupt=interrupt and result is None, final=final, compat=compat)
        pushed += len(samples)

    try:
        async for piece in body:
            received += len(piece)
            if received > settings.audio.max_bytes:
                raise _too_large(settings)
            pending.add(decoder.feed(piece))
            if pending.size >= PUSH_SAMPLES + HOLD_SAMPLES:
                await push(pending.take(pending.size - HOLD_SAMPLES), final=False)
        pending.add(decoder.close())
    except Exception:
        if result is not None and pending.size:  # close the streamed utterance, then fail
            await push(pending.take(pending.size), final=True)
        raise
    if pending.size:
        await push(pending.take(pending.size), final=True)
    if result is None:
        raise MalformedAudio("the upload held no audio samples; send a non-empty WAV or L16 body")
    return {"utterance_id": result["utterance_id"], "duration_ms": pushed * 1000 // 16000}


class _Pending:
    """Decoded samples not pushed yet."""

    def __init__(self) -> None:
        self._pieces: list[np.ndarray] = []
        self.size = 0

    def add(self, samples: np.ndarray) -> None:
        if len(samples):
            self._pieces.append(samples)
            self.size += len(samples)

    def take(self, n: int) -> np.ndarray:
        """The first `n` samples (the rest stays pending)."""
        joined = np.concatenate(self._pieces) if len(self._pieces) > 1 else self._pieces[0]
        head, rest = joined[:n], joined[n:]
        self._pieces, self.size = ([rest] if len(rest) else []), len(rest)
        return head


async def push_decoded(client: GatewayAPI, *, session_id: str | int, token: str | None,
                       samples: np.ndarray, interrupt: bool = False,
                       compat: bool = False) -> dict[str, Any]:
    """Push already-decoded samples (TTS, whole files) as one utterance."""
    if len(samples) == 0:
        raise MalformedAudio("nothing to say: the audio is empty")
    result = await client.push_audio(session_id=session_id, token=token,
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
