"""Errors as HTTP answers, in one place: each typed error's status and code, the {error,
detail} body with Retry-After where it applies, FastAPI's handlers, and the OpenAPI schema
that documents them."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_lipsync.api import models
from ray_lipsync.api.auth import MissingToken, WrongToken
from ray_lipsync.egress.sink import TargetRefused
from ray_lipsync.errors import (
    AtCapacity, AudioInputError, AudioTooLarge, AvatarError, AvatarNotFound, BackendUnavailable,
    Backpressure, MalformedAudio, OutputConflict, OutputLimit, SessionClosed, StageUnavailable,
    UnknownClip, UnknownOutput, UnknownSession, UnsupportedAudio, UnsupportedMediaType,
)

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "5"
_STATUS: list[tuple[type[BaseException], int, str]] = [
    (MissingToken, 401, "unauthorized"), (WrongToken, 403, "forbidden"),
    (UnknownSession, 404, "unknown_session"), (AvatarNotFound, 404, "unknown_avatar"),
    (UnknownOutput, 404, "unknown_output"), (OutputConflict, 409, "conflict"),
    (OutputLimit, 429, "limit_reached"), (TargetRefused, 400, "target_refused"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (SessionClosed, 410, "session_closed"),
    (AudioTooLarge, 413, "too_large"), (UnsupportedAudio, 415, "unsupported_audio"),
    (MalformedAudio, 422, "malformed_audio"), (AudioInputError, 422, "invalid_audio"),
    (Backpressure, 429, "backpressure"), (BackendUnavailable, 503, "backend_unavailable"),
    (AtCapacity, 503, "at_capacity"), (StageUnavailable, 503, "stage_unavailable"),
    (AvatarError, 400, "bad_avatar"), (UnknownClip, 400, "unknown_clip"), (ValueError, 400, "bad_request"),
]


ERROR_DESCRIPTIONS = {
    400: "Invalid request (bad JSON, fields, query, SDP or avatar)",
    401: "Missing credentials (session token, or the API key where one is required)",
    403: "Credentials that do not match",
    404: "Unknown session, avatar or output",
    409: "The output is not in a state that allows this (a recording still running)",
    410: "The session closed",
    413: "Input above the size or duration limit",
    405: "The method is not supported on this resource (WHEP PATCH: no trickle ICE)",
    415: "Not audio, or an unsupported audio type; WHEP takes application/sdp",
    422: "Audio that cannot be decoded (empty, truncated, NaN, absurd rate)",
    429: "The session's speech buffer cannot take it now, or it has as many outputs as "
         "allowed; retry after Retry-After seconds",
    503: "No capacity or a pipeline stage unavailable; retry after Retry-After seconds",
}
SESSION_ERRORS = (401, 403, 404)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error codes, each with the {error, detail} body."""
    return {code: {"model": models.ErrorBody, "description": ERROR_DESCRIPTIONS[code]}
            for code in codes}


def error_response(error: BaseException) -> JSONResponse:
    """The HTTP answer for a typed error: {error, detail} plus Retry-After where it applies.

    An error raised on another process arrives wrapped (Ray's task error, whose text carries
    a traceback, pids and addresses): only the original error's message is sent.
    """
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    for kind, status, code in _STATUS:
        if isinstance(error, kind):
            headers = {"Retry-After": _retry_after(error)} if status in (429, 503) else None
            if status == 401:
                headers = {"WWW-Authenticate": "Bearer"}
            return JSONResponse({"error": code, "detail": str(error)}, status, headers=headers)
    logger.exception("unexpected error", exc_info=error)
    return JSONResponse({"error": "internal", "detail": "internal error; see server logs"}, 500)


def _retry_after(error: BaseException) -> str:
    seconds = getattr(error, "retry_after_s", None)
    return str(max(1, math.ceil(seconds))) if seconds is not None else RETRY_AFTER_S


def install_error_handlers(app: FastAPI) -> None:
    async def on_typed(request: Request, error: Exception) -> JSONResponse:
        return error_response(error)

    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}"
                             for e in error.errors())
        return JSONResponse({"error": "bad_request", "detail": f"invalid request: {problems}"}, 400)

    async def on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse({"error": code, "detail": str(error.detail)}, error.status_code,
                            headers=getattr(error, "headers", None))

    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for kind, _, _ in _STATUS:
        app.add_exception_handler(kind, on_typed)


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with validation errors documented as the 400 {error, detail} they
    are (FastAPI would advertise its own 422 body on every route with parameters)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                    del responses["422"]
                    if operation.get("parameters") or operation.get("requestBody"):
                        responses.setdefault("400", _error_ref(ERROR_DESCRIPTIONS[400]))
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        components.setdefault("ErrorBody", models.ErrorBody.model_json_schema())
        app.openapi_schema = schema
    return app.openapi_schema


def _error_ref(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
