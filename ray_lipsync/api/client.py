"""The gateway's API as one typed interface: what the HTTP routes call.

`GatewayAPI` is implemented by `Gateway` itself (in-process: laptop mode, tests) and, in the
Serve application, by a client that runs a replica's own sessions in-process and forwards the
others through a Serve handle (serve.clients.HomeClient / ServeClient). Session calls pass
`session_id` as a keyword: the Serve request router reads it to pick the session's home
replica. `forwarded_kwargs` turns a call into those keywords, by the interface's own
signature, so the forwarding clients name methods only through this Protocol.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import numpy as np


class GatewayAPI(Protocol):
    """One gateway replica's sessions (see ray_lipsync.api.gateway.Gateway for the semantics)."""

    async def create_session(self, avatar: str = "default", backend: str | None = None) -> dict: ...

    async def authorize(self, session_id: str, token: str | None) -> None: ...

    async def offer(self, session_id: str | int, token: str | None, sdp: str, type: str = "offer",
                    *, compat: bool = False, video_hold_ms: int | None = None) -> dict: ...

    async def push_audio(self, session_id: str | int, token: str | None, samples: np.ndarray,
                         utterance_id: str | None = None, interrupt: bool = False,
                         final: bool = True, *, compat: bool = False) -> dict: ...

    async def interrupt(self, session_id: str | int, token: str | None = None, *,
                        compat: bool = False) -> dict: ...

    async def set_avatar_state(self, session_id: str | int, token: str | None = None,
                               state: str | None = None, action: str | None = None, *,
                               compat: bool = False) -> dict: ...

    async def status(self, session_id: str | int, token: str | None = None, *,
                     compat: bool = False) -> dict: ...

    async def close(self, session_id: str | int, token: str | None = None, *,
                    compat: bool = False) -> None: ...

    def events(self, session_id: str, token: str | None,
               keepalive_s: float = 15.0) -> AsyncIterator[tuple[str, dict]]: ...

    async def start_recording(self, session_id: str, token: str | None) -> dict: ...

    async def stop_recording(self, session_id: str, token: str | None) -> dict: ...

    async def recording_size(self, session_id: str, token: str | None) -> int: ...

    def recording_data(self, session_id: str, token: str | None,
                       chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]: ...

    async def add_restream(self, session_id: str, token: str | None, url: str) -> dict: ...

    async def restreams(self, session_id: str, token: str | None) -> list[dict]: ...

    async def stop_restream(self, session_id: str, token: str | None, restream_id: str) -> None: ...

    async def whep_offer(self, session_id: str, token: str | None, sdp: str) -> dict: ...

    async def whep_close(self, session_id: str, token: str | None, viewer_id: str) -> None: ...

    async def snapshots(self) -> list[dict]:
        """Metrics snapshots of every gateway replica of the deployment."""
        ...

    async def health(self) -> list[str]:
        """Names of the pipeline stages unavailable right now (empty: healthy)."""
        ...


SESSION_METHODS = ("authorize", "offer", "push_audio", "interrupt", "set_avatar_state", "status",
                   "close", "events", "start_recording", "stop_recording", "recording_size",
                   "recording_data", "add_restream", "restreams", "stop_restream", "whep_offer",
                   "whep_close")


def forwarded_kwargs(method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`args`/`kwargs` of a call of GatewayAPI `method`, all as keywords (defaults filled)."""
    bound = inspect.signature(method).bind(None, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self")
    return arguments
