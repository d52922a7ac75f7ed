"""Silero VAD per 20 ms chunk: speech vs silence, streaming == offline, hangover."""

from __future__ import annotations

import numpy as np
import pytest
from speech import DEFAULT_PHRASES, low_noise, silence, speech

from ray_lipsync.audio.vad import CHUNK, SpeechDetector
from ray_lipsync.config import AudioConfig

RATE = 16000


def layout(lead_s: float = 0.3, pause_s: float = 0.6) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The clip of `speech_with_pauses` rebuilt with the sample span of every phrase."""
    parts, spans, at = [silence(lead_s)], [], int(lead_s * RATE)
    for i, text in enumerate(DEFAULT_PHRASES):
        if i:
            parts.append(silence(pause_s))
            at += int(pause_s * RATE)
        phrase = speech(text)
        parts.append(phrase)
        spans.append((at, at + phrase.size))
        at += phrase.size
    parts.append(silence(lead_s))
    return np.concatenate(parts), spans


def test_speech_flagged_and_pauses_not(speech_detector: SpeechDetector) -> None:
    clip, spans = layout()
    flags = speech_detector.detect(clip)
    assert flags.dtype == bool and flags.size == -(-clip.size // CHUNK)
    for start, stop in spans:
        voiced = flags[start // CHUNK + 5 : stop // CHUNK]
        assert voiced.mean() > 0.8, f"phrase at {start / RATE:.2f} s mostly missed"
    assert not flags[: int(0.25 * RATE) // CHUNK].any()  # lead-in silence
    for (_, prev_stop), (next_start, _) in zip(spans, spans[1:]):
        # past the hangover (6 chunks) plus the window lag, the pause is silence
        gap = flags[prev_stop // CHUNK + 10 : next_start // CHUNK - 1]
        assert gap.size > 10 and not gap.any()


def test_silence_and_low_noise_are_not_speech(speech_detector: SpeechDetector) -> None:
    assert not speech_detector.detect(silence(2.0)).any()
    assert not speech_detector.detect(low_noise(3.0)).any()
    assert not speech_detector.detect(low_noise(1.0, level=0.01, seed=1)).any()


def test_streaming_equals_offline(speech_detector: SpeechDetector, speech_clip: np.ndarray) -> None:
    offline = speech_detector.detect(speech_clip)
    rng = np.random.default_rng(0)
    for trial in range(3):
        stream = speech_detector.stream()
        out, i = [], 0
        while i < speech_clip.size:
            n = int(rng.integers(0, 2500)) if trial else CHUNK  # trial 0: one chunk per push
            piece = speech_clip[i : i + n]
            flags = stream.push(piece)
            out.append(flags)
            i += n
            assert stream.chunks == min(i, speech_clip.size) // CHUNK
        out.append(stream.flush())
        assert np.array_equal(np.concatenate(out), offline)


def test_one_flag_per_completed_chunk(speech_detector: SpeechDetector) -> None:
    stream = speech_detector.stream()
    assert stream.push(np.zeros(319, np.float32)).size == 0
    assert stream.push(np.zeros(1, np.float32)).size == 1
    assert stream.push(np.zeros(960, np.float32)).size == 3
    assert stream.flush().size == 0
    assert stream.push(np.zeros(100, np.float32)).size == 0
    assert stream.flush().size == 1 and stream.chunks == 5


def test_hangover_extends_speech_by_n_chunks(speech_clip: np.ndarray) -> None:
    raw = SpeechDetector(hangover_chunks=0).detect(speech_clip)
    held = SpeechDetector(hangover_chunks=6).detect(speech_clip)
    expected = raw.copy()
    for lag in range(1, 7):
        expected[lag:] |= raw[:-lag]
    assert np.array_equal(held, expected)
    assert held.sum() > raw.sum()


def test_threshold_and_config() -> None:
    detector = SpeechDetector.from_config(AudioConfig(vad_threshold=0.9, vad_hangover_chunks=2))
    assert detector.threshold == 0.9 and detector.hangover_chunks == 2
    with pytest.raises(ValueError):
        SpeechDetector(threshold=1.5)
    with pytest.raises(ValueError):
        SpeechDetector(hangover_chunks=-1)


def test_a_configured_model_file_is_used_and_a_missing_one_refused(tmp_path) -> None:
    import shutil

    from ray_lipsync.audio.vad import default_model_path

    copy = tmp_path / "silero.onnx"
    shutil.copyfile(default_model_path(), copy)
    assert SpeechDetector.from_config(AudioConfig(vad_model=copy)).detect(np.zeros(800, np.float32)).shape == (3,)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(Exception):  # onnxruntime reads the configured file, not the bundled one
        SpeechDetector.from_config(AudioConfig(vad_model=broken))
    with pytest.raises(ValueError, match="no Silero VAD model file"):
        AudioConfig(vad_model=tmp_path / "missing.onnx")
