"""Typed records that flow between pipeline stages.

Every unit of work carries (session_id, epoch, frame_index): an interrupt bumps the session's
epoch, and every stage drops work whose epoch is older than the session's current one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ray_lipsync.streaming.sources import SourcePlan


@dataclass
class FeatureRequest:
    """Ask a featurizer for the features of `frames` of one session.

    `audio` holds 16 kHz float32 samples starting at absolute sample `audio_start` of the
    session timeline; it covers every requested frame plus the featurizer's lookahead (and as
    much of its left context as exists). `state` is the session's featurizer state (from
    `Featurizer.new_state`), which the featurizer may update (running levels, smoothing).
    """

    state: Any
    audio: np.ndarray
    audio_start: int
    frames: range


@dataclass(frozen=True)
class RenderJob:
    """One frame for a renderer: the avatar source frame to animate and its audio features."""

    avatar: str
    avatar_frame: int
    features: np.ndarray


@dataclass(frozen=True)
class FrameJob:
    """A frame of one session on its way through the pipeline.

    It carries no deadline: deadlines are local to the process that holds the job (see
    `AudioPush.due_in_s`), never wall-clock times compared across nodes.
    """

    session_id: str
    epoch: int
    frame_index: int
    avatar: str
    avatar_frame: int
    speech: bool
    features: np.ndarray | None = None


@dataclass(frozen=True)
class StageSpec:
    """What a feature stage needs to (re)create a session's state on any process."""

    avatar: str
    avatar_frames: int  # of the idle cycle (the main video)
    schedule: str = "streaming"


@dataclass(frozen=True)
class AudioPush:
    """Session audio for timeline samples [start, start + len(samples)) sent down the pipeline.

    `due_in_s`: seconds from the moment the push was sent until frame 0 of the session is
    presented (negative once it has been). A receiver turns it into its own monotonic clock
    (`time.monotonic() + due_in_s`) on arrival, so deadlines never depend on the wall clocks
    of two nodes agreeing. `spec` lets a restarted stage rebuild the session's state.
    `replay`: audio sent again because the round that carried it failed (the feature stage
    computes its frames again, see FeatureStage.push). `sources`: which source frame each
    output frame shows (the session's clip plan when the push was made; None: the idle
    cycle of `spec.avatar_frames`).
    """

    session_id: str
    epoch: int
    start: int
    samples: np.ndarray
    final: bool
    spec: StageSpec
    due_in_s: float
    replay: bool = False
    sources: SourcePlan | None = None

    @property
    def stop(self) -> int:
        return self.start + len(self.samples)

    def aged(self, seconds: float) -> "AudioPush":
        """The same push, `seconds` after it was made (its deadline budget shrunk by that)."""
        return replace(self, due_in_s=self.due_in_s - seconds)


@dataclass
class OutputFrame:
    """A finished frame with its two 20 ms audio chunks, ready to be sent.

    `image` is the full RGB frame; `audio` the 640 samples (16 kHz, float32) of chunks 2k and
    2k+1; `pts` the 90 kHz video timestamp; `presentation_time` the session clock's time (s);
    `dropped` marks an idle frame that replaced one known to be speech but not ready in time
(see streaming/drops.py); `latency_ms` is the
    time from the arrival of the frame's last audio chunk to its composited image (None for
    idle frames); `source_frame` the avatar source frame the image shows (lip-synced or not;
    see streaming/sources.py), None where unknown; a silent frame cross-faded between two
    clips has meta["fade"] = {from_source_frame, weight (of source_frame)}.
    """

    session_id: str
    epoch: int
    frame_index: int
    image: np.ndarray
    audio: np.ndarray
    pts: int
    presentation_time: float
    speech: bool = False
    dropped: bool = False
    latency_ms: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source_frame: int | None = None
