"""One-shot audio decoding to the pipeline format: 16 kHz mono float32 in [-1, 1].

Everything from outside is checked before it reaches the pipeline: size and duration
limits, WAV headers (validated in wav.py, decoded by PyAV), sample rates, channel counts and
NaN/inf samples. Each problem raises one typed error of `ray_lipsync.errors`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np

from ray_lipsync.audio.resample import PIPELINE_RATE, Resampler
from ray_lipsync.audio.wav import check_rate_and_channels, parse_wav_header, pcm_to_float
from ray_lipsync.config import AudioConfig
from ray_lipsync.errors import AudioTooLarge, MalformedAudio, UnsupportedAudio

logger = logging.getLogger(__name__)

FormatKind = Literal["wav", "pcm16", "mpeg", "aac", "ogg", "flac", "webm", "mp4", "sniff"]

_CONTENT_TYPES: dict[str, FormatKind] = {
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
    "audio/l16": "pcm16",
    "audio/mpeg": "mpeg",
    "audio/mp3": "mpeg",
    "audio/aac": "aac",
    "audio/ogg": "ogg",
    "audio/opus": "ogg",
    "application/ogg": "ogg",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/webm": "webm",
    "audio/mp4": "mp4",
    "audio/x-m4a": "mp4",
    "application/octet-stream": "sniff",
}
# PyAV demuxer per container kind (wav is validated here first, then demuxed by ffmpeg).
_DEMUXERS: dict[str, str] = {
    "wav": "wav",
    "mpeg": "mp3",
    "aac": "aac",
    "ogg": "ogg",
    "flac": "flac",
    "webm": "matroska",
    "mp4": "mov",
}
# A validated WAV header says everything: skip ffmpeg's stream analysis (~5 s of audio read
# through Python I/O, a noticeable delay per upload; measured: benchmarks/README.md, section
# "Figures behind settings in the code").
_PROBE_OPTIONS: dict[str, dict[str, str]] = {"wav": {"probesize": "4096", "analyzeduration": "0"}}
_STRONG_MAGIC = (b"RIFF", b"OggS", b"fLaC", b"ID3", b"\x1aE\xdf\xa3")
_INT_SCALE = {"u8": 128.0, "s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63}


@dataclass(frozen=True)
class AudioFormat:
    """What an HTTP body holds: a container kind, or raw PCM16 with its rate and channels."""

    kind: FormatKind
    sample_rate: int | None = None
    channels: int = 1

    @property
    def streamable(self) -> bool:
        """True when frames can be produced before the whole body has arrived."""
        return self.kind in ("wav", "pcm16", "sniff")


def parse_content_type(content_type: str, limits: AudioConfig = AudioConfig()) -> AudioFormat:
    """Map an HTTP Content-Type to an AudioFormat.

    `audio/L16;rate=R;channels=C` is raw little-endian PCM16 (rate required, channels
    default 1). Unknown types raise UnsupportedAudio; bad L16 parameters MalformedAudio.
    """
    if not isinstance(content_type, str):
        raise UnsupportedAudio("Content-Type must be a string")
    parts = [p.strip() for p in content_type.split(";")]
    mime = parts[0].lower()
    kind = _CONTENT_TYPES.get(mime)
    if kind is None:
        known = ", ".join(sorted(_CONTENT_TYPES))
        raise UnsupportedAudio(
            f"unsupported Content-Type {content_type!r}; send one of {known} "
            "(audio/L16 needs ;rate=<Hz>)"
        )
    if kind != "pcm16":
        return AudioFormat(kind)
    params: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"')
    if "rate" not in params:
        raise MalformedAudio("audio/L16 needs a rate parameter, e.g. audio/L16;rate=16000")
    rate = _int_param(params["rate"], "rate")
    channels = _int_param(params.get("channels", "1"), "channels")
    check_rate_and_channels(rate, channels, limits)
    return AudioFormat("pcm16", rate, channels)


def _int_param(value: str, name: str) -> int:
    if not value.isdigit():
        raise MalformedAudio(f"audio/L16 parameter {name}={value!r} is not a positive integer")
    return int(value)


def sniff_format(head: bytes) -> AudioFormat | None:
    """Guess the container from the first bytes (12 are enough); None when not recognised."""
    if head[:4] == b"RIFF":
        return AudioFormat("wav")
    if head[:4] == b"OggS":
        return AudioFormat("ogg")
    if head[:4] == b"fLaC":
        return AudioFormat("flac")
    if head[:3] == b"ID3":
        return AudioFormat("mpeg")
    if head[:4] == b"\x1aE\xdf\xa3":
        return AudioFormat("webm")
    if head[4:8] == b"ftyp":
        return AudioFormat("mp4")
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 0x3
        return AudioFormat("aac") if layer == 0 else AudioFormat("mpeg")
    return None


def check_input_bytes(data: bytes, limits: AudioConfig) -> bytes:
    """Type, emptiness and max_bytes checks shared by every entry point."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnsupportedAudio(f"audio must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise MalformedAudio("audio input is empty; send a WAV/MP3/... file or raw PCM16")
    if len(data) > limits.max_bytes:
        raise AudioTooLarge(
            f"audio input is {len(data)} bytes, above the limit of {limits.max_bytes}; "
            "send a shorter clip or stream it"
        )
    return data


def check_duration(frames: int, sample_rate: int, limits: AudioConfig) -> None:
    """Raise AudioTooLarge when `frames` at `sample_rate` exceed limits.max_seconds."""
    seconds = frames / sample_rate
    if seconds > limits.max_seconds:
        raise AudioTooLarge(
            f"audio is {seconds:.1f} s long, above the limit of {limits.max_seconds:g} s; "
            "split it into shorter clips"
        )


def check_finite(samples: np.ndarray) -> None:
    """Raise MalformedAudio when any sample is NaN or infinite."""
    if not np.isfinite(samples).all():
        raise MalformedAudio("audio contains NaN or infinite samples; fix the source signal")


def downmix(samples: np.ndarray, channel_axis: int) -> np.ndarray:
    """Average the channels into float32 mono in [-1, 1] (NaN/inf raise MalformedAudio).

    Float input beyond full scale is clipped before resampling, so no overflow can reach
    the filter.
    """
    check_finite(samples)
    mono = samples.mean(axis=channel_axis, dtype=np.float64)
    return np.clip(mono, -1.0, 1.0).astype(np.float32)


def decode_audio(data: bytes, limits: AudioConfig = AudioConfig()) -> np.ndarray:
    """Decode a complete audio file (WAV, MP3, Ogg, FLAC, WebM, MP4/AAC) to 16 kHz mono."""
    data = check_input_bytes(data, limits)
    if data[:4] == b"RIFF":
        header = parse_wav_header(data, limits)
        assert header is not None  # final=True never returns None
        frames = header.frames_available(len(data))
        if frames == 0:
            raise MalformedAudio("WAV file holds no audio samples")
        check_duration(frames, header.sample_rate, limits)
        return _decode_container(data, "wav", limits)
    fmt = sniff_format(data[:12])
    if fmt is None:
        raise UnsupportedAudio(
            "input is not a recognised audio file (expected WAV, MP3, AAC, Ogg, FLAC, WebM "
            "or MP4); raw PCM needs Content-Type audio/L16;rate=<Hz>"
        )
    return _decode_container(data, fmt.kind, limits)


def decode_pcm16(
    data: bytes, sample_rate: int, channels: int = 1, limits: AudioConfig = AudioConfig()
) -> np.ndarray:
    """Decode raw little-endian interleaved PCM16 at `sample_rate` to 16 kHz mono."""
    data = check_input_bytes(data, limits)
    check_rate_and_channels(sample_rate, channels, limits)
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise MalformedAudio(
            f"raw PCM16 length {len(data)} is not a multiple of {frame_bytes} bytes "
            f"({channels} channel(s) x 2 bytes); the last frame is cut"
        )
    check_duration(len(data) // frame_bytes, sample_rate, limits)
    mono = downmix(pcm_to_float(data, "s16", channels), channel_axis=1)
    resampler = Resampler(sample_rate)
    return np.concatenate([resampler.push(mono), resampler.flush()])


def decode_body(data: bytes, fmt: AudioFormat, limits: AudioConfig = AudioConfig()) -> np.ndarray:
    """Decode a complete HTTP body of the given format (raw PCM16 or any container)."""
    if fmt.kind == "pcm16":
        if fmt.sample_rate is None:
            raise MalformedAudio("raw PCM16 needs a sample rate (audio/L16;rate=<Hz>)")
        return decode_pcm16(data, fmt.sample_rate, fmt.channels, limits)
    return decode_audio(data, limits)


def load_audio(path: str | Path, limits: AudioConfig = AudioConfig()) -> np.ndarray:
    """Read and decode an audio file; its size is checked before it is read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no audio file at {path}")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise AudioTooLarge(f"{path} is {size} bytes, above the limit of {limits.max_bytes}")
    return decode_audio(path.read_bytes(), limits)


def _decode_container(data: bytes, kind: str, limits: AudioConfig) -> np.ndarray:
    """Demux and decode the first audio stream with PyAV, downmix, resample to 16 kHz."""
    label = "WAV" if kind == "wav" else kind.upper()
    try:
        container = av.open(
            io.BytesIO(data),
            mode="r",
            format=_DEMUXERS[kind],
            metadata_errors="replace",
            options=_PROBE_OPTIONS.get(kind, {}),
        )
    except av.FFmpegError as exc:
        # A file that carries its format's magic is broken; bare frame-sync bytes may be noise.
        strong = data.startswith(_STRONG_MAGIC) or data[4:8] == b"ftyp"
        error = MalformedAudio if strong else UnsupportedAudio
        raise error(f"{label} input could not be opened: {exc}") from exc
    pieces: list[np.ndarray] = []
    with container:
        if not container.streams.audio:
            raise UnsupportedAudio(f"{label} input has no audio stream")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        if ctx is None:
            raise UnsupportedAudio(f"{label} input uses an audio codec that cannot be decoded")
        check_rate_and_channels(ctx.sample_rate, ctx.channels, limits)
        resampler: Resampler | None = None
        seconds = 0.0
        try:
            for frame in container.decode(stream):
                check_rate_and_channels(frame.sample_rate, frame.layout.nb_channels, limits)
                mono = frame_to_mono(frame)
                seconds += mono.size / frame.sample_rate
                if seconds > limits.max_seconds:
                    raise AudioTooLarge(
                        f"{label} input is longer than the limit of {limits.max_seconds:g} s; "
                        "split it into shorter clips"
                    )
                if resampler is None or resampler.input_rate != frame.sample_rate:
                    if resampler is not None:
                        pieces.append(resampler.flush())
                    resampler = Resampler(frame.sample_rate)
                pieces.append(resampler.push(mono))
        except av.FFmpegError as exc:
            raise MalformedAudio(f"{label} input could not be decoded: {exc}") from exc
        if resampler is not None:
            pieces.append(resampler.flush())
    out = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    if out.size == 0:
        raise MalformedAudio(f"{label} input holds no audio samples")
    logger.debug("decoded %s: %.2f s at %d Hz", label, out.size / PIPELINE_RATE, PIPELINE_RATE)
    return out


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """A decoded PyAV audio frame -> float32 mono at the frame's rate (see `downmix`)."""
    arr = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        arr = arr.reshape(-1, channels).T
    name = frame.format.packed.name
    if name in _INT_SCALE:
        scale = _INT_SCALE[name]
        floats = arr.astype(np.float64 if name == "s64" else np.float32)
        if name == "u8":
            floats -= 128.0
        floats /= scale
    else:
        floats = arr
    return downmix(floats, channel_axis=0)
