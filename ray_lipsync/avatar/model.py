"""The prepared avatar: what backends, compositors and the scheduler read.

Images are RGB uint8 everywhere in ray-lipsync (OpenCV's BGR stays inside the modules that
call OpenCV). Per-frame arrays are indexed by *source* frame; the idle cycle plays the source
frames forward then backward as MuseTalk does ("mirror" indexing), see `Avatar.cycle_index`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CROP_SIZE = 256

# Named landmarks kept per frame, in 256x256 crop coordinates (x, y).
LANDMARK_NAMES: tuple[str, ...] = (
    "mouth_left",
    "mouth_right",
    "upper_lip_top",
    "upper_lip_bottom",
    "lower_lip_top",
    "lower_lip_bottom",
    "chin",
    "jaw_left",
    "jaw_right",
    "nose_tip",
)
LANDMARK = {name: i for i, name in enumerate(LANDMARK_NAMES)}


def mirror_index(k: int, n: int) -> int:
    """Source frame shown at cycle position k for n source frames: 0,1,..,n-1,n-1,..,1,0,0,1,..

    MuseTalk's order: the frame list, then the reversed list (`frames + frames[::-1]`), period
    2n; the loop never jumps (the turning frames show twice).
    """
    if n <= 1:
        return 0
    period = 2 * n
    i = k % period
    return i if i < n else period - 1 - i


@dataclass
class Avatar:
    """A prepared avatar. Arrays may be memory-mapped from the avatar store (read-only).

    frames:     (N, H, W, 3) uint8   full source frames
    crop_boxes: (N, 4) int32         x1, y1, x2, y2 of the face crop in frame pixels (may
                                     extend past the frame; the crop is padded there)
    crops:      (N, 256, 256, 3) uint8  face crops, resized from crop_boxes
    masks:      (N, 256, 256) uint8  feathered lower-face blend mask (255 = generated pixels)
    landmarks:  (N, len(LANDMARK_NAMES), 2) float32  in crop coordinates
    detected:   (N,) bool            False where the face was interpolated, not detected
    extras:     backend-specific per-frame arrays, e.g. "musetalk_latents" (N, 8, 32, 32)
    """

    name: str
    frames: np.ndarray
    crop_boxes: np.ndarray
    crops: np.ndarray
    masks: np.ndarray
    landmarks: np.ndarray
    detected: np.ndarray
    fps: float = 25.0
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.frames)
        if n == 0:
            raise ValueError("an avatar needs at least one frame")
        for name in ("crop_boxes", "crops", "masks", "landmarks", "detected"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"avatar {self.name!r}: {name} has {len(getattr(self, name))} rows, frames {n}")

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the full frames."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    def cycle_index(self, k: int) -> int:
        """Source frame for output frame k of the idle cycle (mirror indexing)."""
        return mirror_index(k, len(self))
