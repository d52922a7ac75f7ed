"""The one configuration model of ray-lipsync.

Every tunable lives here with its documented default (the `webrtc` section in
webrtc/settings.py, by the code it configures). Load it with `Settings()` (defaults),
`Settings.from_file(path)` (JSON), or override fields from the CLI. Settings are immutable:
pass them down explicitly, never keep them in module globals.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_lipsync.section import Section
from ray_lipsync.webrtc.settings import WebRTCConfig

BackendName = Literal["procedural", "musetalk"]


def default_home() -> Path:
    """Where prepared avatars and caches live: $RAY_LIPSYNC_HOME or ~/.cache/ray-lipsync."""
    env = os.environ.get("RAY_LIPSYNC_HOME")
    return Path(env) if env else Path.home() / ".cache" / "ray-lipsync"


class MediaConfig(Section):
    """The media clock. Fixed by design: frame k <-> chunks 2k, 2k+1 (see clock.py)."""

    sample_rate: Literal[16000] = Field(16000, description="Pipeline audio rate (Hz), mono.")
    chunk_ms: Literal[20] = Field(20, description="Audio chunk length (ms): 320 samples.")
    fps: Literal[25] = Field(25, description="Video frame rate: one frame = two chunks.")


class AudioConfig(Section):
    """Audio input limits and voice activity detection."""

    max_bytes: int = Field(50 * 1024 * 1024, gt=0, description="Largest accepted audio input.")
    max_seconds: float = Field(600.0, gt=0, description="Longest accepted audio input.")
    min_sample_rate: int = Field(4000, gt=0, description="Lowest accepted input rate (Hz).")
    max_sample_rate: int = Field(384000, gt=0, description="Highest accepted input rate (Hz).")
    max_channels: int = Field(32, gt=0, description="Most accepted input channels.")
    vad_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Silero speech probability above which a chunk is speech."
    )
    vad_hangover_chunks: int = Field(
        6, ge=0, description="Chunks kept as speech after speech ends (bridges short gaps)."
    )
    vad_model: Path | None = Field(
        None, description="Silero VAD ONNX file; None = the one bundled with faster-whisper."
    )

    @field_validator("vad_model")
    @classmethod
    def _vad_model_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no Silero VAD model file at {value}")
        return value


class AvatarConfig(Section):
    """Avatar preparation."""

    name: str = Field("default", description="Avatar used when a session names none.")
    crop_size: Literal[256] = Field(256, description="Side of the face crop fed to backends.")
    extra_margin: int = Field(
        10, ge=0, description="MuseTalk v1.5 extra margin (px) below the chin in the crop box."
    )
    max_frames: int = Field(500, gt=0, description="Most frames taken from an avatar video.")
    max_side: int = Field(
        1280, ge=256, description="Frames larger than this (longest side) are downscaled."
    )
    mask_feather: float = Field(
        0.08, gt=0.0, le=0.5, description="Blend mask feather width, as a fraction of crop size."
    )


class MuseTalkConfig(Section):
    """The neural backend (weights in `models_dir`, MuseTalk's own layout)."""

    encoder_window_s: float = Field(
        2.0, gt=0.2, le=30.0, description="Audio window (s) the Whisper encoder runs on per step, "
        "ending lookahead_ms past the frames it serves, at their absolute positions in their 30 s "
        "segment. 30 = everything of the segment so far (MuseTalk's offline computation on the "
        "audio received; ~15x the cost of 2 s)."
    )
    lookahead_ms: int = Field(
        120, ge=100, description="Audio needed past the end of a frame before it is encoded."
    )
    fp16: bool = Field(True, description="Half precision on CUDA (always fp32 on CPU).")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when usable; a GPU declared to the process "
        "(CUDA_VISIBLE_DEVICES, as Ray sets for num_gpus actors) without usable CUDA is an error; "
        "no GPU at all: CPU with a warning. cuda: CUDA or an error. cpu: CPU (warned, reported)."
    )
    compile: bool = Field(
        False, description="torch.compile the UNet, VAE decoder and Whisper encoder (opt-in: "
        "slower start, first batches of each size recompile)."
    )
    cuda_graphs: bool = Field(
        False, description="Replay the render step (UNet + VAE decoder) from CUDA graphs, one per "
        "power-of-two batch size up to pipeline.max_batch, captured when the renderer starts "
        "(opt-in, CUDA only: ignored with a warning on the CPU; not with compile)."
    )

    @model_validator(mode="after")
    def _one_way_to_speed_up(self) -> "MuseTalkConfig":
        if self.compile and self.cuda_graphs:
            raise ValueError("musetalk.compile and musetalk.cuda_graphs cannot be combined: choose one")
        return self


class PipelineConfig(Section):
    """Streaming pipeline and scheduling."""

    lookahead_ms: int | None = Field(
        None, ge=0, description="Audio past a frame's end needed to compute it; None = backend's."
    )
    playout_delay_ms: int = Field(
        300,
        ge=0,
        description="D: frame k is presented at t0 + D + k * 40 ms. A frame is dropped when "
        "its latency (lookahead included) exceeds D - 40 ms, so D covers the latency tail. "
        "With adaptive playout this is the upper bound of D (and D before any measurement).",
    )
    playout_adaptive: bool = Field(
        True, description="Adapt D per session, between utterances: a new utterance lands "
        "p99(what the recent speech frames needed of D: latency, plus the wait for their audio "
        "when streamed in real time) + playout_margin_ms after it arrived, within "
        "[playout_min_ms, playout_delay_ms] (see streaming/playout.py). False = the fixed "
        "playout_delay_ms."
    )
    playout_min_ms: int = Field(
        120, ge=0, description="Lower bound of the adaptive D (ms)."
    )
    playout_initial_ms: int | None = Field(
        None, ge=0, description="Adaptive D of a session's first utterance when neither it nor "
        "another live session of its engine measured anything yet; None = playout_delay_ms."
    )
    playout_margin_ms: int = Field(
        40, ge=0, description="Adaptive D: margin (ms) over the p99 frame latency."
    )
    playout_window: int = Field(
        250, ge=10, description="Adaptive D: how many recent speech frames count."
    )
    max_batch: int = Field(16, gt=0, description="Most frames in one inference batch.")
    dispatch_tick_ms: int = Field(
        40, ge=0, le=40, description="A gateway sends all its sessions' work to the actors "
        "once per tick (one frame period by default: a round per frame, whatever the number "
        "of sessions; adds tick/2 latency on average). 0 = at once."
    )
    sessions_per_replica: int = Field(8, gt=0, description="Session capacity per replica.")
    min_replicas: int = Field(
        1, ge=1, description="Inference replicas kept per backend in use (2+ for sub-second "
        "failover when one dies: its sessions move to another instead of waiting for its restart)."
    )
    max_replicas: int = Field(8, ge=1, description="Most inference replicas per backend.")
    replica_device: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="Where replicas run: gpu asks num_gpus for each (on a `ray up` "
        "cluster a pending replica makes the autoscaler add a GPU node); auto = gpu once the "
        "cluster has GPUs (CPU replicas are then drained), else cpu."
    )
    replica_wait_s: float = Field(
        20.0, ge=0, description="How long a new session waits for capacity being added before "
        "it gets 503 + Retry-After."
    )
    idle_replica_s: float = Field(
        120.0, ge=0, description="A replica without sessions beyond the wanted count is removed "
        "after this long."
    )
    lease_s: float = Field(
        6.0, gt=0, description="A gateway that has not renewed its sessions' pins for this long "
        "is gone: their replica slots are freed."
    )
    stage_timeout_ms: int = Field(
        250, gt=0, description="A feature batcher or compositor call slower than this counts as "
        "unavailable: the replica does that work itself until the stage answers again."
    )
    batcher_gpus: float = Field(
        0.1, gt=0, lt=1, description="GPU share of the musetalk feature batcher; GPU replicas "
        "of that backend ask 1 - this, so the batcher fits beside one of them."
    )
    audio_buffer_s: float = Field(
        30.0, gt=0, description="Most audio (s) a session may have queued ahead of playback."
    )
    replica_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved by a CPU-only replica.")
    standby: Literal["auto", "on", "off"] = Field(
        "auto", description="A gateway keeps a warm in-process engine that serves a session whose "
        "inference replica failed until the session has a replica again (failover without "
        "waiting for a restart, also when every pipeline process of a server died). auto = on "
        "for the procedural backend unless replica_device is gpu (the engine then costs what a "
        "CPU replica costs; a GPU backend's would hold a model in every gateway)."
    )
    namespace: str = Field("ray_lipsync", description="Ray namespace of the pipeline actors.")

    def wants_standby(self, backend: str) -> bool:
        """Whether gateways keep a standby engine for `backend` (see `standby`)."""
        if self.standby != "auto":
            return self.standby == "on"
        return backend == "procedural" and self.replica_device != "gpu"

    @model_validator(mode="after")
    def _check_playout(self) -> "PipelineConfig":
        if self.playout_adaptive and self.playout_min_ms > self.playout_delay_ms:
            raise ValueError("pipeline.playout_min_ms must not exceed pipeline.playout_delay_ms")
        return self


class AdmissionConfig(Section):
    """Admission from measured headroom (ray_lipsync/admission.py; README, Failures and capacity)."""

    enabled: bool = Field(True, description="Refuse sessions the host cannot serve on time (503 + "
                          "Retry-After) and shed the newest under sudden overload.")
    cpu_target: float = Field(0.8, gt=0, le=1.0, description="Share of the host's cores the "
                              "sessions may need if they all talked at once.")
    talking_share: float = Field(1.0, gt=0, le=1.0, description="Share of sessions assumed to "
                                 "talk at once (1: any session may talk at any time).")
    max_drop_ratio: float = Field(0.005, ge=0, le=1, description="Refuse while the sessions "
                                  "lost more than this share of frames to lateness in window_s.")
    max_loop_lag_ms: float = Field(60.0, gt=0, description="Refuse while the gateway's event "
                                   "loop lagged more than this in window_s.")
    window_s: float = Field(5.0, gt=0, le=60, description="Window of those checks; also Retry-After.")
    talk_cores_prior: float = Field(0.25, gt=0, le=64, description="CPU (cores) of one talking "
                                    "session until it has been measured on this host.")
    shed_drop_ratio: float = Field(0.05, gt=0, le=1, description="Sessions losing more than this "
                                   "share of frames (or loop lag above twice its bound)...")
    shed_after_s: float = Field(3.0, gt=0, le=600, description="...for this long: the newest "
                                "session is closed (counted in lipsync_sessions_shed_total).")


class ServeConfig(Section):
    """HTTP / WebRTC service."""

    host: str = Field("127.0.0.1", description="Bind address of the HTTP API (the Serve proxy).")
    port: int = Field(8000, gt=0, lt=65536, description="Port of the HTTP API (the Serve proxy).")
    max_sessions: int = Field(16, gt=0, description="Most concurrent sessions per gateway.")
    idle_timeout_s: float = Field(300.0, gt=0, description="A session without activity closes.")
    offer_timeout_s: float = Field(
        30.0, gt=0, description="A session that has received no WebRTC offer this long after "
        "it was created closes (its slot is freed)."
    )
    api_keys: tuple[str, ...] = Field(
        (), description="Keys accepted by POST /v1/sessions as "
        "'Authorization: Bearer <key>'; empty = anyone may create sessions (local demo)."
    )
    cors_origins: tuple[str, ...] = Field(
        (), description="Origins of pages on other sites allowed to call the API and load the "
        "client module (e.g. 'https://app.example.com'; '*' = any); empty = same origin only."
    )
    livetalking_compat: bool = Field(
        False, description="Serve LiveTalking's unauthenticated routes (/offer, /human, ...)."
    )
    stream_read_ahead_s: float = Field(
        120.0, gt=0, description="Through Ray Serve only (its proxy reads a WebSocket as fast as "
        "the client sends, so TCP cannot slow the client): while the speech buffer is full, most "
        "audio (s) a stream socket may have sent that waits for room; more is answered with error "
        "'too_far_ahead' and close code 1008 (the audio received before that still plays)."
    )
    min_gateways: int = Field(1, ge=1, description="Autoscaling lower bound of gateways.")
    max_gateways: int = Field(4, ge=1, description="Autoscaling upper bound of gateways.")
    target_sessions_per_gateway: int = Field(8, gt=0, description="Autoscaling: most sessions "
                                             "per gateway before another is added.")
    target_gateway_cores: float = Field(0.6, gt=0, le=1.0, description="Autoscaling: CPU (cores) "
                                        "a gateway process may use before another is added (one "
                                        "Python process tops out at one core).")
    admission: AdmissionConfig = AdmissionConfig()
    gateway_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each gateway replica needs, e.g. "
        '{"gateway": 1} with that resource declared (`ray start --resources`) on the nodes that '
        "should host gateways: the ones clients can reach for media."
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            scheme, sep, host = origin.partition("://")
            if origin != "*" and not (sep and scheme in ("http", "https") and host and "/" not in host):
                raise ValueError(f"serve.cors_origins: {origin[:80]!r} is not an origin "
                                 "('https://host[:port]', no path) or '*'")
        return origins


class EgressConfig(Section):
    """The shared H.264 + AAC encode of a session's recording and restream targets (egress/)."""

    video_bitrate: int = Field(1_000_000, ge=100_000, le=20_000_000, description="H.264 bitrate, "
                               "bit/s (capped VBR: x264's maxrate at this, a 2 s buffer).")
    audio_bitrate: int = Field(64_000, ge=16_000, le=320_000, description="AAC bitrate, bit/s "
                               "(48 kHz mono).")
    keyframe_interval_s: float = Field(2.0, ge=0.5, le=10.0, description="Seconds between "
                                       "keyframes (RTMP ingests ask for 2-4 s).")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast"] = Field(
        "veryfast", description="x264 preset: faster ones cost less CPU for a larger stream "
        "at the same quality (costs: benchmarks/README.md, egress.py).")
    frame_buffer: int = Field(25, ge=2, le=500, description="Frames (25 = 1 s) the encoder may "
                              "lag behind the session before its oldest is dropped (counted).")


class RecordingConfig(Section):
    """Recording a session to MP4 (POST /v1/sessions/{id}/recording)."""

    keep_dir: Path | None = Field(None, description="Write recordings here and keep them after "
                                  "the session closes (<session id>.mp4); None = a working "
                                  "directory under `home`, the file removed with the session.")
    max_seconds: float = Field(3600.0, gt=0, le=86400, description="A recording stops by itself "
                               "at this length (state stopped, with the reason; the session goes on).")
    max_bytes: int = Field(2 * 1024**3, gt=0, description="A recording stops by itself at this "
                           "much encoded media.")


class RestreamConfig(Section):
    """Sending a session to RTMP/SRT ingests (POST /v1/sessions/{id}/restream)."""

    max_targets: int = Field(4, ge=1, le=32, description="Most restream targets per session "
                             "(one encode feeds them all).")
    allow_private_addresses: bool = Field(False, description="Allow targets on loopback, private "
                                          "and link-local addresses (a LAN ingest, tests). Off: "
                                          "such targets are refused, so clients cannot reach the "
                                          "server's internal network through it.")


class WhepConfig(Section):
    """WHEP playback (POST /v1/sessions/{id}/whep): viewers of a session beside its own peer."""

    max_viewers: int = Field(8, ge=1, le=256, description="Most WHEP viewers per session (429 "
                             "above it). They share one VP8 + Opus encode, at the lowest bitrate "
                             "their links ask for (webrtc.min_bitrate..max_bitrate).")


class Settings(Section):
    """All of ray-lipsync's configuration, with documented defaults."""

    backend: BackendName = Field("procedural", description="Lip-sync backend.")
    home: Path = Field(default_factory=default_home, description="Avatar store and caches.")
    models_dir: Path = Field(Path("models"), description="MuseTalk weights (see models/README).")
    media: MediaConfig = MediaConfig()
    audio: AudioConfig = AudioConfig()
    avatar: AvatarConfig = AvatarConfig()
    musetalk: MuseTalkConfig = MuseTalkConfig()
    pipeline: PipelineConfig = PipelineConfig()
    serve: ServeConfig = ServeConfig()
    webrtc: WebRTCConfig = WebRTCConfig()
    egress: EgressConfig = EgressConfig()
    recording: RecordingConfig = RecordingConfig()
    restream: RestreamConfig = RestreamConfig()
    whep: WhepConfig = WhepConfig()
    avatar_uri: str | None = Field(
        None,
        description="Shared avatar location every node reads, as a pyarrow filesystem URI or path "
        "(s3://bucket/avatars, gs://..., file:///shared/avatars, /mnt/avatars). Avatars missing "
        "from <home>/avatars are fetched from it; `avatar prepare` uploads there too. "
        "None = local store only.",
    )

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.audio.min_sample_rate > self.audio.max_sample_rate:
            raise ValueError("audio.min_sample_rate must not exceed audio.max_sample_rate")
        if self.serve.min_gateways > self.serve.max_gateways:
            raise ValueError("serve.min_gateways must not exceed serve.max_gateways")
        return self

    @property
    def avatars_dir(self) -> Path:
        return self.home / "avatars"

    @classmethod
    def from_file(cls, path: str | Path) -> "Settings":
        """Load settings from a JSON file (unknown keys are rejected)."""
        return cls.model_validate(json.loads(Path(path).read_text()))

    def with_overrides(self, **fields: object) -> "Settings":
        """A copy with top-level fields replaced (validated)."""
        return type(self).model_validate({**self.model_dump(), **fields})
