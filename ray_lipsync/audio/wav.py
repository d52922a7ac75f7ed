"""WAV (RIFF) header parsing and PCM sample conversion.

The stdlib `wave` module reads neither float, 24-bit nor WAVE_FORMAT_EXTENSIBLE files, and
ffmpeg accepts broken headers silently, so the header is validated here. The parser works on
a growing prefix of the file (it says when it needs more bytes), which lets `WavStream`
parse a WAV arriving in pieces. One-shot decoding still goes through PyAV (decode.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ray_lipsync.config import AudioConfig
from ray_lipsync.errors import MalformedAudio, UnsupportedAudio

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
MAX_HEADER_BYTES = 1 << 20  # metadata chunks before "data" larger than this are refused
_MAX_FMT_BYTES = 4096
# SubFormat GUIDs of WAVE_FORMAT_EXTENSIBLE are {tag}-0000-0010-8000-00AA00389B71.
_KSDATAFORMAT_TAIL = bytes.fromhex("000000001000800000aa00389b71")
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # written by streaming encoders that cannot seek back


@dataclass(frozen=True)
class WavHeader:
    """The parts of a WAV header the decoder needs.

    `data_size` is None when the writer did not know it (0 or 0xFFFFFFFF): data runs to the
    end of the file. `sample_format` is one of u8, s16, s24, s32, f32, f64, or None for
    codecs (A-law, ADPCM, ...) that only PyAV can decode.
    """

    format_tag: int
    channels: int
    sample_rate: int
    bits_per_sample: int
    block_align: int
    data_offset: int
    data_size: int | None

    @property
    def sample_format(self) -> str | None:
        if self.format_tag == WAVE_FORMAT_PCM:
            return {8: "u8", 16: "s16", 24: "s24", 32: "s32"}.get(self.bits_per_sample)
        if self.format_tag == WAVE_FORMAT_IEEE_FLOAT:
            return {32: "f32", 64: "f64"}.get(self.bits_per_sample)
        return None

    def frames_available(self, total_bytes: int) -> int:
        """Whole sample frames present in a file of `total_bytes` (declared size respected)."""
        available = max(0, total_bytes - self.data_offset)
        if self.data_size is not None:
            available = min(available, self.data_size)
        return available // self.block_align


def is_riff_wave(head: bytes) -> bool:
    """True when `head` starts like a RIFF/WAVE file (needs 12 bytes to say yes)."""
    return len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE"


def parse_wav_header(data: bytes, limits: AudioConfig, *, final: bool = True) -> WavHeader | None:
    """Parse and validate the header at the start of `data`.

    Returns None when `data` is a valid but incomplete prefix and `final` is False (feed
    more bytes). Raises MalformedAudio for truncated or inconsistent headers and absurd
    rates or channel counts, UnsupportedAudio when the bytes are not a RIFF/WAVE file.
    """
    if len(data) < 12:
        if data[:4] != b"RIFF"[: len(data)]:
            raise UnsupportedAudio("not a WAV file (no RIFF header); check the Content-Type")
        if not final:
            return None
        raise MalformedAudio(
            f"WAV header truncated: {len(data)} bytes, a RIFF header needs at least 12"
        )
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        if data[:4] in (b"RIFX", b"RF64"):
            raise UnsupportedAudio(f"{data[:4].decode()} WAV files are not supported; send RIFF")
        raise UnsupportedAudio("not a WAV file (no RIFF/WAVE header); check the Content-Type")

    fmt: tuple[int, int, int, int, int] | None = None
    offset = 12
    while True:
        if offset > MAX_HEADER_BYTES:
            raise MalformedAudio(
                f"WAV has more than {MAX_HEADER_BYTES} bytes of chunks before its data chunk"
            )
        if offset + 8 > len(data):
            return _need_more(final, "no data chunk found")
        chunk_id = data[offset : offset + 4]
        (chunk_size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        if chunk_id == b"data":
            if fmt is None:
                raise MalformedAudio("WAV data chunk comes before its fmt chunk")
            size = None if chunk_size in _UNKNOWN_SIZES else chunk_size
            return _validated(fmt, body, size, limits)
        if chunk_id == b"fmt ":
            if not 16 <= chunk_size <= _MAX_FMT_BYTES:
                raise MalformedAudio(
                    f"WAV fmt chunk of {chunk_size} bytes is not valid (16..{_MAX_FMT_BYTES})"
                )
            if body + chunk_size > len(data):
                return _need_more(final, "fmt chunk cut short")
            fmt = _read_fmt(data[body : body + chunk_size])
        offset = body + chunk_size + (chunk_size & 1)


def _need_more(final: bool, what: str) -> None:
    if final:
        raise MalformedAudio(f"WAV header truncated ({what}); send the complete file")
    return None


def _read_fmt(chunk: bytes) -> tuple[int, int, int, int, int]:
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", chunk)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(chunk) < 40:
            raise MalformedAudio("WAVE_FORMAT_EXTENSIBLE fmt chunk shorter than 40 bytes")
        (tag,) = struct.unpack_from("<H", chunk, 24)  # first two bytes of the SubFormat GUID
        if chunk[26:40] != _KSDATAFORMAT_TAIL:
            tag = WAVE_FORMAT_EXTENSIBLE  # not a WAVE_FORMAT_* GUID: PyAV decides
    return tag, channels, rate, block_align, bits


def _validated(
    fmt: tuple[int, int, int, int, int], data_offset: int, size: int | None, limits: AudioConfig
) -> WavHeader:
    tag, channels, rate, block_align, bits = fmt
    check_rate_and_channels(rate, channels, limits)
    header = WavHeader(tag, channels, rate, bits, block_align, data_offset, size)
    if tag in (WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT):
        if header.sample_format is None:
            kind = "PCM" if tag == WAVE_FORMAT_PCM else "float"
            raise MalformedAudio(f"WAV {kind} with {bits} bits per sample is not valid")
        if block_align != channels * bits // 8:
            raise MalformedAudio(
                f"WAV block align {block_align} does not match {channels} channels x {bits} bits"
            )
    elif block_align == 0:
        raise MalformedAudio("WAV block align is 0")
    return header


def check_rate_and_channels(rate: int, channels: int, limits: AudioConfig) -> None:
    """Raise MalformedAudio for a sample rate or channel count outside the configured limits."""
    if not limits.min_sample_rate <= rate <= limits.max_sample_rate:
        raise MalformedAudio(
            f"sample rate {rate} Hz is outside {limits.min_sample_rate}..{limits.max_sample_rate}"
            " Hz; resample the audio or state the right rate"
        )
    if not 1 <= channels <= limits.max_channels:
        raise MalformedAudio(f"channel count {channels} is outside 1..{limits.max_channels}")


def pcm_to_float(raw: bytes, sample_format: str, channels: int) -> np.ndarray:
    """Interleaved little-endian samples -> float32 array [frames, channels] in about [-1, 1].

    `raw` must hold whole frames. Float input is returned as is (callers check finiteness).
    """
    if sample_format == "s24":
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8  # sign lands in bit 31
        out = ints.astype(np.float32) / np.float32(2**31)
    elif sample_format == "u8":
        out = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        dtype, scale = {
            "s16": ("<i2", 2.0**15),
            "s32": ("<i4", 2.0**31),
            "f32": ("<f4", 1.0),
            "f64": ("<f8", 1.0),
        }[sample_format]
        out = np.frombuffer(raw, dtype=dtype).astype(np.float32)
        if scale != 1.0:
            out /= np.float32(scale)
    return out.reshape(-1, channels)
