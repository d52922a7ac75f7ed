"""A drawn cartoon face as a prepared `Avatar`, for tests and benchmarks without media.

The face is drawn in frame pixels (skin ellipse, eyes, nose, two-part lips on a shaded
background), with a small head bob across frames; crops, landmarks and the feathered
lower-face mask are derived the same way a prepared avatar's are (crop = the crop box
resized to 256x256; landmarks in crop coordinates).
"""

from __future__ import annotations

import cv2
import numpy as np

from ray_lipsync.avatar.model import CROP_SIZE, LANDMARK_NAMES, Avatar

SKIN = (224, 172, 140)
LIP = (170, 60, 70)


def _face_points(cx: float, cy: float, u: float) -> dict[str, tuple[float, float]]:
    mouth_y = cy + 0.65 * u
    return {
        "mouth_left": (cx - 0.38 * u, mouth_y),
        "mouth_right": (cx + 0.38 * u, mouth_y),
        "upper_lip_top": (cx, mouth_y - 0.11 * u),
        "upper_lip_bottom": (cx, mouth_y - 0.01 * u),
        "lower_lip_top": (cx, mouth_y + 0.01 * u),
        "lower_lip_bottom": (cx, mouth_y + 0.15 * u),
        "chin": (cx, cy + 1.27 * u),
        "jaw_left": (cx - 0.85 * u, cy + 0.8 * u),
        "jaw_right": (cx + 0.85 * u, cy + 0.8 * u),
        "nose_tip": (cx, cy + 0.32 * u),
    }


def _draw_frame(width: int, height: int, cx: float, cy: float, u: float) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = 40 + 30 * xs / width
    frame[..., 1] = 60 + 40 * ys / height
    frame[..., 2] = 90
    c = (int(round(cx)), int(round(cy)))
    cv2.ellipse(frame, c, (int(u), int(1.3 * u)), 0, 0, 360, SKIN, -1, cv2.LINE_AA)
    shade = np.clip(1.0 - 0.25 * ((xs - cx) / u) ** 2, 0.7, 1.0)[..., None]
    face = (np.abs(xs - cx) / u) ** 2 + (np.abs(ys - cy) / (1.3 * u)) ** 2 < 1.0
    frame[face] = (frame[face] * shade[face]).astype(np.uint8)
    for side in (-1, 1):
        eye = (int(cx + side * 0.4 * u), int(cy - 0.25 * u))
        cv2.ellipse(frame, eye, (int(0.14 * u), int(0.07 * u)), 0, 0, 360, (250, 250, 250), -1, cv2.LINE_AA)
        cv2.circle(frame, eye, int(0.05 * u), (50, 40, 30), -1, cv2.LINE_AA)
    nose = np.array([[cx, cy - 0.05 * u], [cx - 0.1 * u, cy + 0.32 * u], [cx + 0.1 * u, cy + 0.32 * u]])
    cv2.polylines(frame, [nose.astype(np.int32)], True, (180, 120, 100), 2, cv2.LINE_AA)
    p = _face_points(cx, cy, u)
    mouth_y = p["mouth_left"][1]
    half_w = int(0.38 * u)
    cv2.ellipse(frame, (c[0], int(mouth_y - 0.05 * u)), (half_w, int(0.06 * u)), 0, 180, 360, LIP, -1, cv2.LINE_AA)
    cv2.ellipse(frame, (c[0], int(mouth_y)), (half_w, int(0.15 * u)), 0, 0, 180, LIP, -1, cv2.LINE_AA)
    cv2.line(frame, (c[0] - half_w, int(mouth_y)), (c[0] + half_w, int(mouth_y)), (110, 35, 45), 2, cv2.LINE_AA)
    return frame


def padded_crop(frame: np.ndarray, box: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The box's square of `frame` (edges replicated where it leaves the frame), size x size."""
    x1, y1, x2, y2 = (int(v) for v in box)
    h, w = frame.shape[:2]
    pad = max(0, -x1, -y1, x2 - w, y2 - h)
    padded = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else frame
    region = padded[y1 + pad : y2 + pad, x1 + pad : x2 + pad]
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)


def _mask(points: dict[str, np.ndarray], feather: float) -> np.ndarray:
    sigma = feather * CROP_SIZE / 2.5
    margin = 2.5 * sigma + 2
    nose, chin = points["nose_tip"], points["chin"]
    jaw_w = points["jaw_right"][0] - points["jaw_left"][0]
    centre = ((points["mouth_left"][0] + points["mouth_right"][0]) / 2, (nose[1] + chin[1]) / 2 + 4)
    ax = min(0.5 * jaw_w, centre[0] - margin, CROP_SIZE - margin - centre[0])
    ay = min((chin[1] - nose[1]) / 2 + 6, centre[1] - margin, CROP_SIZE - margin - centre[1])
    mask = np.zeros((CROP_SIZE, CROP_SIZE), np.uint8)
    cv2.ellipse(mask, (int(centre[0]), int(centre[1])), (int(ax), int(ay)), 0, 0, 360, 255, -1)
    return cv2.GaussianBlur(mask, (0, 0), sigma)


def synthetic_avatar(
    name: str = "synthetic", size: tuple[int, int] = (512, 512), n_frames: int = 4, feather: float = 0.08
) -> Avatar:
    """A drawn face avatar of `size` (width, height) with `n_frames` source frames."""
    width, height = size
    if width < 64 or height < 64 or n_frames < 1:
        raise ValueError(f"synthetic avatar needs size >= 64x64 and >= 1 frame, got {size}, {n_frames}")
    u = 0.2 * min(width, height)
    frames, boxes, crops, masks, marks = [], [], [], [], []
    for i in range(n_frames):
        bob = 2.0 * np.sin(2 * np.pi * i / max(n_frames, 1))
        cx, cy = width / 2, height * 0.42 + bob
        frame = _draw_frame(width, height, cx, cy, u)
        side = int(round(2.9 * u))
        bx, by = int(round(cx - side / 2)), int(round(cy + 0.2 * u - side / 2))
        box = np.array([bx, by, bx + side, by + side], np.int32)
        scale = CROP_SIZE / side
        points = {k: (np.array(v) - (bx, by)) * scale for k, v in _face_points(cx, cy, u).items()}
        frames.append(frame)
        boxes.append(box)
        crops.append(padded_crop(frame, box))
        masks.append(_mask(points, feather))
        marks.append(np.array([points[n] for n in LANDMARK_NAMES], np.float32))
    return Avatar(
        name=name,
        frames=np.stack(frames),
        crop_boxes=np.stack(boxes),
        crops=np.stack(crops),
        masks=np.stack(masks),
        landmarks=np.stack(marks),
        detected=np.ones(n_frames, bool),
    )
