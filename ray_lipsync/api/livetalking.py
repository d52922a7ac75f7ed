"""LiveTalking-compatible routes (unauthenticated; only with serve.livetalking_compat).

Same request and response shapes as LiveTalking's app.py so its web clients work unchanged:
POST /offer {sdp,type} -> {sdp,type,sessionid}; /human {sessionid,text,type,interrupt};
/humanaudio multipart (sessionid, file); /interrupt_talk and /is_speaking {sessionid};
/set_audiotype {sessionid, audiotype, reinit}: LiveTalking's custom states, numbered as its
custom_config numbers them: audiotype 0 or 1 is the avatar's own idle cycle, 2 its first clip
(`avatar prepare --clip`, in the order given), 3 the second, ... The clip becomes the silent
state (POST /v1/sessions/{id}/state) and loops until another audiotype is set; unlike
LiveTalking's custom videos our clips carry no audio, so nothing ends them by itself.
`reinit` is accepted and ignored: a clip is entered at its frame most like the one shown.
Replies are {"code": 0, ...} on success and {"code": -1, "msg": ...} on failure, as there.
Session ids are integers (its clients parseInt them) that embed the home gateway's code.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ray_lipsync.api.client import GatewayAPI
from ray_lipsync.api.uploads import parse_form, push_decoded
from ray_lipsync.config import Settings
from ray_lipsync.errors import LipsyncError, UnknownClip

logger = logging.getLogger(__name__)


def _fail(message: str, status: int = 200) -> JSONResponse:
    return JSONResponse({"code": -1, "msg": message}, status)


async def _json(request: Request) -> dict[str, Any]:
    try:
        params = json.loads(await request.body())
    except ValueError as error:
        raise ValueError(f"request body is not valid JSON: {error}") from None
    if not isinstance(params, dict):
        raise ValueError("request body must be a JSON object")
    return params


def _session(params: dict[str, Any]) -> int:
    try:
        return int(params.get("sessionid", 0))
    except (TypeError, ValueError):
        raise ValueError("sessionid must be the integer returned by /offer") from None


def livetalking_routes(settings: Settings, client: GatewayAPI) -> APIRouter:
    """The LiveTalking routes over `client` (no tokens, documented as unauthenticated)."""
    api = APIRouter(tags=["livetalking (unauthenticated)"])

    async def guarded(request: Request, action) -> JSONResponse:  # noqa: ANN001
        try:
            return JSONResponse(await action())
        except ValueError as error:
            return _fail(str(error), 400)
        except LipsyncError as error:
            from ray_lipsync.api.http_errors import error_response

            status = error_response(error).status_code
            return _fail(str(error), status)

    @api.post("/offer")
    async def offer(request: Request) -> JSONResponse:
        async def run() -> dict:
            params = await _json(request)
            if params.get("type", "offer") != "offer" or not isinstance(params.get("sdp"), str):
                raise ValueError("expected {\"sdp\": <offer SDP>, \"type\": \"offer\"}")
            created = await client.create_session(avatar=settings.avatar.name)
            sessionid = created["compat_id"]
            try:
                answer = await client.offer(session_id=sessionid, token=None,
                                           sdp=params["sdp"], type="offer", compat=True)
            except Exception:
                await client.close(session_id=sessionid, compat=True)
                raise
            return {"sdp": answer["sdp"], "type": answer["type"], "sessionid": sessionid}

        return await guarded(request, run)

    @api.post("/human")
    async def human(request: Request) -> JSONResponse:
        async def run() -> dict:
            params = await _json(request)
            sessionid = _session(params)
            if params.get("interrupt"):
                await client.interrupt(session_id=sessionid, compat=True)
            kind = params.get("type", "echo")
            if kind == "chat":
                raise ValueError("type 'chat' needs an LLM, which this server does not run; "
                                 "send type 'echo' with the text to speak")
            if kind != "echo":
                raise ValueError(f"unknown type {kind!r}; use 'echo'")
            text = str(params.get("text", "")).strip()
            if text:
                from ray_lipsync.api.routes import synthesize

                samples = await synthesize(request, text)
                await push_decoded(client, settings, session_id=sessionid, token=None, samples=samples,
                                   compat=True)
            return {"code": 0, "msg": "ok", "data": "ok"}

        return await guarded(request, run)

    @api.post("/humanaudio")
    async def humanaudio(request: Request) -> JSONResponse:
        async def run() -> dict:
            body = await request.body()
            if len(body) > settings.audio.max_bytes:
                from ray_lipsync.errors import AudioTooLarge

                raise AudioTooLarge(f"upload exceeds {settings.audio.max_bytes} bytes")
            form = parse_form(request.headers.get("content-type", ""), body)
            if "file" not in form:
                raise ValueError("multipart field 'file' (the audio file) is missing")
            sessionid = _session({"sessionid": form.get("sessionid", (b"0", None))[0].decode()})
            from ray_lipsync.audio import decode_audio

            samples = decode_audio(form["file"][0], settings.audio)
            await push_decoded(client, settings, session_id=sessionid, token=None, samples=samples,
                               compat=True)
            return {"code": 0, "msg": "ok"}

        return await guarded(request, run)

    @api.post("/interrupt_talk")
    async def interrupt_talk(request: Request) -> JSONResponse:
        async def run() -> dict:
            params = await _json(request)
            await client.interrupt(session_id=_session(params), compat=True)
            return {"code": 0, "msg": "ok"}

        return await guarded(request, run)

    @api.post("/set_audiotype")
    async def set_audiotype(request: Request) -> JSONResponse:
        async def run() -> dict:
            params = await _json(request)
            sessionid = _session(params)
            audiotype = params.get("audiotype")
            if isinstance(audiotype, bool) or not isinstance(audiotype, int):
                raise ValueError("audiotype must be an integer: 0 or 1 for the idle cycle, "
                                 "2 for the avatar's first clip, 3 for the second, ...")
            clips = (await client.status(session_id=sessionid, compat=True))["clips"]
            if not 0 <= audiotype <= len(clips):
                raise UnknownClip(f"audiotype {audiotype} names no clip: this avatar has "
                                  f"{len(clips) - 1} clip(s), audiotype 2..{len(clips)}")
            state = clips[max(audiotype - 1, 0)]  # clips[0] is "idle"
            await client.set_avatar_state(session_id=sessionid, state=state, compat=True)
            return {"code": 0, "data": "ok"}

        return await guarded(request, run)

    @api.post("/is_speaking")
    async def is_speaking(request: Request) -> JSONResponse:
        async def run() -> dict:
            params = await _json(request)
            state = await client.status(session_id=_session(params), compat=True)
            return {"code": 0, "data": bool(state["speaking"])}

        return await guarded(request, run)

    return api
