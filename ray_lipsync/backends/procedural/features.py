"""Audio -> mouth shape features for the procedural backend (CPU, no weights).

Per video frame k (samples [640k, 640k + 640), see clock.py) the featurizer analyses a
Hann-weighted window that starts `context_ms` before the frame and ends `lookahead_ms` after
it, so the window's centre sits slightly after the frame's centre: the mouth starts to open
just before a syllable's attack is heard. From that window it derives

- open:   loudness (dBFS) relative to the session's running speech level, gated at silence,
          on an expanding curve so the mouth nearly closes in the dips between syllables;
- spread: spectral centroid high (front vowels /i/, /e/, fricatives) -> wider mouth;
- round:  centroid low with energy concentrated below ~900 Hz (/u/, /o/) -> narrower mouth;

and smooths them across frames with attack/release (fast opening, slower closing). The output
per frame is float32 [open, spread, round] in [0, 1]. Silence gives exactly zeros.

Streaming state (`ProceduralState`) carries the running speech level, the smoothed features,
and the tail of the audio before the next frame (the left context), so frames requested in
many in-order requests give the same features as one request over the whole clip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ray_lipsync.backends.base import Featurizer
from ray_lipsync.clock import SAMPLE_RATE, SAMPLES_PER_FRAME, ms_to_samples
from ray_lipsync.config import Settings
from ray_lipsync.errors import AudioInputError
from ray_lipsync.types import FeatureRequest

log = logging.getLogger(__name__)

FEATURE_NAMES: tuple[str, ...] = ("open", "spread", "round")
FEATURE_DIM = len(FEATURE_NAMES)

GATE_DB = -50.0  # below this a window is silence (dBFS of the weighted RMS)
ACTIVITY_RANGE_DB = 12.0  # level above the gate at which spread/round reach full weight
INITIAL_SPEECH_DB = -22.0  # assumed speech level before the session has spoken
LEVEL_UP = 0.25  # running speech level: per-frame follow rate when louder
LEVEL_DOWN = 0.03  # ... and when quieter (only frames above the gate update it)
OPEN_BELOW_DB = 18.0  # open = 0 at (speech level - this), 1 at speech level + OPEN_ABOVE_DB
OPEN_ABOVE_DB = 3.0
OPEN_GAMMA = 1.5  # open = position between those levels ** gamma (> 1: quieter parts close more)
ATTACK = 0.7  # smoothing: fraction of the gap closed per frame when rising
RELEASE = 0.6  # ... when falling
SHAPE_RATE = 0.45  # spread/round smoothing (symmetric)
SNAP = 0.01  # smoothed values below this become exactly 0


@dataclass
class ProceduralState:
    """One session's featurizer state."""

    next_frame: int = 0
    context: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    speech_db: float = INITIAL_SPEECH_DB
    smoothed: np.ndarray = field(default_factory=lambda: np.zeros(FEATURE_DIM, np.float32))


class ProceduralFeaturizer(Featurizer):
    """Loudness and spectral shape per frame -> [open, spread, round] (see module doc)."""

    name = "procedural"
    lookahead_ms = 40
    context_ms = 20

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._lookahead = ms_to_samples(self.lookahead_ms)
        self._context = ms_to_samples(self.context_ms)
        self._win_len = self._context + SAMPLES_PER_FRAME + self._lookahead
        self._window = np.hanning(self._win_len + 2)[1:-1].astype(np.float32)
        self._window_power = float(np.sum(self._window**2))
        freqs = np.fft.rfftfreq(self._win_len, 1.0 / SAMPLE_RATE)
        self._band = (freqs >= 100) & (freqs <= 7000)
        self._freqs = freqs[self._band].astype(np.float32)
        self._low = (self._freqs < 900).astype(np.float32)

    def new_state(self) -> ProceduralState:
        return ProceduralState()

    def featurize(self, requests: Sequence[FeatureRequest]) -> list[np.ndarray]:
        return [self._featurize_one(request) for request in requests]

    # -- one request -------------------------------------------------------------------

    def _featurize_one(self, request: FeatureRequest) -> np.ndarray:
        state = request.state
        if not isinstance(state, ProceduralState):
            raise TypeError("FeatureRequest.state must come from ProceduralFeaturizer.new_state()")
        frames = request.frames
        if frames.step != 1:
            raise AudioInputError(f"frames must be a contiguous range, got {frames}")
        if len(frames) == 0:
            return np.zeros((0, FEATURE_DIM), np.float32)
        windows = self._windows(request, state)
        raw = self._raw_features(windows)
        out = self._smooth(raw, state)
        state.next_frame = frames.stop
        return out

    def _windows(self, request: FeatureRequest, state: ProceduralState) -> np.ndarray:
        """(n_frames, win_len) analysis windows, zero outside the audio that exists."""
        audio = np.asarray(request.audio, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(audio)):
            raise AudioInputError("feature request audio contains NaN or inf; clean the input")
        frames = request.frames
        first = frames.start * SAMPLES_PER_FRAME
        last = frames.stop * SAMPLES_PER_FRAME
        start = request.audio_start
        if start > first or start + len(audio) < last:
            raise AudioInputError(
                f"feature request for frames {frames.start}..{frames.stop - 1} needs samples "
                f"[{first}, {last}) but its audio covers [{start}, {start + len(audio)}); "
                "send the frames' audio plus the featurizer's lookahead"
            )
        seg_start = first - self._context
        seg_len = last + self._lookahead - seg_start
        segment = np.zeros(seg_len, np.float32)
        # left context the request does not hold comes from the session state
        if start > seg_start and state.next_frame == frames.start and len(state.context):
            ctx = state.context[-(start - seg_start):]
            segment[start - seg_start - len(ctx) : start - seg_start] = ctx
        lo = max(start, seg_start)
        hi = min(start + len(audio), seg_start + seg_len)
        segment[lo - seg_start : hi - seg_start] = audio[lo - start : hi - start]
        state.context = segment[seg_len - self._lookahead - self._context : seg_len - self._lookahead].copy()
        view = np.lib.stride_tricks.sliding_window_view(segment, self._win_len)
        return view[:: SAMPLES_PER_FRAME][: len(frames)]

    def _raw_features(self, windows: np.ndarray) -> np.ndarray:
        """Unsmoothed (level_db, spread, round) per window, all frames at once."""
        weighted = windows * self._window
        power = np.abs(np.fft.rfft(weighted, axis=1))[:, self._band] ** 2
        rms = np.sqrt(np.sum(weighted**2, axis=1) / self._window_power)
        level_db = 20.0 * np.log10(rms + 1e-9)
        total = np.sum(power, axis=1) + 1e-12
        centroid = (power @ self._freqs) / total
        low_share = (power @ self._low) / total
        activity = np.clip((level_db - GATE_DB) / ACTIVITY_RANGE_DB, 0.0, 1.0)
        spread = np.clip((centroid - 1400.0) / 1600.0, 0.0, 1.0) * activity
        rounded = np.clip((low_share - 0.75) / 0.2, 0.0, 1.0)
        rounded *= np.clip((1100.0 - centroid) / 500.0, 0.0, 1.0) * activity
        return np.stack([level_db, spread, rounded], axis=1).astype(np.float32)

    def _smooth(self, raw: np.ndarray, state: ProceduralState) -> np.ndarray:
        """Running speech level, open mapping and attack/release, frame by frame."""
        out = np.empty((len(raw), FEATURE_DIM), np.float32)
        speech_db = state.speech_db
        y_open, y_spread, y_round = (float(v) for v in state.smoothed)
        for i, (level_db, spread, rounded) in enumerate(raw.tolist()):
            if level_db > GATE_DB:
                rate = LEVEL_UP if level_db > speech_db else LEVEL_DOWN
                speech_db += rate * (level_db - speech_db)
                floor = speech_db - OPEN_BELOW_DB
                target = (level_db - floor) / (OPEN_BELOW_DB + OPEN_ABOVE_DB)
                target = min(max(target, 0.0), 1.0) ** OPEN_GAMMA
            else:
                target = 0.0
            y_open += (ATTACK if target > y_open else RELEASE) * (target - y_open)
            y_spread += SHAPE_RATE * (spread - y_spread)
            y_round += SHAPE_RATE * (rounded - y_round)
            y_open = y_open if y_open >= SNAP else 0.0
            y_spread = y_spread if y_spread >= SNAP else 0.0
            y_round = y_round if y_round >= SNAP else 0.0
            out[i] = (y_open, y_spread, y_round)
        state.speech_db = speech_db
        state.smoothed = out[-1].copy()
        return out
