"""Procedural head motion: short videos made from one portrait, for tests and benchmarks of
avatar clips when no recorded clips are at hand (`ray-lipsync avatar prepare --clip` takes
them like any video).

A motion moves the whole picture by a small rigid transform per frame (shift in pixels,
rotation in degrees about the centre), edges replicated, so a face detector finds the face in
every frame and consecutive frames differ only by the motion; `moved_points` moves known face
landmarks the same way (clips of the default avatar without MediaPipe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np


# A main video and three clips as tests and benchmarks make them: name -> (frames, sway).
SAMPLE_MOTIONS: dict[str, tuple[int, dict[str, float]]] = {
    "main": (12, {"dx": 2.0}),  # a sideways sway
    "listening": (16, {"dy": 3.0, "degrees": 1.0}),  # a nod
    "thinking": (12, {"degrees": 2.5}),  # a tilt
    "wave": (30, {"dx": 8.0, "cycles": 0.5}),  # a slow move aside and back (an action)
}


def sample_portrait() -> tuple[np.ndarray, np.ndarray]:
    """The default portrait cut to 384x384 around the face (fast face analysis), and its
    shipped Face Mesh landmarks in that cut's pixels."""
    from ray_lipsync.avatar.default import default_image, default_landmarks

    top, left, side = 0, 64, 384
    image = np.ascontiguousarray(default_image()[top:top + side, left:left + side])
    return image, default_landmarks() - np.array([left, top], np.float32)


def sample_videos(image: np.ndarray, folder: str | Path) -> dict[str, Path]:
    """`SAMPLE_MOTIONS` of `image` written as <folder>/<name>.mp4; name -> path."""
    return {name: write_video(Path(folder) / f"{name}.mp4", head_motion(image, n, **sway))
            for name, (n, sway) in SAMPLE_MOTIONS.items()}


def motion(frames: int, *, dx: float = 0.0, dy: float = 0.0, degrees: float = 0.0,
           cycles: float = 1.0, phase: float = 0.0) -> list[np.ndarray]:
    """Per frame, the (2, 3) affine matrix of a sinusoidal sway about the picture's centre
    (apply with `moved`/`moved_points`): amplitudes dx, dy (pixels) and `degrees`, `cycles`
    periods over the clip, starting at `phase` (radians)."""
    out = []
    for i in range(frames):
        s = float(np.sin(phase + 2 * np.pi * cycles * i / frames))
        out.append(np.array([dx * s, dy * s, degrees * s]))
    return out


def _matrix(step: np.ndarray, width: int, height: int) -> np.ndarray:
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), float(step[2]), 1.0)
    matrix[:, 2] += step[:2]
    return matrix


def moved(image: np.ndarray, step: np.ndarray) -> np.ndarray:
    """`image` (RGB uint8) moved by one `motion` step, edges replicated."""
    height, width = image.shape[:2]
    return cv2.warpAffine(image, _matrix(step, width, height), (width, height),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def moved_points(points: np.ndarray, step: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, 2) pixel points of a `size` = (width, height) picture moved by one `motion` step."""
    matrix = _matrix(step, *size)
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def head_motion(image: np.ndarray, frames: int, **sway: float) -> list[np.ndarray]:
    """`frames` frames of `image` moved by `motion(frames, **sway)`."""
    return [moved(image, step) for step in motion(frames, **sway)]


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int = 25) -> Path:
    """Write RGB uint8 frames as a high-quality MPEG-4 video (PyAV); returns the path."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 8_000_000
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path
