"""How far streaming MuseTalk features are from the offline (whole-clip, 30 s) ones.

`compare_streaming` replays a clip as a session would receive it: frame k is requested as soon
as its audio plus the featurizer's lookahead exist, with the featurizer's declared left
context, `frames_per_request` frames at a time. It reports per-frame relative L2 distance
and cosine similarity to `offline_features` (with random test weights only a mechanism check;
with real weights, the real figure). `sweep` does it for several windows and lookaheads
(benchmarks/musetalk_fidelity.py is its command line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ray_lipsync.backends.musetalk.features import MuseTalkFeaturizer
from ray_lipsync.backends.musetalk.weights import MuseTalkModels
from ray_lipsync.clock import SAMPLES_PER_FRAME, frames_in_samples, ms_to_samples
from ray_lipsync.config import Settings
from ray_lipsync.types import FeatureRequest


@dataclass(frozen=True)
class Fidelity:
    """Per-frame distances of streaming to offline features, and their summary."""

    rel_l2: np.ndarray  # (T,) ||s - o|| / ||o||
    cosine: np.ndarray  # (T,) cos(s, o)

    def summary(self) -> dict[str, float]:
        return {
            "frames": int(len(self.rel_l2)),
            "rel_l2_median": float(np.median(self.rel_l2)),
            "rel_l2_p90": float(np.percentile(self.rel_l2, 90)),
            "rel_l2_max": float(np.max(self.rel_l2)),
            "cosine_median": float(np.median(self.cosine)),
            "cosine_p10": float(np.percentile(self.cosine, 10)),
            "cosine_min": float(np.min(self.cosine)),
        }


def streaming_requests(
    featurizer: MuseTalkFeaturizer, audio: np.ndarray, frames_per_request: int = 1
) -> list[FeatureRequest]:
    """The requests a session streaming `audio` would send, earliest first."""
    context = ms_to_samples(featurizer.context_ms)
    lookahead = ms_to_samples(featurizer.lookahead_ms)
    total = frames_in_samples(len(audio))
    requests = []
    for first in range(0, total, frames_per_request):
        frames = range(first, min(first + frames_per_request, total))
        start = max(0, first * SAMPLES_PER_FRAME - context) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME
        end = min(len(audio), frames.stop * SAMPLES_PER_FRAME + lookahead)
        requests.append(FeatureRequest(featurizer.new_state(), audio[start:end], start, frames))
    return requests


def compare_streaming(
    featurizer: MuseTalkFeaturizer, audio: np.ndarray, frames_per_request: int = 1, calls_of: int = 64
) -> Fidelity:
    """Streaming vs offline features of `audio` (16 kHz float32), `calls_of` requests per call."""
    audio = np.asarray(audio, dtype=np.float32)
    offline = featurizer.offline_features(audio)
    requests = streaming_requests(featurizer, audio, frames_per_request)
    parts = []
    for i in range(0, len(requests), calls_of):
        parts.extend(featurizer.featurize(requests[i : i + calls_of]))
    streaming = np.concatenate(parts).reshape(len(offline), -1)
    offline = offline.reshape(len(offline), -1)
    diff = np.linalg.norm(streaming - offline, axis=1)
    norm_o = np.linalg.norm(offline, axis=1)
    norm_s = np.linalg.norm(streaming, axis=1)
    rel = diff / np.maximum(norm_o, 1e-12)
    cos = (streaming * offline).sum(axis=1) / np.maximum(norm_o * norm_s, 1e-12)
    return Fidelity(rel_l2=rel, cosine=cos)


def sweep(
    settings: Settings,
    models: MuseTalkModels,
    audio: np.ndarray,
    windows_s: Sequence[float],
    lookaheads_ms: Sequence[int],
) -> list[dict[str, Any]]:
    """`compare_streaming` summaries for every (encoder window, lookahead) pair."""
    rows = []
    for window in windows_s:
        for lookahead in lookaheads_ms:
            cfg = settings.musetalk.model_copy(update={"encoder_window_s": window, "lookahead_ms": lookahead})
            featurizer = MuseTalkFeaturizer(settings.model_copy(update={"musetalk": cfg}), models=models)
            summary = compare_streaming(featurizer, audio, calls_of=32).summary()
            rows.append({"encoder_window_s": window, "lookahead_ms": lookahead, **summary})
    return rows
