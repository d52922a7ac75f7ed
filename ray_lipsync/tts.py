"""Offline text-to-speech with espeak-ng, returned in the pipeline format (16 kHz mono float32).

The engine is libespeak-ng from the `espeakng-loader` wheel, driven through ctypes in
synchronous mode with a callback that collects the 22050 Hz samples; without the wheel, a
Debian `espeak-ng` binary is used instead. libespeak-ng keeps global state and is not
thread-safe, so one engine is shared per process and every call holds its lock.
"""

from __future__ import annotations

import ctypes
import logging
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from ray_lipsync.audio.resample import Resampler
from ray_lipsync.errors import LipsyncError

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 5000
MIN_WPM, MAX_WPM = 80, 450  # espeakRATE_MINIMUM / espeakRATE_MAXIMUM
_VOICE_RE = re.compile(r"^[A-Za-z0-9_+\-]{1,64}$")

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class InvalidText(LipsyncError, ValueError):
    """Text that cannot be spoken: empty, too long or with control characters (HTTP 422)."""


class UnknownVoice(LipsyncError, ValueError):
    """A voice name espeak-ng does not know (HTTP 422)."""


class TTSUnavailable(LipsyncError, RuntimeError):
    """Neither libespeak-ng (pip install espeakng-loader) nor an espeak-ng binary was found."""


def validate_text(text: str) -> str:
    """Return `text` stripped, or raise InvalidText saying what is wrong."""
    if not isinstance(text, str):
        raise InvalidText(f"text must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise InvalidText("text is empty; send at least one word")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidText(f"text is {len(text)} characters, above the limit of {MAX_TEXT_CHARS}")
    for pos, char in enumerate(text):
        if not (char.isprintable() or char in "\n\t "):
            raise InvalidText(f"text has a non-printable character {char!r} at position {pos}")
    return text


class _LibEspeak:
    """libespeak-ng loaded once, in synchronous mode, with a sample-collecting callback."""

    def __init__(self, library_path: str, data_path: str) -> None:
        lib = ctypes.CDLL(library_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        # The path names the directory that contains espeak-ng-data.
        parent = str(Path(data_path).parent).encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, parent, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise TTSUnavailable(f"espeak_Initialize failed with data at {data_path}")
        self.sample_rate = rate
        self._lib = lib
        self._pieces: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)  # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes.Array, count: int, _events: int) -> int:
        if wav and count > 0:
            self._pieces.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def synthesize(self, text: str, voice: str, words_per_minute: int) -> np.ndarray:
        """int16 samples at self.sample_rate. Caller holds the process lock."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UnknownVoice(f"espeak-ng has no voice {voice!r}; try 'en-us' or 'en'")
        self._lib.espeak_SetParameter(_PARAM_RATE, words_per_minute, 0)
        encoded = text.encode("utf-8")
        self._pieces = []
        status = self._lib.espeak_Synth(
            encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        pieces, self._pieces = self._pieces, []
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status}")
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)


class Synthesizer:
    """Offline TTS. Cheap to construct: the espeak engine is loaded once per process."""

    _lock = threading.Lock()  # libespeak-ng is process-global and not thread-safe
    _engine: _LibEspeak | None = None

    def __init__(self) -> None:
        with Synthesizer._lock:
            if Synthesizer._engine is None:
                Synthesizer._engine = _load_library()
        self._binary = None if Synthesizer._engine else shutil.which("espeak-ng")
        if Synthesizer._engine is None and self._binary is None:
            raise TTSUnavailable(
                "no offline TTS engine: pip install espeakng-loader, or apt-get install espeak-ng"
            )

    def synthesize(
        self, text: str, voice: str = "en-us", words_per_minute: int = 165
    ) -> np.ndarray:
        """Speak `text`; returns 16 kHz mono float32 in [-1, 1]."""
        text = validate_text(text)
        if not isinstance(voice, str) or not _VOICE_RE.match(voice):
            raise UnknownVoice(f"voice name {voice!r} is not valid; use e.g. 'en-us'")
        if isinstance(words_per_minute, bool) or not isinstance(words_per_minute, int):
            raise InvalidText(f"words_per_minute must be an integer, got {words_per_minute!r}")
        if not MIN_WPM <= words_per_minute <= MAX_WPM:
            raise InvalidText(
                f"words_per_minute {words_per_minute} is outside {MIN_WPM}..{MAX_WPM}"
            )
        if Synthesizer._engine is not None:
            with Synthesizer._lock:
                pcm = Synthesizer._engine.synthesize(text, voice, words_per_minute)
            rate = Synthesizer._engine.sample_rate
        else:
            pcm, rate = self._run_binary(text, voice, words_per_minute)
        samples = pcm.astype(np.float32) / np.float32(32768.0)
        resampler = Resampler(rate)
        out = np.concatenate([resampler.push(samples), resampler.flush()])
        logger.debug("synthesized %d chars -> %.2f s", len(text), out.size / 16000)
        return out

    def _run_binary(self, text: str, voice: str, wpm: int) -> tuple[np.ndarray, int]:
        from ray_lipsync.audio.wav import parse_wav_header  # local: only for the fallback
        from ray_lipsync.config import AudioConfig

        assert self._binary is not None
        proc = subprocess.run(
            [self._binary, "-v", voice, "-s", str(wpm), "-b", "1", "--stdout"],
            input=text.encode("utf-8"), capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        if proc.returncode != 0 or not proc.stdout.startswith(b"RIFF"):
            detail = proc.stderr.decode(errors="replace")[:200]
            raise UnknownVoice(f"espeak-ng failed for voice {voice!r}: {detail}")
        header = parse_wav_header(proc.stdout, AudioConfig())
        assert header is not None and header.sample_format == "s16"
        start = header.data_offset
        stop = start + header.frames_available(len(proc.stdout)) * header.block_align
        pcm = np.frombuffer(proc.stdout[start:stop], dtype="<i2").reshape(-1, header.channels)
        return pcm[:, 0].copy(), header.sample_rate


def _load_library() -> _LibEspeak | None:
    try:
        import espeakng_loader
    except ImportError:
        logger.info("espeakng-loader not installed; falling back to the espeak-ng binary")
        return None
    try:
        return _LibEspeak(espeakng_loader.get_library_path(), espeakng_loader.get_data_path())
    except (OSError, RuntimeError, TTSUnavailable) as exc:
        logger.warning("libespeak-ng from espeakng-loader failed (%s); trying the binary", exc)
        return None
