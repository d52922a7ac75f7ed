"""The backend interface every lip-sync backend implements.

A backend has two halves that may live in different processes:
- a `Featurizer` (in the feature batcher): 16 kHz audio -> per-frame features, batched across
  sessions, declaring how much audio past a frame (`lookahead_ms`) it needs;
- a `Renderer` (in an inference replica): a batch of `RenderJob`s from any number of sessions
  -> 256x256 RGB face crops, one forward pass per batch.
Silent frames never reach a renderer: the scheduler shows the idle avatar frame instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.clock import frames_in_samples
from ray_lipsync.types import FeatureRequest, RenderJob


class Featurizer(ABC):
    """Audio to per-frame features for one backend."""

    name: str
    lookahead_ms: int  # audio needed past the end of a frame before its features exist
    context_ms: int = 0  # audio before a frame's start that improves its features
    # A stateful featurizer (running levels, smoothing) sees every frame, silent ones too, so
    # its output does not depend on how frames were grouped into requests; a stateless one
    # is only asked for frames that include speech.
    stateful: bool = True

    @abstractmethod
    def new_state(self) -> Any:
        """Fresh per-session streaming state (running levels, smoothing, ...)."""

    @abstractmethod
    def featurize(self, requests: Sequence[FeatureRequest]) -> list[np.ndarray]:
        """Features for every request, as arrays of shape (len(request.frames), *feature_shape).

        Requests of one session arrive in frame order; one call may mix many sessions.
        """

    def offline_features(self, audio: np.ndarray) -> np.ndarray:
        """Features of every frame of a whole clip (16 kHz, from sample 0), for offline render.

        Default: one streaming request over the clip. A backend whose streaming features
        approximate a whole-clip computation (MuseTalk) returns the exact one here.
        """
        frames = range(frames_in_samples(len(audio)))
        return self.featurize([FeatureRequest(self.new_state(), audio, 0, frames)])[0]


class Renderer(ABC):
    """Per-frame features plus an avatar frame to a 256x256 RGB face crop."""

    name: str
    device: Any = "cpu"  # where it computes (str() of it is reported in replica stats)

    @abstractmethod
    def load_avatar(self, avatar: Avatar) -> None:
        """Make `avatar` renderable (idempotent; per-avatar data is held once per renderer)."""

    @abstractmethod
    def render(self, jobs: Sequence[RenderJob]) -> list[np.ndarray]:
        """One (256, 256, 3) uint8 crop per job, in order; jobs may come from many sessions."""
