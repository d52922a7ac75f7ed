"""Turning HTTP request bodies into 16 kHz samples queued on a session, all or nothing.

`stream_upload` decodes a (possibly chunked) body piece by piece as it arrives (the size
limits are enforced while it streams) and queues it as one utterance once it is complete and
valid: a rejected upload (413, 415, 422, 429) leaves nothing on the session, so a client that
retries after Retry-After never duplicates speech. Live streaming goes over the WebSocket
(ray_lipsync.api.stream), whose speech plays while it arrives.

The 413 rule: one utterance can never be longer than the session's speech buffer
(`pipeline.audio_buffer_s`) nor `audio.max_seconds`, whichever is smaller; below that, a
buffer too full to take it answers 429 with the seconds until it fits as Retry-After.
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

PIPELINE_RATE = 16000


def longest_utterance_s(settings: Settings) -> float:
    """The longest audio one upload or /speak may hold (longer answers 413)."""
    return min(settings.audio.max_seconds, settings.pipeline.audio_buffer_s)


def _too_large(settings: Settings) -> AudioTooLarge:
    return AudioTooLarge(f"audio upload exceeds {settings.audio.max_bytes} bytes; send a "
                         "shorter clip or split it into several uploads")


def check_fits(settings: Settings, samples: int) -> None:
    """AudioTooLarge (413) when `samples` at 16 kHz could never be queued on a session."""
    seconds, limit = samples / PIPELINE_RATE, longest_utterance_s(settings)
    if seconds > limit:
        raise AudioTooLarge(
            f"speech of {seconds:.1f} s is longer than a session can ever queue ({limit:g} s: "
            f"pipeline.audio_buffer_s {settings.pipeline.audio_buffer_s:g}, audio.max_seconds "
            f"{settings.audio.max_seconds:g}); split it, or stream it over the WebSocket")


async def stream_upload(client: GatewayAPI, settings: Settings, *, session_id: str | int,
                        token: str | None, content_type: str | None,
                        body: AsyncIterator[bytes], interrupt: bool = False,
                        compat: bool = False) -> dict[str, Any]:
    """Decode `body` as it arrives, then queue it whole: {utterance_id, duration_ms, starts_in_ms}."""
    from ray_lipsync.audio import open_stream, parse_content_type

    limits = settings.audio.model_copy(update={"max_seconds": longest_utterance_s(settings)})
    decoder = open_stream(parse_content_type(content_type or ""), limits)
    received = 0
    pending = _Pending()
    async for piece in body:
        received += len(piece)
        if received > settings.audio.max_bytes:
            raise _too_large(settings)
        pending.add(decoder.feed(piece))
    pending.add(decoder.close())
    if not pending.size:
        raise MalformedAudio("the upload held no audio samples; send a non-empty WAV or L16 body")
    return await push_decoded(client, settings, session_id=session_id, token=token,
                              samples=pending.take(pending.size), interrupt=interrupt,
                              compat=compat)


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


async def push_decoded(client: GatewayAPI, settings: Settings, *, session_id: str | int,
                       token: str | None, samples: np.ndarray, interrupt: bool = False,
                       compat: bool = False) -> dict[str, Any]:
    """Queue already-decoded samples (TTS, whole files) as one utterance, all or nothing."""
    if len(samples) == 0:
        raise MalformedAudio("nothing to say: the audio is empty")
    check_fits(settings, len(samples))
    result = await client.push_audio(session_id=session_id, token=token,
                                     samples=samples, interrupt=interrupt, compat=compat)
    return {"utterance_id": result["utterance_id"], "duration_ms": len(samples) * 1000 // PIPELINE_RATE,
            "starts_in_ms": result["starts_in_ms"]}


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
