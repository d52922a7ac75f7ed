"""Offline face analysis with MediaPipe Face Mesh (478 landmarks, no downloads; the `prepare` extra).

`FaceAnalyzer` wraps one Face Mesh graph: `analyze(rgb)` returns a `FaceObservation` (face
box, all 478 landmarks and the named landmarks of `LANDMARK_NAMES`, in frame pixels) or None
when no face is found. Use `static_image_mode=False` for consecutive video frames (tracking).

Named landmarks (Face Mesh index -> name); "left"/"right" are image sides (smaller x first):
  61  mouth_left        291 mouth_right        (lip corners)
  0   upper_lip_top     13  upper_lip_bottom   (outer / inner edge of the upper lip, midline)
  14  lower_lip_top     17  lower_lip_bottom   (inner / outer edge of the lower lip, midline)
  152 chin              (lowest point of the face oval)
  172 jaw_left          397 jaw_right          (jaw angles, on the face oval below the mouth)
  1   nose_tip
For a subject facing the camera, 61/172 lie on the image's left; the analyzer swaps the
left/right pairs when the face is mirrored so that left < right always holds in x.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ray_lipsync.avatar.model import LANDMARK_NAMES
from ray_lipsync.errors import AvatarError

log = logging.getLogger(__name__)

NUM_LANDMARKS = 478
NAMED_INDICES: dict[str, int] = {
    "mouth_left": 61,
    "mouth_right": 291,
    "upper_lip_top": 0,
    "upper_lip_bottom": 13,
    "lower_lip_top": 14,
    "lower_lip_bottom": 17,
    "chin": 152,
    "jaw_left": 172,
    "jaw_right": 397,
    "nose_tip": 1,
}
NAMED_INDEX_ARRAY = np.array([NAMED_INDICES[n] for n in LANDMARK_NAMES], dtype=np.int64)
_LR_PAIRS = (("mouth_left", "mouth_right"), ("jaw_left", "jaw_right"))

# MuseTalk's "half face" point is point 29 of the 68-point (iBUG / DWPose) scheme: the third of
# the four nose-bridge points 27 (between the eyes) .. 30 (nose tip), two thirds of the way
# down. Face Mesh has no such point; it is interpolated on the nose line from 168 (between
# the eyes, iBUG 27) to 1 (nose tip, iBUG 30). See `half_face_point`.
NOSE_BRIDGE_TOP = 168
NOSE_TIP = 1
HALF_FACE_FRACTION = 2.0 / 3.0


def half_face_point(landmarks: np.ndarray) -> np.ndarray:
    """The (x, y) of iBUG point 29 estimated from (478, 2) Face Mesh landmarks."""
    top, tip = landmarks[NOSE_BRIDGE_TOP], landmarks[NOSE_TIP]
    return (top + HALF_FACE_FRACTION * (tip - top)).astype(np.float32)

# The face oval, in order around the face (MediaPipe's FACEMESH_FACE_OVAL as a loop).
FACE_OVAL: tuple[int, ...] = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
    377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip

# Lines MediaPipe/TFLite/absl write to stderr on every graph start (not errors).
_NOISE = (
    "Created TensorFlow Lite XNNPACK delegate",
    "All log messages before absl::InitializeLog()",
    "inference_feedback_manager.cc",
    "Feedback manager requires a model with a single signature",
)


@contextlib.contextmanager
def _filtered_stderr() -> Iterator[None]:
    """Capture native stderr (fd 2) and re-emit every line that is not known start-up noise."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [
                line
                for line in sink.read().decode(errors="replace").splitlines(keepends=True)
                if line.strip() and not any(n in line for n in _NOISE)
            ]
            if kept:
                os.write(2, "".join(kept).encode())


@dataclass(frozen=True)
class FaceObservation:
    """One detected face, in frame pixels.

    box:       (4,) float32  x1, y1, x2, y2 of the landmark bounding box
    landmarks: (478, 2) float32  all Face Mesh landmarks (x, y)
    named:     (len(LANDMARK_NAMES), 2) float32  the named landmarks, in LANDMARK_NAMES order
    """

    box: np.ndarray
    landmarks: np.ndarray
    named: np.ndarray

    @classmethod
    def from_landmarks(cls, landmarks: np.ndarray) -> "FaceObservation":
        """Build an observation from (478, 2) landmarks in frame pixels."""
        pts = np.asarray(landmarks, dtype=np.float32)
        if pts.shape != (NUM_LANDMARKS, 2):
            raise ValueError(f"expected ({NUM_LANDMARKS}, 2) landmarks, got {pts.shape}")
        box = np.array([*pts.min(axis=0), *pts.max(axis=0)], dtype=np.float32)
        return cls(box=box, landmarks=pts, named=named_landmarks(pts))


def named_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """The LANDMARK_NAMES points of (478, 2) landmarks, left/right pairs ordered by x."""
    named = np.asarray(landmarks, dtype=np.float32)[NAMED_INDEX_ARRAY].copy()
    idx = {n: i for i, n in enumerate(LANDMARK_NAMES)}
    for left, right in _LR_PAIRS:
        a, b = idx[left], idx[right]
        if named[a, 0] > named[b, 0]:
            named[[a, b]] = named[[b, a]]
    return named


def check_rgb(rgb: Any, what: str = "image") -> np.ndarray:
    """Validate an RGB uint8 image (H, W, 3); raise AvatarError saying what is wrong."""
    if not isinstance(rgb, np.ndarray):
        raise AvatarError(f"{what} must be a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise AvatarError(f"{what} must be RGB with shape (H, W, 3), got {rgb.shape}; convert it first")
    if rgb.dtype != np.uint8:
        raise AvatarError(f"{what} must be uint8 (0..255), got {rgb.dtype}")
    if min(rgb.shape[:2]) < 32:
        raise AvatarError(f"{what} is {rgb.shape[1]}x{rgb.shape[0]}; use at least 32x32 pixels")
    return rgb


class FaceAnalyzer:
    """MediaPipe Face Mesh on RGB uint8 frames; a context manager that closes the graph.

    static_image_mode=True detects on every call (photos); False tracks across consecutive
    video frames (faster, steadier). min_confidence applies to detection and tracking.
    """

    def __init__(self, static_image_mode: bool = True, min_confidence: float = 0.5) -> None:
        with _filtered_stderr(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*GetPrototype.*")
            try:
                import mediapipe as mp
            except ImportError as exc:
                raise AvatarError(
                    "preparing an avatar of your own needs MediaPipe: pip install 'ray-lipsync[prepare]' "
                    "(the default avatar works without it)"
                ) from exc
            if not hasattr(mp, "solutions"):
                raise AvatarError(
                    f"MediaPipe {mp.__version__} has no Face Mesh solution; install the pinned one: "
                    "pip install 'ray-lipsync[prepare]'"
                )

            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=static_image_mode,
                max_num_faces=1,
                refine_landmarks=True,
                min_detection_confidence=min_confidence,
                min_tracking_confidence=min_confidence,
            )
            # The graph opens its calculators asynchronously and they log while opening; one
            # blank frame waits for that inside the filtered window.
            self._mesh.process(np.zeros((64, 64, 3), dtype=np.uint8))
        self._closed = False

    def __enter__(self) -> "FaceAnalyzer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the graph (idempotent)."""
        if not self._closed:
            self._closed = True
            self._mesh.close()

    def analyze(self, rgb: np.ndarray) -> FaceObservation | None:
        """The face in `rgb` (H, W, 3 uint8), or None when there is none."""
        if self._closed:
            raise AvatarError("FaceAnalyzer is closed; create a new one")
        rgb = np.ascontiguousarray(check_rgb(rgb, "frame"))
        height, width = rgb.shape[:2]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*GetPrototype.*")
            result = self._mesh.process(rgb)
        faces = result.multi_face_landmarks
        if not faces:
            return None
        pts = np.array([(p.x, p.y) for p in faces[0].landmark], dtype=np.float32)
        if pts.shape != (NUM_LANDMARKS, 2):
            log.warning("Face Mesh returned %d landmarks, expected %d", len(pts), NUM_LANDMARKS)
            return None
        pts *= np.array([width, height], dtype=np.float32)
        return FaceObservation.from_landmarks(pts)
