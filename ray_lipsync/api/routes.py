"""The FastAPI app (served by each gateway replica): /v1 session API, /healthz, /metrics, the page at `/` (OpenAPI at /docs).

`build_api(settings, client)` works over any GatewayAPI: in-process or through Ray Serve.
Errors map to HTTP codes in one place (http_errors.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Header, Query, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from ray_lipsync.api import models
from ray_lipsync.api.auth import bearer_token, check_api_key
from ray_lipsync.api.client import GatewayAPI
from ray_lipsync.api.events import format_sse
from ray_lipsync.api.http_errors import (
    ERROR_DESCRIPTIONS, SESSION_ERRORS, error_response, errors, install_error_handlers, openapi_schema,
)
from ray_lipsync.api.stream import StreamSocket, parse_rate
from ray_lipsync.api.metrics import render_prometheus
from ray_lipsync.api.uploads import push_decoded, stream_upload
from ray_lipsync.config import Settings
from ray_lipsync.errors import AudioInputError, AudioTooLarge, AvatarError, UnknownSession, UnsupportedMediaType

logger = logging.getLogger(__name__)

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{1,64}$")
SMALL_UPLOAD_BYTES = 64 * 1024  # uploads up to this size skip the separate token check


def check_session_id(session_id: str) -> str:
    if not SESSION_ID.match(session_id):
        raise UnknownSession(f"no session {session_id[:80]!r}; session ids look like "
                             "'<replica>.<random>' as returned by POST /v1/sessions")
    return session_id


def ice_links(servers: list[dict]) -> str:
    """The WHEP `Link` header of the session's STUN/TURN servers (rel="ice-server")."""
    links = []
    for server in servers:
        urls = server.get("urls") or []
        for url in [urls] if isinstance(urls, str) else urls:
            link = f'<{url}>; rel="ice-server"'
            if server.get("username") is not None:
                link += f'; username="{server["username"]}"; credential="{server.get("credential", "")}"; credential-type="password"'
            links.append(link)
    return ", ".join(links)


def list_avatars(settings: Settings) -> dict[str, list]:
    """{avatars, clips}: the default avatar plus every prepared avatar in the store and its
    shared location, and the clip names of each (read from the manifests in this node's
    store; an avatar not fetched here yet lists none)."""
    from ray_lipsync.avatar.store import AvatarStore, clip_ranges

    store = AvatarStore(settings.avatars_dir, settings.avatar_uri)
    try:
        names = store.names(include_shared=True)
    except AvatarError:
        logger.warning("listing the shared avatars failed; listing local ones", exc_info=True)
        names = store.names()
    avatars = sorted({settings.avatar.name, *names})
    clips: dict[str, list[str]] = {}
    for name in avatars:
        try:
            clips[name] = list(clip_ranges(store.manifest(name))) if store.exists(name) else []
        except AvatarError:
            logger.warning("avatar %r: unreadable manifest", name, exc_info=True)
            clips[name] = []
    return {"avatars": avatars, "clips": clips}


async def synthesize(request: Request, text: str) -> Any:
    """Offline TTS (one Synthesizer per app, created on first use, run in a thread)."""
    state = request.app.state
    if getattr(state, "synthesizer", None) is None:
        from ray_lipsync.tts import Synthesizer

        state.synthesizer = await asyncio.to_thread(Synthesizer)
    return await asyncio.to_thread(state.synthesizer.synthesize, text)


def session_routes(settings: Settings, client: GatewayAPI,
                   stream_read_ahead_s: float | None = None) -> APIRouter:
    """The /v1 session API."""
    api = APIRouter(prefix="/v1")

    @api.get("/avatars", response_model=models.AvatarList)
    async def avatars() -> dict:
        return await asyncio.to_thread(list_avatars, settings)

    @api.post("/sessions", status_code=201, response_model=models.SessionCreated,
              responses=errors(400, 401, 403, 404, 503))
    async def create_session(body: models.CreateSessionRequest,
                             authorization: str | None = Header(None)) -> dict:
        """401/403 only when the server requires an API key (`serve.api_keys`)."""
        if settings.serve.api_keys:
            check_api_key(settings.serve.api_keys, authorization)
        return await client.create_session(avatar=body.avatar, backend=body.backend)

    async def auth(session_id: str, authorization: str | None) -> str:
        token = bearer_token(authorization)
        await client.authorize(session_id=check_session_id(session_id), token=token)
        return token

    @api.post("/sessions/{session_id}/offer", response_model=models.SessionDescription,
              responses=errors(400, *SESSION_ERRORS, 410))
    async def offer(session_id: str, body: models.OfferRequest,
                    authorization: str | None = Header(None)) -> dict:
        token = await auth(session_id, authorization)
        return await client.offer(session_id=session_id, token=token,
                                 sdp=body.sdp, type=body.type, video_hold_ms=body.video_hold_ms)

    @api.post("/sessions/{session_id}/audio", status_code=202,
              response_model=models.UtteranceAccepted,
              responses=errors(400, *SESSION_ERRORS, 410, 413, 415, 422, 429),
              openapi_extra={"requestBody": {"content": {
                  "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                  "audio/L16;rate=16000;channels=1": {"schema": {"type": "string", "format": "binary"}},
              }}})
    async def audio(session_id: str, request: Request, interrupt: bool = False,
                    authorization: str | None = Header(None)) -> dict:
        length = request.headers.get("content-length")
        small = length is not None and length.isdigit() and int(length) <= SMALL_UPLOAD_BYTES
        if small:
            # A live talker's short piece: the push itself checks the token (one gateway call
            # instead of two); a bad body from a bad caller still answers 401/403 first.
            token = bearer_token(authorization)
            check_session_id(session_id)
        else:
            token = await auth(session_id, authorization)
        if length and length.isdigit() and int(length) > settings.audio.max_bytes:
            raise AudioTooLarge(f"audio upload of {length} bytes exceeds the limit of "
                                f"{settings.audio.max_bytes} bytes")
        try:
            return await stream_upload(client, settings, session_id=session_id, token=token,
                                       content_type=request.headers.get("content-type"),
                                       body=request.stream(), interrupt=interrupt)
        except AudioInputError:
            if small:
                await auth(session_id, authorization)
            raise

    @api.post("/sessions/{session_id}/speak", status_code=202,
              response_model=models.UtteranceAccepted,
              responses=errors(400, *SESSION_ERRORS, 410, 413, 429))
    async def speak(session_id: str, body: models.SpeakRequest, request: Request,
                    authorization: str | None = Header(None)) -> dict:
        token = await auth(session_id, authorization)
        samples = await synthesize(request, body.text)
        return await push_decoded(client, settings, session_id=session_id, token=token,
                                  samples=samples, interrupt=body.interrupt)

    @api.post("/sessions/{session_id}/interrupt", response_model=models.InterruptResult,
              responses=errors(*SESSION_ERRORS, 410))
    async def interrupt(session_id: str, authorization: str | None = Header(None)) -> dict:
        token = await auth(session_id, authorization)
        return await client.interrupt(session_id=session_id, token=token)

    @api.post("/sessions/{session_id}/state", response_model=models.AvatarStateResult,
              responses=errors(400, *SESSION_ERRORS, 410))
    async def avatar_state(session_id: str, body: models.AvatarStateRequest,
                           authorization: str | None = Header(None)) -> dict:
        """Set the silent state (`state`: a clip looped while the avatar does not speak,
        "idle" = the main video) and/or play an action clip once (`action`); 400
        `unknown_clip` for a name the avatar lacks. Speech goes on over the clip shown."""
        token = await auth(session_id, authorization)
        return await client.set_avatar_state(session_id=session_id, token=token,
                                             state=body.state, action=body.action)

    @api.get("/sessions/{session_id}", response_model=models.SessionState,
             responses=errors(*SESSION_ERRORS))
    async def status(session_id: str, authorization: str | None = Header(None)) -> dict:
        token = await auth(session_id, authorization)
        return await client.status(session_id=session_id, token=token)

    @api.delete("/sessions/{session_id}", status_code=204, responses=errors(*SESSION_ERRORS))
    async def close(session_id: str, authorization: str | None = Header(None)) -> Response:
        token = await auth(session_id, authorization)
        await client.close(session_id=session_id, token=token)
        return Response(status_code=204)

    @api.get("/sessions/{session_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}, **errors(*SESSION_ERRORS)})
    async def events(session_id: str, token: str | None = Query(None),
                     authorization: str | None = Header(None)) -> StreamingResponse:
        """Server-sent events; EventSource clients pass the token as `?token=`."""
        given = token or bearer_token(authorization)
        await client.authorize(session_id=check_session_id(session_id), token=given)

        async def body():
            async for event, data in client.events(session_id=session_id,
                                                   token=given, keepalive_s=15.0):
                yield format_sse(event, data)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.post("/sessions/{session_id}/recording", status_code=201, response_model=models.OutputState,
              responses=errors(*SESSION_ERRORS, 409))
    async def start_recording(session_id: str, authorization: str | None = Header(None)) -> dict:
        """Start recording the session to MP4 (H.264 + AAC, what a viewer is sent); a new
        recording replaces a finished one. SSE `recording.state` follows it."""
        token = await auth(session_id, authorization)
        return await client.start_recording(session_id=session_id, token=token)

    @api.delete("/sessions/{session_id}/recording", response_model=models.OutputState,
                responses=errors(*SESSION_ERRORS))
    async def stop_recording(session_id: str, authorization: str | None = Header(None)) -> dict:
        """Stop the recording; the file is complete when this answers."""
        token = await auth(session_id, authorization)
        return await client.stop_recording(session_id=session_id, token=token)

    @api.get("/sessions/{session_id}/recording", response_class=StreamingResponse,
             responses={200: {"content": {"video/mp4": {}}}, **errors(*SESSION_ERRORS, 409)})
    async def get_recording(session_id: str, authorization: str | None = Header(None)) -> StreamingResponse:
        """The finished recording (409 while it runs: DELETE it first)."""
        token = await auth(session_id, authorization)
        size = await client.recording_size(session_id=session_id, token=token)
        data = client.recording_data(session_id=session_id, token=token)
        return StreamingResponse(data, media_type="video/mp4", headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{session_id}.mp4"'})

    @api.post("/sessions/{session_id}/restream", status_code=201, response_model=models.RestreamTarget,
              responses=errors(400, *SESSION_ERRORS, 429))
    async def add_restream(session_id: str, body: models.RestreamRequest,
                           authorization: str | None = Header(None)) -> dict:
        """Send the session to an RTMP/RTMPS (FLV) or SRT (MPEG-TS) ingest. The target is
        retried with backoff when it drops (SSE `restream.state`)."""
        token = await auth(session_id, authorization)
        return await client.add_restream(session_id=session_id, token=token, url=body.url)

    @api.get("/sessions/{session_id}/restream", response_model=models.RestreamList,
             responses=errors(*SESSION_ERRORS))
    async def list_restreams(session_id: str, authorization: str | None = Header(None)) -> dict:
        token = await auth(session_id, authorization)
        return {"restreams": await client.restreams(session_id=session_id, token=token)}

    @api.delete("/sessions/{session_id}/restream/{restream_id}", status_code=204,
                responses=errors(*SESSION_ERRORS))
    async def stop_restream(session_id: str, restream_id: str,
                            authorization: str | None = Header(None)) -> Response:
        token = await auth(session_id, authorization)
        await client.stop_restream(session_id=session_id, token=token, restream_id=restream_id)
        return Response(status_code=204)

    @api.post("/sessions/{session_id}/whep", status_code=201, response_class=Response,
              responses={201: {"content": {"application/sdp": {}},
                               "description": "The SDP answer; Location names the new viewer"},
                         **errors(400, *SESSION_ERRORS, 415, 429)},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/sdp": {"schema": {"type": "string"}}}}})
    async def whep_offer(session_id: str, request: Request,
                         authorization: str | None = Header(None)) -> Response:
        """WHEP (draft-ietf-wish-whep): the viewer's SDP offer in, the answer out (all ICE
        candidates in it; no trickle). Viewers share one encode of the session's media."""
        token = await auth(session_id, authorization)
        kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if kind != "application/sdp":
            raise UnsupportedMediaType("a WHEP offer is sent as Content-Type: application/sdp")
        body = b""
        async for piece in request.stream():
            body += piece
            if len(body) > models.MAX_SDP_BYTES:
                raise ValueError(f"the offer SDP is larger than {models.MAX_SDP_BYTES} bytes")
        try:
            sdp = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("the offer SDP is not UTF-8 text") from None
        answer = await client.whep_offer(session_id=session_id, token=token, sdp=sdp)
        headers = {"Location": f"/v1/sessions/{session_id}/whep/{answer['viewer_id']}"}
        links = ice_links(answer.get("ice_servers") or [])
        if links:
            headers["Link"] = links
        return Response(answer["sdp"], 201, media_type="application/sdp", headers=headers)

    @api.delete("/sessions/{session_id}/whep/{viewer_id}", responses=errors(*SESSION_ERRORS))
    async def whep_close(session_id: str, viewer_id: str,
                         authorization: str | None = Header(None)) -> Response:
        """End the WHEP viewer (its peer connection closes)."""
        token = await auth(session_id, authorization)
        await client.whep_close(session_id=session_id, token=token, viewer_id=viewer_id)
        return Response(status_code=200)

    @api.patch("/sessions/{session_id}/whep/{viewer_id}", status_code=405,
               responses={405: {"model": models.ErrorBody, "description": ERROR_DESCRIPTIONS[405]}})
    async def whep_patch(session_id: str, viewer_id: str) -> JSONResponse:
        """Trickle ICE and ICE restarts are not supported: 405 (the answer holds every candidate;
        a viewer that lost its connection sends a new offer)."""
        return JSONResponse({"error": "method_not_allowed",
                             "detail": "trickle ICE and ICE restart are not supported: the answer "
                                       "carries all candidates; POST a new offer to reconnect"},
                            405, headers={"Allow": "DELETE"})

    @api.websocket("/sessions/{session_id}/stream")
    async def stream(websocket: WebSocket, session_id: str) -> None:
        """Streaming speech in, playback events out (see ray_lipsync.api.stream); refused
        before the upgrade with the HTTP error of the other routes (401/403/404/400)."""
        try:
            given = websocket.query_params.get("token")
            token = given or bearer_token(websocket.headers.get("authorization"))
            rate = parse_rate(websocket.query_params.get("rate"))
            await client.authorize(session_id=check_session_id(session_id), token=token)
        except Exception as error:  # noqa: BLE001 - every refusal answers as HTTP
            await websocket.send_denial_response(error_response(error))
            return
        await websocket.accept()
        await StreamSocket(websocket, client, session_id, token, rate, stream_read_ahead_s).run()

    return api


GATEWAY_HEADER = "X-Lipsync-Gateway"
WEB = Path(__file__).resolve().parent.parent / "web"  # the demo page and the client module


class ServedBy:
    """ASGI middleware: the X-Lipsync-Gateway header on every HTTP response (streams untouched)."""

    def __init__(self, app: Any, gateway: str) -> None:
        self.app = app
        self.header = (GATEWAY_HEADER.lower().encode(), gateway.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def build_api(settings: Settings, client: GatewayAPI, gateway: str | None = None,
              stream_read_ahead_s: float | None = None) -> FastAPI:
    """The whole HTTP API over `client` (LiveTalking routes only with the compat flag).

    `gateway`: the replica serving this app, sent back in the X-Lipsync-Gateway header of
    every response (which replica answered: for operators, and the routing tests).
    `stream_read_ahead_s`: None when the server owns its sockets (TCP paces a fast stream
    client); behind a proxy that reads ahead without bound (Serve), the bound of
    `ray_lipsync.api.stream.StreamSocket`.
    """
    app = FastAPI(title="ray-lipsync", version="0.1.0",
                  description="Real-time lip-synced avatar streaming over WebRTC.")
    install_error_handlers(app)
    if settings.serve.cors_origins:  # pages on other sites (the client module's `server` option)
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.serve.cors_origins),
                           allow_methods=["GET", "POST", "DELETE", "PATCH"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Location", "Link"], max_age=600)
    if gateway is not None:
        app.add_middleware(ServedBy, gateway=gateway)
    app.include_router(session_routes(settings, client, stream_read_ahead_s))

    @app.get("/healthz", responses={503: {"description": "a pipeline stage is unavailable"}})
    async def healthz() -> JSONResponse:
        """200 {"status": "ok"}; 503 {"status": "degraded", "unavailable": [stage, ...]}."""
        degraded = await client.health()
        if degraded:
            return JSONResponse({"status": "degraded", "unavailable": degraded}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(render_prometheus(await client.snapshots()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        """The demo page (it uses the client module below)."""
        return HTMLResponse((WEB / "index.html").read_text())

    @app.get("/client/ray-lipsync.js", response_class=Response)
    async def client_module() -> Response:
        """The JavaScript client module (an ES module, no dependencies): README, "Client module"."""
        return Response((WEB / "ray-lipsync.js").read_bytes(), media_type="text/javascript; charset=utf-8")

    if settings.serve.livetalking_compat:
        from ray_lipsync.api.livetalking import livetalking_routes

        app.include_router(livetalking_routes(settings, client))
    app.openapi = lambda: openapi_schema(app)
    return app
