"""Pydantic request and response models of the HTTP API (they shape the OpenAPI at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_lipsync.webrtc.settings import MAX_VIDEO_HOLD_MS


MAX_SDP_BYTES = 200_000  # an offer larger than this is refused (the peer checks the same bound)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionRequest(_Strict):
    avatar: str = Field("default", min_length=1, max_length=128, description="Prepared avatar name.")
    backend: Literal["procedural", "musetalk"] | None = Field(
        None, description="Lip-sync backend; None = the server's default."
    )


class SessionCreated(BaseModel):
    session_id: str = Field(description="Names the session and its home gateway replica.")
    token: str = Field(description="Bearer token for every later call of this session.")
    ice_servers: list[dict] = Field(description="ICE servers for the client's RTCPeerConnection.")


class OfferRequest(_Strict):
    sdp: str = Field(min_length=1, max_length=MAX_SDP_BYTES, description="The client's SDP offer.")
    type: Literal["offer"] = "offer"
    video_hold_ms: int | None = Field(
        None, ge=0, le=MAX_VIDEO_HOLD_MS, description="How long after its audio a frame's video "
        "leaves, ms; None = the server's `webrtc.video_hold_ms` (for a plain `<video>` element). "
        "0 for a client that aligns the picture to the sound itself (the client module does).")


class SessionDescription(BaseModel):
    sdp: str
    type: str


class UtteranceAccepted(BaseModel):
    utterance_id: str
    duration_ms: int
    starts_in_ms: int = Field(description="How long after it arrived the utterance's first frame "
                              "is presented: the playout delay it got, or more behind queued speech.")


class SpeakRequest(_Strict):
    text: str = Field(min_length=1, max_length=5000, description="Text spoken through offline TTS.")
    interrupt: bool = Field(False, description="Replace current speech instead of queueing.")


class InterruptResult(BaseModel):
    epoch: int
    utterance_id: str | None = Field(description="The utterance the interrupt cut; null when "
                                     "nothing was playing.")
    played_ms: int | None = Field(description="Audio of that utterance sent to the peer "
                                  "(exact to the 20 ms chunk).")
    interrupted: bool | None = Field(description="True when an utterance was cut; null when "
                                     "nothing was playing.")


CLIP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class AvatarStateRequest(_Strict):
    state: str | None = Field(None, min_length=1, max_length=64, pattern=CLIP_NAME, description="Clip looped while the avatar is silent; \"idle\" = the main video.")
    action: str | None = Field(None, min_length=1, max_length=64, pattern=CLIP_NAME, description="Clip played once (after `state` is set), then back to the state.")

    @model_validator(mode="after")
    def _one_at_least(self) -> "AvatarStateRequest":
        if self.state is None and self.action is None:
            raise ValueError("give `state`, `action` or both")
        return self


class AvatarStateResult(BaseModel):
    state: str = Field(description="The silent state now.")
    clip: str = Field(description="The clip the next frame shows.")
    action: str | None = Field(description="The action playing or about to, if any.")
    from_frame: int = Field(description="Output frame the change takes effect from (after the "
                            "speech already handed to the engine, and after an action playing).")
    action_end_frame: int | None = Field(description="Output frame after the action's last; "
                                         "null without an action.")


class NetworkState(BaseModel):
    """What the receiver's RTCP feedback says of a session's video link, and what the encoder does."""

    target_bps: int = Field(description="Video bitrate the link feedback asks for (webrtc.min_bitrate..max_bitrate).")
    encoder_bps: int = Field(description="Bitrate the VP8 encoder is running at now.")
    sent_bps: int = Field(description="Video actually sent over the last 2 s (less while the avatar is still).")
    remb_bps: int | None = Field(description="The receiver's last REMB estimate (audio included); None if it sends none.")
    loss: float = Field(description="Fraction of video packets lost, from the last receiver report.")
    rtt_ms: float | None = Field(description="Round-trip time from the receiver reports.")
    reports: int
    nacks: int = Field(description="Packets the receiver asked again (aiortc resends them).")
    keyframe_requests: int = Field(description="PLI / FIR received.")
    keyframes: int
    encoder_reopens: int = Field(description="Times the encoder was reopened at a new bitrate.")
    frames_left_out: int = Field(description="Frames of a still picture not sent: the viewer kept "
                                 "showing it (webrtc.still_fps).")
    frames_replayed: int = Field(0, description="Frames of a video avatar's repeating idle cycle sent "
                                 "again as first encoded instead of encoding them (webrtc/loop.py).")
    audio_chunks_left_out: int = Field(0, description="20 ms chunks of silence not sent (webrtc.opus_dtx).")


class OutputState(BaseModel):
    """An egress output (the recording or a restream target) and what it is doing."""

    state: Literal["starting", "live", "retrying", "stopped", "failed"] = Field(
        description="starting: waiting for the first keyframe or connecting; live: writing; "
        "retrying: the target failed and is being reconnected (see error); stopped: by DELETE, "
        "a limit (stopped_reason) or the session's end; failed: gave up (see error).")
    error: str | None = Field(description="The last failure (e.g. 'Connection refused').")
    stopped_reason: str | None = Field(description="Why it stopped (DELETE, recording.max_seconds, ...).")
    retries: int = Field(description="Reconnections so far (restream).")
    seconds: float = Field(description="Media written since it (re)started.")
    bytes: int = Field(description="Encoded media written in total.")
    packets_dropped: int = Field(description="Packets lost because the output lagged.")


class OutputsState(BaseModel):
    """The session's outputs besides its own peer (README, Outputs)."""

    recording: OutputState | None = Field(None, description="The recording's state; None if never started.")
    restreams: int = Field(0, description="Restream targets running.")
    whep_viewers: int = Field(0, description="WHEP viewers connected.")
    frames_dropped: int = Field(0, description="Frames the shared H.264/AAC encode lost because "
                                "it lagged (the session went on).")


class SessionState(BaseModel):
    session_id: str
    gateway: str = Field(description="Tag of the gateway replica holding the session's peer.")
    replica: str = Field(description="Inference replica the session is pinned to.")
    device: str | None = Field(None, description="Where that replica renders (cuda, cpu); None if unknown.")
    epoch: int
    speaking: bool
    state: Literal["streaming", "waiting_for_replica"] = Field(
        description="waiting_for_replica: the session's inference replica is gone and no replica "
        "has room; its frames show idle (or come from the gateway's standby engine) and it "
        "resumes by itself when capacity returns (SSE event `session.state`).")
    avatar_state: str = Field("idle", description="The silent state: \"idle\" (the main video) "
                              "or a clip of the avatar (POST /v1/sessions/{id}/state).")
    clip: str = Field("idle", description="The clip the next frame shows (an action's, or the state's).")
    action: str | None = Field(None, description="The action clip playing or about to, if any.")
    clips: list[str] = Field(default_factory=list, description="Names state and action take: "
                             "\"idle\" and the avatar's clips.")
    frames_sent: int
    frames_dropped: int = Field(description="Frames the viewer saw replaced (every drop reason "
                                "but stale_epoch).")
    drops: dict[str, int] = Field(description="Dropped frames by reason: late, shed, "
                                  "stage_unavailable, stage_error, sender_backpressure, "
                                  "stale_epoch (work cut by an interrupt; not a visible drop).")
    latency_ms_p50: float | None = Field(description="Per-frame latency (audio arrival to composited frame), median.")
    latency_ms_p95: float | None = None
    latency_ms_p99: float | None = None
    queued_audio_s: float
    connection_state: str
    network: NetworkState | None = Field(None, description="The video link as the server's sender "
                                         "sees it; None before the client connected.")
    outputs: OutputsState = Field(default_factory=OutputsState, description="Recording, restream "
                                  "targets and WHEP viewers.")


class RestreamRequest(_Strict):
    url: str = Field(min_length=1, max_length=2048, description="rtmp://host/app/key, "
                     "rtmps://host/app/key or srt://host:port?options.")


class RestreamTarget(OutputState):
    restream_id: str
    url: str = Field(description="The target with its stream key hidden.")
    created: float = Field(description="Unix time it was added.")


class RestreamList(BaseModel):
    restreams: list[RestreamTarget]


class AvatarList(BaseModel):
    avatars: list[str]
    clips: dict[str, list[str]] = Field(description="Clip names per avatar (states and actions "
                                        "its sessions can take besides \"idle\"); avatars not "
                                        "in this node's store yet list none.")


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable error code.")
    detail: str = Field(description="What is wrong and what to do.")
