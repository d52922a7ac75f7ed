"""Streaming audio input: bytes arriving in arbitrary pieces -> 16 kHz mono float32.

`PcmStream` takes raw PCM16, `WavStream` a WAV file whose header is parsed incrementally, so
a chunked HTTP upload is decoded, and its limits enforced, while it arrives; the upload is
still queued on the session whole, once complete (ray_lipsync.api.uploads). Containers that
cannot be streamed (mp3, ogg, ...) are buffered and decoded on close. Every stream enforces
the same limits and yields the same samples as the one-shot decoders in decode.py. `Chunker`
cuts a sample stream into the pipeline's 20 ms chunks.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from ray_lipsync.audio.decode import (
    AudioFormat,
    check_duration,
    decode_audio,
    decode_body,
    downmix,
    sniff_format,
)
from ray_lipsync.audio.resample import Resampler
from ray_lipsync.audio.wav import WavHeader, check_rate_and_channels, parse_wav_header, pcm_to_float
from ray_lipsync.config import AudioConfig
from ray_lipsync.errors import AudioTooLarge, MalformedAudio, UnsupportedAudio

logger = logging.getLogger(__name__)

CHUNK_SAMPLES = 320  # 20 ms at 16 kHz
_EMPTY = np.zeros(0, dtype=np.float32)


class AudioStream(Protocol):
    """Bytes in, 16 kHz mono float32 samples out."""

    def feed(self, data: bytes) -> np.ndarray: ...

    def close(self) -> np.ndarray: ...


class Chunker:
    """Cuts a sample stream into fixed chunks (20 ms = 320 samples), keeping the remainder."""

    def __init__(self, chunk_samples: int = CHUNK_SAMPLES) -> None:
        if chunk_samples <= 0:
            raise ValueError(f"chunk_samples must be positive, got {chunk_samples}")
        self.chunk_samples = chunk_samples
        self._pending = _EMPTY
        self.chunks_emitted = 0

    @property
    def pending(self) -> int:
        """Samples held back until the next chunk completes."""
        return self._pending.size

    def feed(self, samples: np.ndarray) -> list[np.ndarray]:
        """Append samples; return every chunk they complete (each a new float32 array)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        buf = np.concatenate([self._pending, samples]) if self._pending.size else samples
        whole = buf.size // self.chunk_samples * self.chunk_samples
        step = self.chunk_samples
        chunks = [buf[i : i + step].copy() for i in range(0, whole, step)]
        self._pending = buf[whole:].copy()
        self.chunks_emitted += len(chunks)
        return chunks

    def flush(self, pad: bool = True) -> np.ndarray | None:
        """The held-back remainder (zero-padded to a whole chunk if `pad`), or None if none."""
        if not self._pending.size:
            return None
        rest, self._pending = self._pending, _EMPTY
        if not pad:
            return rest
        self.chunks_emitted += 1
        return np.concatenate([rest, np.zeros(self.chunk_samples - rest.size, np.float32)])


class _Budget:
    """Counts input bytes and input frames against the limits."""

    def __init__(self, limits: AudioConfig) -> None:
        self.limits = limits
        self.bytes = 0
        self.frames = 0
        self.closed = False

    def take(self, data: bytes) -> bytes:
        if self.closed:
            raise RuntimeError("audio stream is closed; open a new one")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UnsupportedAudio(f"audio must be bytes, got {type(data).__name__}")
        data = bytes(data)
        self.bytes += len(data)
        if self.bytes > self.limits.max_bytes:
            raise AudioTooLarge(
                f"audio stream passed the limit of {self.limits.max_bytes} bytes; "
                "send a shorter clip"
            )
        return data

    def count(self, frames: int, rate: int) -> None:
        self.frames += frames
        check_duration(self.frames, rate, self.limits)


class _PcmDecoder:
    """Interleaved PCM of a known sample format -> resampled mono; keeps partial frames."""

    def __init__(self, sample_format: str, rate: int, channels: int, budget: _Budget) -> None:
        self.sample_format = sample_format
        self.rate = rate
        self.channels = channels
        self.frame_bytes = channels * {"u8": 1, "s16": 2, "s24": 3, "s32": 4, "f32": 4, "f64": 8}[
            sample_format
        ]
        self._budget = budget
        self._partial = b""
        self._resampler = Resampler(rate)

    def push(self, raw: bytes) -> np.ndarray:
        buf = self._partial + raw if self._partial else raw
        whole = len(buf) // self.frame_bytes * self.frame_bytes
        self._partial = buf[whole:]
        if not whole:
            return _EMPTY
        self._budget.count(whole // self.frame_bytes, self.rate)
        frames = pcm_to_float(buf[:whole], self.sample_format, self.channels)
        return self._resampler.push(downmix(frames, channel_axis=1))

    def close(self) -> np.ndarray:
        if self._partial:
            logger.debug("dropping %d bytes of a partial last sample frame", len(self._partial))
        return self._resampler.flush()


class PcmStream:
    """Raw little-endian PCM16 at a stated rate, in pieces of any size (odd counts welcome)."""

    def __init__(self, sample_rate: int, channels: int = 1, limits: AudioConfig = AudioConfig()):
        check_rate_and_channels(sample_rate, channels, limits)
        self._budget = _Budget(limits)
        self._decoder = _PcmDecoder("s16", sample_rate, channels, self._budget)

    def feed(self, data: bytes) -> np.ndarray:
        """Decode the next piece; returns the 16 kHz samples it completes (may be empty)."""
        return self._decoder.push(self._budget.take(data))

    def close(self) -> np.ndarray:
        """End of input: the resampler's tail. Raises MalformedAudio if no sample came."""
        self._budget.closed = True
        tail = self._decoder.close()
        if self._budget.frames == 0:
            raise MalformedAudio("raw PCM16 stream ended without a single sample frame")
        return tail


class WavStream:
    """A WAV file in pieces: the header is parsed as it arrives, then PCM/float data streams.

    WAVs with compressed codecs (A-law, ADPCM, ...) are buffered and decoded on close.
    """

    def __init__(self, limits: AudioConfig = AudioConfig()) -> None:
        self.limits = limits
        self.header: WavHeader | None = None
        self._budget = _Budget(limits)
        self._head = b""
        self._decoder: _PcmDecoder | None = None
        self._data_left: int | None = None  # bytes of the data chunk still expected
        self._buffered: list[bytes] | None = None

    def feed(self, data: bytes) -> np.ndarray:
        """Consume the next piece; returns the 16 kHz samples it completes (may be empty)."""
        data = self._budget.take(data)
        if self._buffered is not None:
            self._buffered.append(data)
            return _EMPTY
        if self.header is None:
            self._head += data
            header = parse_wav_header(self._head, self.limits, final=False)
            if header is None:
                return _EMPTY
            return self._start(header)
        return self._data(data)

    def _start(self, header: WavHeader) -> np.ndarray:
        self.header = header
        head, self._head = self._head, b""
        if header.sample_format is None:  # compressed WAV: let PyAV have it at the end
            self._buffered = [head]
            return _EMPTY
        if header.data_size is not None:
            check_duration(header.data_size // header.block_align, header.sample_rate, self.limits)
        self._data_left = header.data_size
        self._decoder = _PcmDecoder(
            header.sample_format, header.sample_rate, header.channels, self._budget
        )
        return self._data(head[header.data_offset :])

    def _data(self, raw: bytes) -> np.ndarray:
        assert self._decoder is not None
        if self._data_left is not None:
            raw = raw[: self._data_left]  # chunks after the data chunk are ignored
            self._data_left -= len(raw)
        return self._decoder.push(raw) if raw else _EMPTY

    def close(self) -> np.ndarray:
        """End of input: the remaining samples. Raises for truncated or empty files."""
        self._budget.closed = True
        if self._buffered is not None:
            return decode_audio(b"".join(self._buffered), self.limits)
        if self.header is None:
            if not self._head:
                raise MalformedAudio("audio input is empty; send a WAV file")
            parse_wav_header(self._head, self.limits, final=True)  # raises: header incomplete
            raise MalformedAudio("WAV header incomplete")  # pragma: no cover - parse raised
        assert self._decoder is not None
        tail = self._decoder.close()
        if self._budget.frames == 0:
            raise MalformedAudio("WAV file holds no audio samples")
        if self._data_left:
            raise MalformedAudio(f"WAV ended {self._data_left} bytes before the data size its "
                                 "header declares (truncated file); send the whole file")
        return tail


class BufferedStream:
    """For formats that cannot be decoded incrementally: collect bytes, decode on close."""

    def __init__(self, fmt: AudioFormat, limits: AudioConfig = AudioConfig()) -> None:
        self.fmt = fmt
        self.limits = limits
        self._budget = _Budget(limits)
        self._pieces: list[bytes] = []

    def feed(self, data: bytes) -> np.ndarray:
        self._pieces.append(self._budget.take(data))
        return _EMPTY

    def close(self) -> np.ndarray:
        self._budget.closed = True
        return decode_body(b"".join(self._pieces), self.fmt, self.limits)


class SniffStream:
    """application/octet-stream: looks at the first 12 bytes, then streams WAV or buffers."""

    def __init__(self, limits: AudioConfig = AudioConfig()) -> None:
        self.limits = limits
        self._head = b""
        self._inner: AudioStream | None = None
        self._closed = False

    def feed(self, data: bytes) -> np.ndarray:
        if self._inner is not None:
            return self._inner.feed(data)
        if self._closed:
            raise RuntimeError("audio stream is closed; open a new one")
        self._head += _Budget(self.limits).take(data)  # type and size checks of this piece
        if len(self._head) < 12:
            return _EMPTY
        fmt = sniff_format(self._head[:12])
        if fmt is None:
            raise UnsupportedAudio(
                "body is not a recognised audio file; set Content-Type (audio/wav, "
                "audio/L16;rate=<Hz>, audio/mpeg, ...)"
            )
        if fmt.kind == "wav":
            self._inner = WavStream(self.limits)
        else:
            self._inner = BufferedStream(fmt, self.limits)
        head, self._head = self._head, b""
        return self._inner.feed(head)

    def close(self) -> np.ndarray:
        self._closed = True
        if self._inner is not None:
            return self._inner.close()
        return decode_audio(self._head, self.limits)  # short input: raises the right error


def open_stream(fmt: AudioFormat, limits: AudioConfig = AudioConfig()) -> AudioStream:
    """The stream that decodes a body of format `fmt` (see parse_content_type)."""
    if fmt.kind == "pcm16":
        if fmt.sample_rate is None:
            raise MalformedAudio("raw PCM16 needs a sample rate (audio/L16;rate=<Hz>)")
        return PcmStream(fmt.sample_rate, fmt.channels, limits)
    if fmt.kind == "wav":
        return WavStream(limits)
    if fmt.kind == "sniff":
        return SniffStream(limits)
    return BufferedStream(fmt, limits)
