"""The prepared avatar: what backends, compositors and the scheduler read.

Images are RGB uint8 everywhere in ray-lipsync (OpenCV's BGR stays inside the modules that
call OpenCV). Per-frame arrays are indexed by *source* frame; the idle cycle plays the main
video's source frames forward then backward as MuseTalk does ("mirror" indexing), see
`Avatar.cycle_index`. An avatar's clips (listening, thinking, gestures: `Avatar.clips`) are
further source frames appended after the main video's, one contiguous range per clip; which
source frame a session shows is decided by its `ray_lipsync.streaming.sources.ClipPlayer`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

CROP_SIZE = 256
IDLE = "idle"  # the main video's cycle, the state every session starts in
THUMBNAIL_SIDE = 32  # frames are compared (clip switches) as 32x32 RGB thumbnails
_CLIP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def validate_clip_name(name: object) -> str:
    """Return `name` if it can name a clip (not "idle", the main cycle), else raise ValueError."""
    if not isinstance(name, str) or not _CLIP_NAME.match(name) or name == IDLE:
        raise ValueError(f"invalid clip name {str(name)[:80]!r}: use 1-64 letters, digits, '_' or "
                         f"'-', starting with a letter or digit; {IDLE!r} names the main video")
    return name

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
    clips:      name -> range of source frames of a clip; clips follow the main video's frames
                (`idle_frames`), in order, without gaps
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
    clips: dict[str, range] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.frames)
        if n == 0:
            raise ValueError("an avatar needs at least one frame")
        for name in ("crop_boxes", "crops", "masks", "landmarks", "detected"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"avatar {self.name!r}: {name} has {len(getattr(self, name))} rows, frames {n}")
        stop = n
        for name, frames in reversed(self.clips.items()):
            validate_clip_name(name)
            if frames.step != 1 or len(frames) == 0 or frames.stop != stop:
                raise ValueError(f"avatar {self.name!r}: clip {name!r} at {frames} does not end where "
                                 f"the next clip starts ({stop}); clips follow the main video, in order")
            stop = frames.start
        if stop < 1:
            raise ValueError(f"avatar {self.name!r}: the main video needs at least one frame")

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the full frames."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    @cached_property
    def idle_frames(self) -> range:
        """The main video's source frames (the idle cycle): those before the first clip."""
        return range(0, min((c.start for c in self.clips.values()), default=len(self)))

    def clip_frames(self, name: str) -> range:
        """Source frames of clip `name` ("idle": the main video); KeyError when there is none."""
        return self.idle_frames if name == IDLE else self.clips[name]

    def cycle_index(self, k: int) -> int:
        """Source frame for output frame k of the idle cycle (mirror indexing over the main video)."""
        return mirror_index(k, len(self.idle_frames))

    @cached_property
    def thumbnails(self) -> np.ndarray:
        """(N, 32, 32, 3) int16 thumbnails of the frames, made on first use (clip switches
        compare frames by their mean absolute difference; see streaming/sources.py)."""
        import cv2

        side = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
        return np.stack([cv2.resize(f, side, interpolation=cv2.INTER_AREA) for f in self.frames]).astype(np.int16)

    @cached_property
    def typical_step(self) -> float:
        """Median change between consecutive thumbnails inside the main video and each clip
        (mean absolute difference): how much the picture moves from one frame to the next."""
        ranges = [self.idle_frames, *self.clips.values()]
        thumbs = self.thumbnails
        diffs = [np.abs(np.diff(thumbs[r.start:r.stop], axis=0)).mean(axis=(1, 2, 3)) for r in ranges if len(r) > 1]
        return float(np.median(np.concatenate(diffs))) if diffs else 0.0
