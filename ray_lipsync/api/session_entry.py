"""What a gateway keeps per session (`SessionEntry`), how it makes the session's WebRTC peer,
and when it closes a session by itself (`expiry_reason`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ray_lipsync.api.events import EventHub
from ray_lipsync.config import Settings
from ray_lipsync.streaming.session import Session
from ray_lipsync.types import OutputFrame

if TYPE_CHECKING:
    from ray_lipsync.egress.fanout import SessionFanout
    from ray_lipsync.egress.outputs import SessionEgress
    from ray_lipsync.webrtc.bandwidth import BitrateBounds
    from ray_lipsync.webrtc.whep import WhepViewers


class PeerFactory(Protocol):
    def __call__(self, session: Any, *, ice_servers: list[dict] | None, bitrate: BitrateBounds,
                 on_frame_sent: Callable[[OutputFrame], None],
                 still_every: int, opus_dtx: str, video_hold: float, on_closed: Callable[[bool], Any],
                 frames: Callable[[], AsyncIterator[OutputFrame]],
                 events: Callable[[], AsyncIterator[tuple[str, dict]]]) -> Any: ...


def default_peer_factory(session: Any, **kwargs: Any) -> Any:
    """The aiortc SessionPeer (imported lazily: aiortc is only needed once a client sends an offer)."""
    from ray_lipsync.webrtc.peer import SessionPeer

    return SessionPeer(session, **kwargs)


@dataclass
class SessionEntry:
    public_id: str
    compat_id: int
    token: str
    session: Session
    events: EventHub = field(default_factory=EventHub)
    peer: Any = None
    last_activity: float = field(default_factory=time.monotonic)
    ice_servers: list[dict] = field(default_factory=list)
    offered_at: float | None = None  # monotonic time of the offer (for webrtc.connect_timeout_s)
    peer_generation: int = 0  # counts the peers this session had (a new offer replaces the peer)
    lost_at: float | None = None  # monotonic time its connection failed (webrtc.reconnect_grace_s)
    created: float = field(default_factory=time.monotonic)
    counted: tuple[int, int] = (0, 0)  # (frames sent, frames late) as last sampled for admission
    fanout: SessionFanout | None = None  # the one reader of the session's frames (egress/fanout.py)
    egress: SessionEgress | None = None  # its recording and restream targets
    whep: WhepViewers | None = None  # its WHEP viewers (created with the first)
    used: bool = False  # it had an output other than its own peer (no offer needed to keep it)

    @property
    def has_outputs(self) -> bool:
        """A recording, restream or WHEP viewer is running (it keeps the session alive)."""
        return (self.egress is not None and self.egress.active) or (self.whep is not None and len(self.whep) > 0)


def expiry_reason(entry: SessionEntry, now: float, settings: Settings) -> str | None:
    """Why the gateway closes this session now (monotonic `now`), or None to keep it.

    Idle for `serve.idle_timeout_s`; its connection lost for `webrtc.reconnect_grace_s`
    without a new offer; no offer within `serve.offer_timeout_s` (unless another output used
    it); its peer not connected `webrtc.connect_timeout_s` after the offer. A running output
    counts as activity (`last_activity` is renewed).
    """
    if entry.has_outputs:
        entry.last_activity = now
        return None
    timeout = settings.serve.idle_timeout_s
    if now - entry.last_activity > timeout:
        return f"idle for more than {timeout:g} s"
    if entry.lost_at is not None:
        grace = settings.webrtc.reconnect_grace_s
        if now - entry.lost_at > grace:
            return f"connection lost and no new offer within {grace:g} s"
        return None
    if entry.peer is None and not entry.used and now - entry.created > settings.serve.offer_timeout_s:
        return f"no WebRTC offer within {settings.serve.offer_timeout_s:g} s"
    if entry.offered_at is not None and entry.peer is not None:
        if entry.peer.connection_state not in ("new", "connecting"):
            entry.offered_at = None  # connected (or closing by itself): nothing more to wait for
        elif now - entry.offered_at > settings.webrtc.connect_timeout_s:
            return (f"peer not connected {settings.webrtc.connect_timeout_s:g} s after the offer "
                    "(ICE failed: check STUN/TURN)")
    return None
