"""Offline TTS (espeak-ng): speech of plausible duration, validation, thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ray_lipsync.tts import MAX_TEXT_CHARS, InvalidText, Synthesizer, UnknownVoice

RATE = 16000
PANGRAM = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def tts() -> Synthesizer:
    return Synthesizer()


def test_speech_has_plausible_duration(tts: Synthesizer) -> None:
    audio = tts.synthesize(PANGRAM)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.abs(audio).max() <= 1.0 and np.sqrt(np.mean(audio**2)) > 0.02
    expected_s = 9 / 165 * 60  # nine words at 165 words per minute
    assert 0.5 * expected_s < audio.size / RATE < 2.0 * expected_s


def test_rate_changes_duration(tts: Synthesizer) -> None:
    slow = tts.synthesize(PANGRAM, words_per_minute=100)
    fast = tts.synthesize(PANGRAM, words_per_minute=300)
    assert slow.size > 1.8 * fast.size


def test_energy_sits_in_the_speech_band(tts: Synthesizer) -> None:
    audio = tts.synthesize(PANGRAM)
    power = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1 / RATE)
    band = power[(freqs > 80) & (freqs < 4000)].sum()
    assert band > 0.8 * power.sum()


def test_voices_and_unicode(tts: Synthesizer) -> None:
    assert tts.synthesize("Bonjour, ça va très bien.", voice="fr").size > 0.5 * RATE
    assert tts.synthesize("Hello", voice="en").size > 0.2 * RATE
    with pytest.raises(UnknownVoice):
        tts.synthesize("Hello", voice="xx-nonexistent")
    with pytest.raises(UnknownVoice):
        tts.synthesize("Hello", voice="en us; rm")


@pytest.mark.parametrize(
    "text",
    ["", "   \n ", "a" * (MAX_TEXT_CHARS + 1), "bell\x07here", "nul\x00", None, 42],
)
def test_invalid_text(tts: Synthesizer, text: object) -> None:
    with pytest.raises(InvalidText) as info:
        tts.synthesize(text)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and str(info.value)


@pytest.mark.parametrize("wpm", [10, 1000, 1.5, True])
def test_invalid_rate(tts: Synthesizer, wpm: object) -> None:
    with pytest.raises(ValueError):
        tts.synthesize("Hello", words_per_minute=wpm)  # type: ignore[arg-type]


def test_concurrent_calls_match_sequential(tts: Synthesizer) -> None:
    texts = ["One two three.", "Four five six seven.", "Eight nine.", "Ten eleven twelve."]
    sequential = [tts.synthesize(t) for t in texts]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = Synthesizer().synthesize(texts[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # espeak-ng carries a little state between utterances (lengths vary by a few ms), so
    # compare durations and levels, not samples: mixed-up or torn buffers would differ a lot.
    for i, expected in enumerate(sequential):
        got = results[i]
        assert abs(got.size - expected.size) < 0.03 * expected.size
        rms = np.sqrt(np.mean(got**2)) / np.sqrt(np.mean(expected**2))
        assert 0.9 < rms < 1.1
