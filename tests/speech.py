"""Test signals: offline TTS speech with pauses, tone bursts, silence, and WAV packing.

Other test modules import these to make their own audio; nothing here touches the network
or files outside the test's temporary directory.
"""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np

RATE = 16000
DEFAULT_PHRASES = (
    "Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming avatars need steady latency.",
)
_SUBTYPES = {  # subtype -> (format tag, bits)
    "PCM_U8": (1, 8),
    "PCM_16": (1, 16),
    "PCM_24": (1, 24),
    "PCM_32": (1, 32),
    "FLOAT": (3, 32),
    "DOUBLE": (3, 64),
}


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    """Digital silence of the given length."""
    return np.zeros(int(round(seconds * rate)), dtype=np.float32)


def tone_bursts(
    freq: float = 440.0,
    burst_s: float = 0.3,
    gap_s: float = 0.3,
    count: int = 3,
    amplitude: float = 0.5,
    rate: int = RATE,
) -> np.ndarray:
    """`count` sine bursts separated (and followed) by silences; each burst has 5 ms ramps."""
    n = int(round(burst_s * rate))
    t = np.arange(n) / rate
    burst = amplitude * np.sin(2 * np.pi * freq * t)
    ramp = min(n // 2, int(0.005 * rate))
    if ramp:
        window = np.linspace(0.0, 1.0, ramp)
        burst[:ramp] *= window
        burst[-ramp:] *= window[::-1]
    parts = []
    for _ in range(count):
        parts += [burst.astype(np.float32), silence(gap_s, rate)]
    return np.concatenate(parts)


def low_noise(seconds: float, level: float = 0.003, seed: int = 0) -> np.ndarray:
    """Quiet white noise (about -50 dBFS at the default level)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * level).astype(np.float32)


@lru_cache(maxsize=8)
def _speak(text: str) -> np.ndarray:
    from ray_lipsync.tts import Synthesizer

    return Synthesizer().synthesize(text)


def speech(text: str = DEFAULT_PHRASES[0]) -> np.ndarray:
    """One TTS phrase at 16 kHz (cached per text; returns a copy)."""
    return _speak(text).copy()


def speech_with_pauses(
    seed_text: str | tuple[str, ...] = DEFAULT_PHRASES,
    pause_s: float = 0.6,
    lead_s: float = 0.3,
) -> np.ndarray:
    """TTS phrases separated by `pause_s` silences, with `lead_s` silence at both ends.

    `seed_text` is a tuple of phrases, or one string split into phrases at '.', '?', '!'.
    """
    if isinstance(seed_text, str):
        marked = seed_text.replace("?", ".").replace("!", ".")
        phrases = tuple(p.strip() for p in marked.split(".") if p.strip())
    else:
        phrases = tuple(seed_text)
    parts = [silence(lead_s)]
    for i, phrase in enumerate(phrases):
        if i:
            parts.append(silence(pause_s))
        parts.append(_speak(phrase))
    parts.append(silence(lead_s))
    return np.concatenate(parts)


def to_wav_bytes(
    samples: np.ndarray, rate: int = RATE, channels: int = 1, subtype: str = "PCM_16"
) -> bytes:
    """Pack float samples in [-1, 1] into a WAV file.

    `samples` is 1-D (copied to every channel) or [frames, channels]. Subtypes: PCM_U8,
    PCM_16, PCM_24, PCM_32, FLOAT, DOUBLE.
    """
    tag, bits = _SUBTYPES[subtype]
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = np.repeat(x[:, None], channels, axis=1)
    if x.shape[1] != channels:
        raise ValueError(f"samples have {x.shape[1]} channels, expected {channels}")
    data = _pack(x.reshape(-1), subtype)
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data + (b"\0" if len(data) & 1 else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _pack(x: np.ndarray, subtype: str) -> bytes:
    if subtype == "FLOAT":
        return x.astype("<f4").tobytes()
    if subtype == "DOUBLE":
        return x.astype("<f8").tobytes()
    if subtype == "PCM_U8":
        return (np.clip(np.round(x * 128 + 128), 0, 255)).astype(np.uint8).tobytes()
    bits = int(subtype[4:])
    full = 2 ** (bits - 1)
    ints = np.clip(np.round(x * full), -full, full - 1).astype("<i4")
    if bits == 24:
        return ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return ints.astype("<i2" if bits == 16 else "<i4").tobytes()


def to_pcm16_bytes(samples: np.ndarray, channels: int = 1) -> bytes:
    """Raw little-endian interleaved PCM16 (1-D input is copied to every channel)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = np.repeat(x[:, None], channels, axis=1)
    return np.clip(np.round(x * 32768), -32768, 32767).astype("<i2").tobytes()


def encode_with_pyav(
    samples: np.ndarray, rate: int, container: str, codec: str, layout: str = "mono"
) -> bytes:
    """Encode a mono float signal with PyAV (e.g. ("mp3", "libmp3lame"), ("ogg", "libopus"),
    ("flac", "flac"), ("webm", "libopus"), ("adts", "aac"))."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        fmt = stream.codec_context.codec.audio_formats[0].name
        nch = 2 if layout == "stereo" else 1
        data = np.repeat(np.asarray(samples, dtype=np.float32)[None, :], nch, axis=0)
        frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=layout)
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate)
        for piece in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(piece):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()
