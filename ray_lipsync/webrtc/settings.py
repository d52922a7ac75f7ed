"""The `webrtc` settings section: ICE (STUN/TURN servers, per-session TURN credentials from a
shared secret that is never sent, logged or dumped), the video bitrate bounds, still pictures,
Opus DTX and the video hold. Part of `Settings` (config.py); it lives here, by the code it configures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import (Field, SecretStr, SerializationInfo, ValidationInfo, field_serializer,
                      field_validator, model_validator)

from ray_lipsync.section import Section

if TYPE_CHECKING:
    from ray_lipsync.webrtc.bandwidth import BitrateBounds

ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")
MASKED_SECRET = "**********"  # what a dumped (masked) SecretStr reads as
MAX_VIDEO_HOLD_MS = 120  # the most a client may ask a frame's video to leave after its audio


class IceServer(Section):
    """One STUN/TURN server, as in the browser's RTCIceServer."""

    urls: list[str] = Field(
        min_length=1, description="stun:/turn:/turns: URLs, e.g. 'turn:turn.example.com:3478?transport=udp'."
    )
    username: str | None = Field(None, description="Static TURN username (when webrtc.turn_secret is not set).")
    credential: str | None = Field(None, description="Static TURN password (when webrtc.turn_secret is not set).")

    @field_validator("urls", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("urls")
    @classmethod
    def _schemes(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(ICE_SCHEMES) or len(url) > 512:
                raise ValueError(f"ICE server URL {url[:80]!r} must start with one of {', '.join(ICE_SCHEMES)}")
        return urls

    @property
    def is_turn(self) -> bool:
        return any(url.startswith(("turn:", "turns:")) for url in self.urls)


class WebRTCConfig(Section):
    """ICE: the STUN/TURN servers of the server's peers and of the clients (POST /v1/sessions)."""

    # turn_secret comes first: ice_servers is checked against it (errors never quote the secret)
    turn_secret: SecretStr | None = Field(
        None,
        description="coturn's static-auth-secret (use-auth-secret): every session gets its own TURN "
        "credentials for the turn:/turns: servers. Never sent to clients, logged or dumped "
        "(JSON dumps mask it unless dumped with context {'secrets': True}).",
    )
    turn_ttl_s: int = Field(3600, gt=0, le=7 * 86400, description="Lifetime of a session's TURN credentials.")
    ice_servers: list[IceServer] = Field(
        default_factory=list,
        description="STUN/TURN servers, used by the server's aiortc peers and returned to clients. "
        "Empty = host candidates only (a LAN). aiortc uses the first STUN and the first TURN URL.",
    )
    connect_timeout_s: float = Field(
        30.0, gt=0, le=600, description="A session whose peer has not connected this long after its "
        "offer is closed (e.g. the client could not reach the TURN server)."
    )
    reconnect_grace_s: float = Field(
        20.0, ge=0, le=600, description="A session whose WebRTC connection failed (the client's "
        "network went away; not a hang-up) is kept this long for the client to send a new offer "
        "on it (the client module does); 0 = close it at once."
    )
    min_bitrate: int = Field(100_000, ge=30_000, le=50_000_000, description="Video bitrate floor, bit/s: "
                             "the encoder never goes below it whatever the link feedback says.")
    start_bitrate: int = Field(200_000, ge=30_000, le=50_000_000, description="Video bitrate of a new "
                               "session, bit/s, until the receiver's feedback moves it.")
    max_bitrate: int = Field(1_000_000, ge=30_000, le=50_000_000, description="Video bitrate ceiling, "
                             "bit/s (a talking 512x512 avatar looks sharp well below 1 Mbit/s).")
    still_fps: float = Field(5.0, ge=1.0, le=25.0, description="Frame rate of a picture that does not "
                             "change (a still-image avatar in silence): its repeats are encoded and sent "
                             "only this often, since the receiver keeps showing the last picture; 25 = "
                             "every frame. Speech and a video avatar's idle cycle always go at 25 fps.")
    opus_dtx: Literal["auto", "on", "off"] = Field(
        "auto", description="Opus DTX in silence: once the avatar's silence has settled, one "
        "1-byte DTX packet every 400 ms instead of a packet every 20 ms (the receiver plays "
        "comfort silence, as with WebRTC's own DTX); an idle session sends 2.5 audio packets a "
        "second instead of 50. auto = when the client's offer asks for it (Opus `usedtx=1`, "
        "RFC 7587; the client module does), on = always, off = never.")
    video_hold_ms: int = Field(
        40, ge=0, le=MAX_VIDEO_HOLD_MS, description="A frame's video leaves this long after its "
        "audio. Browsers' own lip sync (libwebrtc's, in Chromium, Firefox and Safari) leaves "
        "offsets under 30 ms alone and moves in steps over seconds, while their audio path "
        "(jitter buffer + output) is 40-60 ms longer than their video's: a plain `<video>` "
        "element shows the mouth ahead of the sound unless the video leaves later. A client "
        "that aligns the picture itself asks for 0 in its offer (`video_hold_ms`; the client "
        "module and the pipecat service do). WHEP viewers get this value.")

    @model_validator(mode="after")
    def _bitrate_order(self) -> "WebRTCConfig":
        self.bitrate_bounds()  # BitrateBounds checks min <= start <= max (ValueError)
        return self

    def still_every(self) -> int:
        """`still_fps` as the largest frame gap of a still picture (frames at 25 fps)."""
        from ray_lipsync.clock import FPS

        return max(1, round(FPS / self.still_fps))

    def video_hold(self, asked_ms: int | None = None) -> float:
        """The video hold of a peer, in seconds: what its client asked for, else `video_hold_ms`."""
        return (self.video_hold_ms if asked_ms is None else asked_ms) / 1000

    def bitrate_bounds(self) -> "BitrateBounds":
        """The session encoders' bounds (webrtc/bandwidth.py)."""
        from ray_lipsync.webrtc.bandwidth import BitrateBounds

        return BitrateBounds(self.min_bitrate, self.start_bitrate, self.max_bitrate)

    @field_serializer("turn_secret", when_used="json")
    def _dump_secret(self, secret: SecretStr | None, info: SerializationInfo) -> str | None:
        if secret is None:
            return None
        context = info.context if isinstance(info.context, dict) else {}
        return secret.get_secret_value() if context.get("secrets") else MASKED_SECRET

    @field_validator("turn_secret")
    @classmethod
    def _real_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and secret.get_secret_value() in ("", MASKED_SECRET):
            raise ValueError("webrtc.turn_secret is empty or masked ('**********'); pass the real "
                             "secret (a settings dump masks it unless dumped with context {'secrets': True})")
        return secret

    @field_validator("ice_servers")
    @classmethod
    def _credentials(cls, servers: list[IceServer], info: ValidationInfo) -> list[IceServer]:
        secret = info.data.get("turn_secret")
        for i, server in enumerate(servers):
            if not server.is_turn:
                continue
            if secret is not None and (server.username is not None or server.credential is not None):
                raise ValueError(f"webrtc.ice_servers[{i}] has a static username/credential and "
                                 "webrtc.turn_secret is set: use one or the other")
            if secret is None and (server.username is None or server.credential is None):
                raise ValueError(f"webrtc.ice_servers[{i}] is a TURN server: give it username and "
                                 "credential, or set webrtc.turn_secret for per-session credentials")
        return servers
