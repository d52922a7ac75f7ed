"""Audio input: one-shot decoding, bad input, content types, streaming decoders, chunking."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from speech import encode_with_pyav, to_pcm16_bytes, to_wav_bytes, tone_bursts

from ray_lipsync.audio import (
    AudioFormat,
    Chunker,
    PcmStream,
    WavStream,
    decode_audio,
    decode_body,
    decode_pcm16,
    load_audio,
    open_stream,
    parse_content_type,
    resample,
)
from ray_lipsync.config import AudioConfig
from ray_lipsync.errors import AudioTooLarge, MalformedAudio, UnsupportedAudio

RATE = 16000


def sine(rate: int, seconds: float = 1.0, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def assert_is_sine(out: np.ndarray, seconds: float = 1.0, tol: float = 1e-3) -> None:
    """`out` is a 440 Hz sine of amplitude 0.5 at 16 kHz (edges of the filter excluded)."""
    assert out.dtype == np.float32 and out.ndim == 1
    assert out.size == int(RATE * seconds)
    ref = sine(RATE, seconds)
    assert np.abs(out[200:-200] - ref[200:-200]).max() < tol


def pieces(data: bytes, seed: int = 0) -> list[bytes]:
    """Split bytes at random points (pieces of 1..997 bytes, many odd)."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < len(data):
        n = int(rng.integers(1, 998))
        out.append(data[i : i + n])
        i += n
    return out


def run_stream(stream, data: bytes, seed: int = 0) -> np.ndarray:
    parts = [stream.feed(p) for p in pieces(data, seed)]
    return np.concatenate(parts + [stream.close()])


# --- one-shot decoding -------------------------------------------------------------------


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_wav_subtypes_decode_to_16k(subtype: str) -> None:
    out = decode_audio(to_wav_bytes(sine(48000), 48000, subtype=subtype))
    assert_is_sine(out, tol=1e-2 if subtype == "PCM_U8" else 1e-4)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_wav_rates_resampled(rate: int) -> None:
    assert_is_sine(decode_audio(to_wav_bytes(sine(rate), rate)))


def test_multichannel_is_averaged() -> None:
    left, right = sine(44100), np.zeros(44100)
    stereo = np.stack([left, right], axis=1)
    out = decode_audio(to_wav_bytes(stereo, 44100, channels=2, subtype="FLOAT"))
    assert np.abs(out[200:-200] - sine(RATE)[200:-200] / 2).max() < 1e-4
    six = decode_audio(to_wav_bytes(sine(48000), 48000, channels=6, subtype="PCM_24"))
    assert_is_sine(six)


def test_wave_format_extensible() -> None:
    wav = to_wav_bytes(sine(48000), 48000, channels=2, subtype="PCM_24")
    fmt_at = wav.index(b"fmt ")
    ext = struct.pack("<HHIIHH", 0xFFFE, 2, 48000, 48000 * 6, 6, 24)
    ext += struct.pack("<HHIH", 22, 24, 3, 1) + bytes.fromhex("000000001000800000aa00389b71")
    body = wav[12:fmt_at] + b"fmt " + struct.pack("<I", len(ext)) + ext + wav[fmt_at + 24 :]
    assert_is_sine(decode_audio(b"RIFF" + struct.pack("<I", len(body) + 4) + b"WAVE" + body))


def test_raw_pcm16() -> None:
    assert_is_sine(decode_pcm16(to_pcm16_bytes(sine(8000)), 8000))
    stereo = to_pcm16_bytes(sine(48000), channels=2)
    assert_is_sine(decode_pcm16(stereo, 48000, channels=2))
    assert_is_sine(decode_body(stereo, AudioFormat("pcm16", 48000, 2)))


@pytest.mark.parametrize(
    ("container", "codec", "rate"),
    [("mp3", "libmp3lame", 44100), ("ogg", "libopus", 48000), ("flac", "flac", 22050)],
)
def test_compressed_containers(container: str, codec: str, rate: int) -> None:
    clip = tone_bursts(count=2)
    out = decode_audio(encode_with_pyav(resample(clip, RATE, rate), rate, container, codec))
    assert abs(out.size - clip.size) <= 0.1 * RATE  # encoder padding allowed
    assert 0.4 < np.abs(out).max() <= 1.0
    loud = np.abs(out) > 0.1
    assert loud[: int(0.25 * RATE)].any() and not loud[int(0.4 * RATE) : int(0.5 * RATE)].any()


def test_unknown_data_size_reads_to_end() -> None:
    wav = bytearray(to_wav_bytes(sine(16000), 16000))
    at = wav.index(b"data") + 4
    wav[at : at + 4] = struct.pack("<I", 0xFFFFFFFF)
    assert_is_sine(decode_audio(bytes(wav)))


def test_output_clipped_to_unit_range() -> None:
    out = decode_audio(to_wav_bytes(3.0 * sine(16000), 16000, subtype="FLOAT"))
    assert out.max() <= 1.0 and out.min() >= -1.0


def test_load_audio(tmp_path) -> None:
    path = tmp_path / "clip.wav"
    path.write_bytes(to_wav_bytes(sine(22050), 22050))
    assert_is_sine(load_audio(path))
    with pytest.raises(AudioTooLarge):
        load_audio(path, AudioConfig(max_bytes=1000))


# --- bad input -----------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)
NOISE = np.random.default_rng(3).integers(0, 255, 4000, dtype=np.uint8).tobytes()


def _set_fmt(wav: bytes, **fields: int) -> bytes:
    names = ["tag", "channels", "rate", "byte_rate", "block_align", "bits"]
    at = wav.index(b"fmt ") + 8
    values = dict(zip(names, struct.unpack_from("<HHIIHH", wav, at)))
    values.update(fields)
    return wav[:at] + struct.pack("<HHIIHH", *values.values()) + wav[at + 16 :]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", MalformedAudio),
        (NOISE, UnsupportedAudio),
        (b"hello, this is plain text and not audio at all" * 20, UnsupportedAudio),
        (PNG, UnsupportedAudio),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", MalformedAudio),  # truncated header
        (b"RIFF\x24\x00", MalformedAudio),
        (to_wav_bytes(sine(16000), 16000)[:40], MalformedAudio),  # cut inside the data header
        (_set_fmt(to_wav_bytes(sine(16000), 16000), rate=0), MalformedAudio),
        (_set_fmt(to_wav_bytes(sine(16000), 16000), rate=10_000_000), MalformedAudio),
        (_set_fmt(to_wav_bytes(sine(16000), 16000), channels=0), MalformedAudio),
        (_set_fmt(to_wav_bytes(sine(16000), 16000), channels=200, block_align=400), MalformedAudio),
        (_set_fmt(to_wav_bytes(sine(16000), 16000), block_align=7), MalformedAudio),
        (_set_fmt(to_wav_bytes(sine(16000), 16000), bits=12), MalformedAudio),
        (to_wav_bytes(np.zeros(0), 16000), MalformedAudio),  # no samples
        (to_wav_bytes(np.r_[sine(16000)[:100], np.nan], 16000, subtype="FLOAT"), MalformedAudio),
        (to_wav_bytes(np.r_[np.inf, sine(16000)[:100]], 16000, subtype="DOUBLE"), MalformedAudio),
        (b"RIFF\x24\x00\x00\x00AVI LIST" + bytes(40), UnsupportedAudio),
        (b"ID3\x04" + bytes(300), MalformedAudio),  # says mp3, holds nothing
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_bad_input_raises_one_typed_error(data: bytes, error: type) -> None:
    with pytest.raises(error) as info:
        decode_audio(data)
    assert str(info.value)  # says what is wrong


def test_limits() -> None:
    wav = to_wav_bytes(sine(16000, seconds=3.0), 16000)
    with pytest.raises(AudioTooLarge):
        decode_audio(wav, AudioConfig(max_bytes=len(wav) - 1))
    with pytest.raises(AudioTooLarge):
        decode_audio(wav, AudioConfig(max_seconds=2.0))
    mp3 = encode_with_pyav(sine(44100, seconds=3.0), 44100, "mp3", "libmp3lame")
    with pytest.raises(AudioTooLarge):
        decode_audio(mp3, AudioConfig(max_seconds=2.0))
    with pytest.raises(AudioTooLarge):
        raw = to_pcm16_bytes(sine(8000, seconds=3.0))
        decode_pcm16(raw, 8000, limits=AudioConfig(max_seconds=2))


def test_raw_pcm16_bad_input() -> None:
    with pytest.raises(MalformedAudio):
        decode_pcm16(b"\x00\x01\x02", 16000)  # cut frame
    with pytest.raises(MalformedAudio):
        decode_pcm16(b"\x00\x01", 0)
    with pytest.raises(MalformedAudio):
        decode_pcm16(b"\x00\x01" * 4, 16000, channels=64)
    with pytest.raises(MalformedAudio):
        decode_pcm16(b"", 16000)
    with pytest.raises(UnsupportedAudio):
        decode_pcm16("text", 16000)  # type: ignore[arg-type]


# --- content types --------------------------------------------------------------------------


def test_parse_content_type() -> None:
    assert parse_content_type("audio/wav").kind == "wav"
    assert parse_content_type("audio/x-wav").kind == "wav"
    assert parse_content_type("Audio/Wave; codecs=1").kind == "wav"
    assert parse_content_type("audio/L16;rate=8000") == AudioFormat("pcm16", 8000, 1)
    assert parse_content_type("audio/l16; rate=48000; channels=2") == AudioFormat("pcm16", 48000, 2)
    assert parse_content_type("audio/mpeg").kind == "mpeg"
    assert parse_content_type("audio/ogg").kind == "ogg"
    assert parse_content_type("audio/flac").kind == "flac"
    assert parse_content_type("application/octet-stream").kind == "sniff"
    for bad in ["text/plain", "image/png", "", "application/x-www-form-urlencoded"]:
        with pytest.raises(UnsupportedAudio):
            parse_content_type(bad)
    bad_l16 = ["audio/L16", "audio/L16;rate=abc", "audio/L16;rate=0", "audio/L16;rate=8000;channels=0"]
    for bad in bad_l16:
        with pytest.raises(MalformedAudio):
            parse_content_type(bad)


# --- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subtype", "rate", "channels"),
    [("PCM_16", 44100, 2), ("PCM_24", 48000, 1), ("PCM_32", 8000, 1), ("FLOAT", 22050, 2)],
)
def test_wav_stream_equals_one_shot(subtype: str, rate: int, channels: int) -> None:
    clip = tone_bursts(count=2)
    wav = to_wav_bytes(resample(clip, RATE, rate), rate, channels, subtype)
    one_shot = decode_audio(wav)
    streamed = run_stream(WavStream(), wav)
    assert streamed.size == one_shot.size
    assert np.abs(streamed - one_shot).max() < 1e-5


def test_wav_stream_yields_before_upload_ends() -> None:
    wav = to_wav_bytes(sine(48000, seconds=2.0), 48000)
    stream = WavStream()
    got = stream.feed(wav[: len(wav) // 2])
    assert got.size > 0.9 * RATE  # about the first second is out already
    rest = np.concatenate([got, stream.feed(wav[len(wav) // 2 :]), stream.close()])
    assert_is_sine(rest, seconds=2.0)


def test_wav_stream_ignores_chunks_after_data() -> None:
    wav = to_wav_bytes(sine(16000), 16000) + b"LIST\x04\x00\x00\x00junk"
    assert_is_sine(run_stream(WavStream(), wav))


def test_pcm_stream_equals_one_shot_odd_pieces() -> None:
    raw = to_pcm16_bytes(sine(44100), channels=2)
    streamed = run_stream(PcmStream(44100, 2), raw, seed=5)
    one_shot = decode_pcm16(raw, 44100, 2)
    assert streamed.size == one_shot.size
    assert np.abs(streamed - one_shot).max() < 1e-6
    assert_is_sine(streamed)


def test_stream_joins_have_no_clicks() -> None:
    raw = to_pcm16_bytes(sine(48000))
    stream = PcmStream(48000)
    out = np.concatenate([stream.feed(raw[i : i + 1922]) for i in range(0, len(raw), 1922)])
    out = np.concatenate([out, stream.close()])
    assert np.abs(np.diff(out[100:-100])).max() < 0.1  # a 440 Hz sine steps at most ~0.087


@pytest.mark.parametrize("content_type", ["audio/mpeg", "application/octet-stream"])
def test_buffered_and_sniffed_streams(content_type: str) -> None:
    mp3 = encode_with_pyav(sine(44100), 44100, "mp3", "libmp3lame")
    stream = open_stream(parse_content_type(content_type))
    assert np.array_equal(run_stream(stream, mp3), decode_audio(mp3))


def test_sniffed_wav_streams() -> None:
    wav = to_wav_bytes(sine(48000), 48000)
    stream = open_stream(parse_content_type("application/octet-stream"))
    assert stream.feed(wav[:5]).size == 0
    first = stream.feed(wav[5:20000])
    assert first.size > 0
    rest = [stream.feed(wav[:0]), stream.feed(wav[20000:]), stream.close()]
    assert_is_sine(np.concatenate([first, *rest]))


def test_stream_limits_and_errors() -> None:
    wav = to_wav_bytes(sine(16000, seconds=3.0), 16000)
    with pytest.raises(AudioTooLarge):  # the header already says 3 s
        run_stream(WavStream(AudioConfig(max_seconds=2.0)), wav)
    with pytest.raises(AudioTooLarge):
        run_stream(WavStream(AudioConfig(max_bytes=len(wav) // 2)), wav)
    raw = to_pcm16_bytes(sine(16000, seconds=3.0))
    with pytest.raises(AudioTooLarge):
        run_stream(PcmStream(16000, limits=AudioConfig(max_seconds=2.0)), raw)
    with pytest.raises(MalformedAudio):
        WavStream().close()
    with pytest.raises(MalformedAudio):
        run_stream(WavStream(), wav[:30])
    with pytest.raises(UnsupportedAudio):
        WavStream().feed(PNG)
    with pytest.raises(MalformedAudio):
        run_stream(WavStream(), to_wav_bytes(np.r_[0.1, np.nan], 16000, subtype="FLOAT"))
    with pytest.raises(MalformedAudio):
        PcmStream(0)
    with pytest.raises(UnsupportedAudio):
        run_stream(open_stream(AudioFormat("sniff")), b"just some text, definitely not audio")


# --- chunking --------------------------------------------------------------------------------


def test_chunker_keeps_remainder() -> None:
    chunker = Chunker()
    signal = np.arange(1000, dtype=np.float32)
    assert chunker.feed(signal[:300]) == [] and chunker.pending == 300
    chunks = chunker.feed(signal[300:700])
    assert [c.size for c in chunks] == [320, 320] and chunker.pending == 60
    chunks += chunker.feed(signal[700:])
    assert len(chunks) == 3 and chunker.pending == 40
    last = chunker.flush()
    assert last is not None and last.size == 320
    joined = np.concatenate(chunks + [last])
    assert np.array_equal(joined[:1000], signal) and not joined[1000:].any()
    assert chunker.flush() is None and chunker.chunks_emitted == 4
    assert chunker.feed(np.zeros(0)) == []


def test_chunker_flush_without_pad() -> None:
    chunker = Chunker()
    assert len(chunker.feed(np.ones(650, np.float32))) == 2
    rest = chunker.flush(pad=False)
    assert rest is not None and rest.size == 10
    assert chunker.pending == 0 and chunker.flush() is None


def test_mutated_files_never_crash_or_leak_bad_samples() -> None:
    """Corrupted, cut and spliced files either decode to clean samples or raise typed errors."""
    from ray_lipsync.errors import AudioInputError

    clip = tone_bursts(count=1, burst_s=0.2, gap_s=0.1)
    seeds = [
        to_wav_bytes(clip, 16000),
        to_wav_bytes(clip, 44100, 2, "FLOAT"),
        encode_with_pyav(clip, 16000, "mp3", "libmp3lame"),
        encode_with_pyav(clip, 48000, "ogg", "libopus"),
    ]
    rng = np.random.default_rng(7)
    for i in range(120):
        data = bytearray(seeds[i % len(seeds)])
        at = int(rng.integers(0, len(data)))
        if i % 3 == 0:
            for pos in rng.integers(0, min(len(data), 120), 8):
                data[pos] = int(rng.integers(0, 256))
        elif i % 3 == 1:
            data = data[:at]
        else:
            data = data[:at] + rng.integers(0, 256, 40, dtype=np.uint8).tobytes() + data[at:]
        try:
            out = decode_audio(bytes(data))
        except AudioInputError:
            continue
        assert out.dtype == np.float32 and out.size > 0
        assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
