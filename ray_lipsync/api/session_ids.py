"""Public session ids, which name the session's home gateway (where its peer lives).

A session has two ids: "<gateway tag>.<random>" and, for LiveTalking clients, a number
"<6-digit gateway code><9 random digits>". Either one tells a router which gateway to send a
request to (serve/routing.py) without asking anyone.
"""

from __future__ import annotations

import secrets
import zlib

COMPAT_RANDOM_DIGITS = 9  # LiveTalking ids: <6-digit gateway code><9 random digits>
_COMPAT_SPLIT = 10**COMPAT_RANDOM_DIGITS


def gateway_code(tag: str) -> int:
    """A stable 6-digit number naming a gateway inside numeric (LiveTalking) session ids."""
    return zlib.crc32(tag.encode()) % 1_000_000


def new_session_ids(tag: str) -> tuple[str, int]:
    """A new session's (public id, LiveTalking id), both naming gateway `tag`."""
    return (f"{tag}.{secrets.token_urlsafe(12)}",
            gateway_code(tag) * _COMPAT_SPLIT + secrets.randbelow(_COMPAT_SPLIT))


def home_of(session_id: str | int) -> tuple[str | None, int | None]:
    """(gateway tag, gateway code) a session id names; None where it names none."""
    if isinstance(session_id, int) or (isinstance(session_id, str) and session_id.isdigit()):
        return None, int(session_id) // _COMPAT_SPLIT
    tag, sep, _ = str(session_id).partition(".")
    return (tag if sep and tag else None), None


def names_gateway(session_id: str | int, tag: str) -> bool:
    """Whether `session_id` names the gateway `tag` as its home."""
    home, code = home_of(session_id)
    return home == tag or (code is not None and code == gateway_code(tag))
