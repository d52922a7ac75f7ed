"""Per-session ICE server lists: the configured STUN/TURN servers, with TURN REST-API
credentials for each session when `webrtc.turn_secret` is set.

The credentials follow the scheme coturn checks with `use-auth-secret` +
`static-auth-secret` (the "TURN REST API"): username `<expiry unix time>:<session id>`,
credential base64(HMAC-SHA1(secret, username)). The TURN server recomputes the HMAC and
rejects an expired or altered pair, so the secret itself never leaves the server.

    servers = session_ice_servers(settings.webrtc, session_id)
    # [{"urls": ["stun:..."]}, {"urls": ["turn:..."], "username": "1767225600:gw.abc", "credential": "..."}]
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from ray_lipsync.webrtc.settings import WebRTCConfig


def turn_credentials(secret: str, session_id: str, ttl_s: int, now: float | None = None) -> tuple[str, str]:
    """(username, credential) valid for `ttl_s` seconds from `now` (default: the current time)."""
    if ":" in session_id:
        raise ValueError("a session id in a TURN username must not contain ':'")
    expiry = int(time.time() if now is None else now) + int(ttl_s)
    username = f"{expiry}:{session_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def session_ice_servers(config: WebRTCConfig, session_id: str, now: float | None = None) -> list[dict]:
    """The ICE servers of one session, as RTCIceServer dicts ({urls, username?, credential?}).

    STUN servers and TURN servers with static credentials are returned as configured; every
    TURN server gets this session's credentials when `config.turn_secret` is set.
    """
    secret = config.turn_secret.get_secret_value() if config.turn_secret is not None else None
    servers = []
    for server in config.ice_servers:
        entry: dict = {"urls": list(server.urls)}
        if server.is_turn and secret is not None:
            entry["username"], entry["credential"] = turn_credentials(secret, session_id, config.turn_ttl_s, now)
        elif server.username is not None:
            entry["username"], entry["credential"] = server.username, server.credential
        servers.append(entry)
    return servers
