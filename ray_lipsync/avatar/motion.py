"""Procedural head motion: short videos made from one portrait, for tests and benchmarks of
avatar clips when no recorded clips are at hand (`ray-lipsync avatar prepare --clip` takes
them like any video).

A motion moves the whole picture by a small rigid transform per frame (shift in pixels,
rotation in degrees about the centre), edges replicated, so a face detector finds the face in
every frame and consecutive frames differ only by the motion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np


def moved(image: np.ndarray, dx: float, dy: float, degrees: float = 0.0) -> np.ndarray:
    """`image` (RGB uint8) shifted by (dx, dy) pixels and turned by `degrees` about its centre."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    matrix[:, 2] += (dx, dy)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def head_motion(image: np.ndarray, frames: int, *, dx: float = 0.0, dy: float = 0.0,
                degrees: float = 0.0, cycles: float = 1.0, phase: float = 0.0) -> list[np.ndarray]:
    """`frames` frames of `image` swaying sinusoidally: amplitudes dx, dy (pixels) and
    `degrees`, `cycles` periods over the clip, starting at `phase` (radians)."""
    out = []
    for i in range(frames):
        s = float(np.sin(phase + 2 * np.pi * cycles * i / frames))
        out.append(moved(image, dx * s, dy * s, degrees * s))
    return out


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
