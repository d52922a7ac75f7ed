"""Per-avatar-frame warp geometry of the procedural renderer, built once and cached.

From the landmarks of one source frame (256x256 crop space) this derives the region of
interest (ROI: lower face, inside the blend mask) and two displacement fields over it:

- `drop`: how far each pixel's source moves up per pixel of jaw drop. 1 from the lower lip's
  upper edge (the "tear line") down to the chin (lower lip and chin move down together), a
  short ramp at the tear line (the mouth opens there), a smooth fade below the chin and
  towards the cheeks, and a small negative lobe above it (the upper lip, and any teeth the
  avatar already shows, lift a little). A mouth that is already open keeps its teeth.
- `widen`: horizontal offset per unit of width change, (x - cx) under a Gaussian around the
  mouth, so the mouth corners move out (spread) or in (round) and the cheeks follow softly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_lipsync.avatar.model import CROP_SIZE, LANDMARK, Avatar

UPPER_LIP_LIFT = 0.15  # upper lip rises this fraction of the jaw drop


@dataclass(frozen=True)
class MouthGeometry:
    """Warp data of one source frame. ROI is crop[y0:y1, x0:x1]."""

    x0: int
    y0: int
    x1: int
    y1: int
    cx: float  # mouth centre x
    lip_gap_top: float  # upper lip's lower edge (y) at rest
    lip_gap_bottom: float  # lower lip's upper edge (y) at rest
    mouth_width: float
    face_height: float  # nose tip to chin
    grid_x: np.ndarray  # (w,) float32 crop x of ROI columns
    grid_y: np.ndarray  # (h, 1) float32 crop y of ROI rows
    drop: np.ndarray  # (h, w) float32
    widen: np.ndarray  # (h, w) float32
    alpha: np.ndarray  # (h, w) float32 blend mask in [0, 1]
    keep: np.ndarray  # (h, w) float32, 1 - alpha

    @property
    def max_drop(self) -> float:
        """Jaw drop (px) at open = 1."""
        return 0.24 * self.face_height


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def build_geometry(avatar: Avatar, index: int) -> MouthGeometry | None:
    """Geometry of source frame `index`, or None where the blend mask is empty."""
    mask = np.asarray(avatar.masks[index])
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    lm = np.asarray(avatar.landmarks[index], dtype=np.float64)
    left, right = lm[LANDMARK["mouth_left"]], lm[LANDMARK["mouth_right"]]
    nose, chin = lm[LANDMARK["nose_tip"]], lm[LANDMARK["chin"]]
    jaw_l, jaw_r = lm[LANDMARK["jaw_left"]], lm[LANDMARK["jaw_right"]]
    gap_top = float(lm[LANDMARK["upper_lip_bottom"], 1])
    gap_bottom = float(max(lm[LANDMARK["lower_lip_top"], 1], gap_top))
    cx = float((left[0] + right[0]) / 2)
    width = float(max(abs(right[0] - left[0]), 8.0))
    face_h = float(max(chin[1] - nose[1], 16.0))
    tear_y = gap_bottom

    x0 = int(max(cols[0], np.floor(min(jaw_l[0], left[0] - 0.6 * width))))
    x1 = int(min(cols[-1] + 1, np.ceil(max(jaw_r[0], right[0] + 0.6 * width)) + 1))
    y0 = int(max(rows[0], np.floor(nose[1])))
    y1 = int(min(rows[-1] + 1, np.ceil(chin[1] + 0.45 * face_h) + 1, CROP_SIZE))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None

    gx = np.arange(x0, x1, dtype=np.float32)
    gy = np.arange(y0, y1, dtype=np.float32)[:, None]
    half_jaw = max(abs(jaw_r[0] - jaw_l[0]) / 2, width * 0.7)
    fall_x = np.exp(-(((gx - cx) / (0.75 * half_jaw)) ** 2))[None, :]
    below = _smoothstep((gy - (tear_y - 1.5)) / 3.0)  # the mouth opens at the tear line
    under_chin = 1.0 - _smoothstep((gy - chin[1]) / (0.45 * face_h))
    above = _smoothstep((gy - nose[1]) / max(gap_top - nose[1], 1.0)) * (gy < tear_y)
    fall_mouth = np.exp(-(((gx - cx) / (0.7 * width)) ** 2))[None, :]
    # at the tear line the opening closes at the mouth corners; lower down the jaw is broad
    fall_lips = np.clip(1.0 - ((gx - cx) / (0.5 * width)) ** 2, 0.0, 1.0)[None, :]
    towards_jaw = _smoothstep((gy - tear_y) / max(0.5 * (chin[1] - tear_y), 1.0))
    fall = fall_lips + (fall_x - fall_lips) * towards_jaw
    drop = below * under_chin * fall - UPPER_LIP_LIFT * above * fall_mouth
    around = np.exp(-(((gy - (gap_top + tear_y) / 2) / (0.35 * face_h)) ** 2))
    widen = (gx[None, :] - cx) * np.exp(-(((gx - cx) / (1.1 * width)) ** 2))[None, :] * around
    alpha = mask[y0:y1, x0:x1].astype(np.float32) / 255.0
    return MouthGeometry(
        x0=x0, y0=y0, x1=x1, y1=y1, cx=cx, lip_gap_top=gap_top, lip_gap_bottom=gap_bottom,
        mouth_width=width, face_height=face_h, grid_x=gx, grid_y=gy,
        drop=drop.astype(np.float32), widen=widen.astype(np.float32), alpha=alpha, keep=1.0 - alpha,
    )
