"""RGB -> yuv420p for the video encoders (offline MP4 and WebRTC)."""

from __future__ import annotations

import cv2
import numpy as np


def even(image: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: pad odd ones by one replicated pixel."""
    h, w = image.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return image
    return cv2.copyMakeBorder(image, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)


def to_i420(image: np.ndarray) -> np.ndarray:
    """RGB uint8 -> planar yuv420p (BT.601, limited range, as swscale's default) with even
    sides; OpenCV's SIMD conversion is faster than PyAV's reformat (measured:
    benchmarks/README.md, section "Figures behind settings in the code")."""
    return cv2.cvtColor(even(np.ascontiguousarray(image)), cv2.COLOR_RGB2YUV_I420)
