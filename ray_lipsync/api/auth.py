"""Per-session bearer tokens: issued at session creation, checked on every later call."""

from __future__ import annotations

import hmac
import secrets

from ray_lipsync.errors import LipsyncError


class MissingToken(LipsyncError):
    """No bearer token (HTTP 401)."""


class WrongToken(LipsyncError):
    """A token that does not belong to the session (HTTP 403)."""


def new_token() -> str:
    """A fresh unguessable session token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; MissingToken if absent."""
    if not authorization:
        raise MissingToken("missing Authorization header; send 'Authorization: Bearer <token>' "
                           "with the token returned by POST /v1/sessions")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise MissingToken("Authorization header must be 'Bearer <token>'")
    return token


def check_token(expected: str, given: str | None) -> None:
    """Constant-time comparison; MissingToken when none was given, WrongToken on mismatch."""
    if not given:
        raise MissingToken("this call needs the session's bearer token")
    if not hmac.compare_digest(expected.encode(), given.encode()):
        raise WrongToken("token does not match this session; use the token returned when "
                         "the session was created")


def check_api_key(keys: tuple[str, ...] | list[str], authorization: str | None) -> None:
    """`Authorization: Bearer <key>` with one of `keys` (constant time); 401 / 403 otherwise."""
    if not authorization:
        raise MissingToken("this server requires an API key to create sessions; send "
                           "'Authorization: Bearer <api key>'")
    given = bearer_token(authorization).encode()
    if not any(hmac.compare_digest(key.encode(), given) for key in keys):
        raise WrongToken("API key not accepted; use a key listed in serve.api_keys")
