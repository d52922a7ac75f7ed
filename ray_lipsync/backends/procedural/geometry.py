"""Per-avatar-frame mouth geometry of the procedural renderer, built once and cached.

From the named landmarks of one source frame (256x256 crop space, lightly smoothed over the
neighbouring source frames so that video avatars do not jitter) this derives:

- the lip contours as functions of x: each runs through both mouth corners and its midline
  landmark (a parabola per side, so turned faces with an off-centre midline work);
- the tear line where the mouth opens: the lower lip's inner edge when the avatar shows its
  upper teeth (the teeth stay with the upper lip), else halfway between the lips, blended by
  a smooth "teeth shown" score averaged over neighbouring source frames;
- the region of interest (ROI: lower face inside the blend mask) and motion fields over it,
  linear in the jaw drop so a frame only scales and adds them: `lip` (the lower lip moves
  rigidly with the jaw, fading into the chin), `jaw` (the chin and jaw skin, broad, fading
  below the chin), `lift` (the upper lip and its teeth rise a little, fading towards the
  nose) and `widen` (horizontal offset that moves the corners out or in, fading on the
  cheeks and, like `lift`, towards the nose). Every field is 0 at the nose row, where the ROI
  starts (the blend mask may reach higher: MuseTalk's "jaw" mask starts at the crop box
  centre, above the nose tip), and on the ROI's other edges. Every field also fades in with
  the distance from where the blend mask is half strong, so the mask's outer feather keeps
  the original pixels: the compositor never mixes moved and unmoved edges (no seam, no double
  chin), and the skin between the lower lip and the chin compresses smoothly;
- the avatar's colours: lips (tint of the mouth interior and tongue) and teeth (its own when
  shown, else off-white at the brightness of its skin).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from ray_lipsync.avatar.model import CROP_SIZE, LANDMARK, Avatar

LIFT_SHARE = 0.15  # the upper lip rises this fraction of the jaw drop
MAX_DROP_SHARE = 0.2  # jaw drop at open = 1, as a fraction of nose-to-chin height
MOTION_RAMP_SHARE = 0.22  # motion fades in over this share of nose-to-chin height from where the
# blend mask is half strong (none in the mask's outer feather: no ghosts, no seam)
WIDEN_REACH = 0.7  # the cheeks follow the corners over this share of the half width
TEETH_MIN_GAP = 3.0  # px between the lips (crop space) above which visible teeth are looked for
LANDMARK_SMOOTHING = (0.25, 0.5, 0.25)  # weights of source frames i-1, i, i+1
DEFAULT_TEETH_RGB = np.array([226.0, 220.0, 208.0], np.float32)
TYPICAL_LIP_RGB = np.array([196.0, 120.0, 120.0], np.float32)


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class LipContours:
    """Lip contours of one frame as y(x), through both corners and a midline point each."""

    mid_x: float
    left: tuple[float, float]  # (x, y) of the left corner
    right: tuple[float, float]
    upper_outer: float  # midline y of each contour
    upper_inner: float
    lower_inner: float
    lower_outer: float
    tear: float  # midline y of the line the mouth opens at

    def u(self, x: np.ndarray) -> np.ndarray:
        """Signed position across the mouth: -1 at the left corner, 0 midline, 1 right corner."""
        half = np.where(x < self.mid_x, self.mid_x - self.left[0], self.right[0] - self.mid_x)
        return (x - self.mid_x) / half

    def corner_y(self, x: np.ndarray) -> np.ndarray:
        lx, ly = self.left
        rx, ry = self.right
        return ly + (ry - ly) * (x - lx) / (rx - lx)

    def y(self, x: np.ndarray, mid_y: float) -> np.ndarray:
        """The contour through both corners and (mid_x, mid_y); flat past the corners."""
        lens = np.clip(1.0 - self.u(x) ** 2, 0.0, 1.0)
        return self.corner_y(x) + (mid_y - float(self.corner_y(np.array(self.mid_x)))) * lens


@dataclass(frozen=True)
class MouthGeometry:
    """Warp data of one source frame. ROI is crop[y0:y1, x0:x1]; fields are (h, w) float32."""

    x0: int
    y0: int
    x1: int
    y1: int
    lips: LipContours
    mouth_width: float
    face_height: float  # nose tip to chin
    teeth_shown: float  # 0..1: how clearly the avatar's own upper teeth show between the lips
    grid_x: np.ndarray  # (w,) crop x of ROI columns
    grid_y: np.ndarray  # (h, 1) crop y of ROI rows
    widen_at_tear: np.ndarray  # (w,) the widen field along the tear line
    lip: np.ndarray  # lower lip coefficient of the opening profile (below the tear)
    jaw: np.ndarray  # broad jaw motion per px of drop (below the tear)
    lift: np.ndarray  # upper lip motion per px of drop (negative: up), above the tear
    widen: np.ndarray  # horizontal offset per unit of relative width change
    alpha: np.ndarray  # blend mask in [0, 1]
    keep: np.ndarray  # 1 - alpha
    lip_tint: np.ndarray  # (3,) float32 the lips' colour relative to a typical lip colour
    teeth_rgb: np.ndarray  # (3,) float32 teeth colour (the avatar's own when shown)

    @property
    def shows_teeth(self) -> bool:
        return self.teeth_shown >= 0.5

    @property
    def max_drop(self) -> float:
        """Jaw drop (px) at open = 1."""
        return MAX_DROP_SHARE * self.face_height


def smoothed_landmarks(avatar: Avatar, index: int) -> np.ndarray:
    """Landmarks of source frame `index` averaged with its neighbours (the idle cycle plays
    source frames in order, so neighbours are neighbours in time)."""
    n = len(avatar)
    marks = np.zeros((len(LANDMARK), 2), np.float64)
    for offset, weight in zip((-1, 0, 1), LANDMARK_SMOOTHING):
        marks += weight * np.asarray(avatar.landmarks[min(max(index + offset, 0), n - 1)], np.float64)
    return marks


def _lip_contours(lm: np.ndarray) -> LipContours:
    left, right = lm[LANDMARK["mouth_left"]], lm[LANDMARK["mouth_right"]]
    width = max(right[0] - left[0], 8.0)
    if right[0] - left[0] < 8.0:  # degenerate landmarks: give the mouth a minimal width
        centre = (left[0] + right[0]) / 2
        left, right = np.array([centre - 4.0, left[1]]), np.array([centre + 4.0, right[1]])
    mid_x = (lm[LANDMARK["upper_lip_bottom"], 0] + lm[LANDMARK["lower_lip_top"], 0]) / 2
    mid_x = float(np.clip(mid_x, left[0] + 0.2 * width, right[0] - 0.2 * width))
    upper_outer = float(lm[LANDMARK["upper_lip_top"], 1])
    upper_inner = float(max(lm[LANDMARK["upper_lip_bottom"], 1], upper_outer))
    lower_inner = float(max(lm[LANDMARK["lower_lip_top"], 1], upper_inner))
    lower_outer = float(max(lm[LANDMARK["lower_lip_bottom"], 1], lower_inner + 1.0))
    return LipContours(
        mid_x=mid_x, left=(float(left[0]), float(left[1])), right=(float(right[0]), float(right[1])),
        upper_outer=upper_outer, upper_inner=upper_inner, lower_inner=lower_inner,
        lower_outer=lower_outer, tear=(upper_inner + lower_inner) / 2,
    )  # fmt: skip


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def _ramp(value: float, start: float, width: float) -> float:
    return float(smoothstep(np.array((value - start) / width)))


def _mouth_columns(lips: LipContours) -> slice:
    """Crop columns of the middle half of the mouth, where colours are sampled."""
    half = 0.25 * (lips.right[0] - lips.left[0])
    return slice(int(max(lips.mid_x - half, 0)), int(min(lips.mid_x + half, CROP_SIZE - 1)) + 1)


def _lip_rgb(image: np.ndarray, lips: LipContours) -> np.ndarray:
    """Mean colour of the middle of the lower lip (float32 RGB)."""
    thick = lips.lower_outer - lips.lower_inner
    ya = min(max(int(np.ceil(lips.lower_inner + 0.25 * thick)), 0), CROP_SIZE - 1)
    yb = min(max(int(np.floor(lips.lower_outer - 0.25 * thick)) + 1, ya + 1), CROP_SIZE)
    return image[ya:yb, _mouth_columns(lips)].reshape(-1, 3).mean(axis=0).astype(np.float32)


def _teeth(image: np.ndarray, lips: LipContours) -> tuple[float, np.ndarray]:
    """(teeth shown in [0, 1], their colour) between the lips of a frame at rest.

    Teeth count as shown where the lips are apart and the gap is brighter than the lips and
    far less coloured (a dark or red gap is no teeth); the score is smooth in those measures.
    """
    gap = lips.lower_inner - lips.upper_inner
    apart = _ramp(gap, TEETH_MIN_GAP - 1.0, 2.0)
    if apart == 0.0:
        return 0.0, DEFAULT_TEETH_RGB
    ta = int(np.ceil(lips.upper_inner + 0.2 * gap))
    tb = max(int(np.floor(lips.lower_inner - 0.2 * gap)) + 1, ta + 1)
    region = image[ta:tb, _mouth_columns(lips)].reshape(-1, 3)
    luma = _luma(region)
    colour = region[luma >= np.percentile(luma, 50)].mean(axis=0)  # the brighter half
    lip = _lip_rgb(image, lips)
    brighter = _ramp(float(_luma(colour)) / max(float(_luma(lip)), 1.0), 1.0, 0.2)
    paler = _ramp(max(0.6 * float(np.ptp(lip)), 25.0) - float(np.ptp(colour)), -5.0, 10.0)
    return apart * brighter * paler, colour.astype(np.float32)


def _ramp(value: float, start: float, width: float) -> float:
    return float(smoothstep(np.array((value - start) / width)))


def build_geometry(avatar: Avatar, index: int) -> MouthGeometry | None:
    """Geometry of source frame `index`, or None where the blend mask is empty."""
    mask = np.asarray(avatar.masks[index])
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    lm = smoothed_landmarks(avatar, index)
    lips = _lip_contours(lm)
    image = np.asarray(avatar.crops[index]).astype(np.float32)
    lip_rgb = _lip_rgb(image, lips)
    # teeth shown, averaged like the landmarks: no flicker where a video shows them on and off
    teeth_shown, n = 0.0, len(avatar)
    for offset, weight in zip((-1, 0, 1), LANDMARK_SMOOTHING):
        i = min(max(index + offset, 0), n - 1)
        own = _lip_contours(np.asarray(avatar.landmarks[i], np.float64))
        teeth_shown += weight * _teeth(np.asarray(avatar.crops[i]).astype(np.float32), own)[0]
    nose, chin = lm[LANDMARK["nose_tip"]], lm[LANDMARK["chin"]]
    jaw_l, jaw_r = lm[LANDMARK["jaw_left"]], lm[LANDMARK["jaw_right"]]
    width = lips.right[0] - lips.left[0]
    face_h = float(max(chin[1] - nose[1], 16.0))
    # drawn teeth take the brightness of the skin below the lips; shown ones keep their colour
    skin_y = int(min(lips.lower_outer + 0.15 * face_h, CROP_SIZE - 1))
    skin = image[skin_y, _mouth_columns(lips)].mean(axis=0)
    drawn = DEFAULT_TEETH_RGB * float(np.clip(_luma(skin) / 185.0, 0.75, 1.0))
    teeth_rgb = drawn + teeth_shown * (_teeth(image, lips)[1] - drawn)
    # teeth belong to the upper jaw: the mouth opens below the teeth it shows
    lips = replace(lips, tear=lips.tear + teeth_shown * (lips.lower_inner - lips.tear))

    # the ROI holds every pixel that moves: the cheeks out to the widen field's reach
    reach_l = lips.left[0] - (1.0 + WIDEN_REACH) * (lips.mid_x - lips.left[0])
    reach_r = lips.right[0] + (1.0 + WIDEN_REACH) * (lips.right[0] - lips.mid_x)
    x0 = int(max(cols[0], np.floor(min(jaw_l[0], reach_l))))
    x1 = int(min(cols[-1] + 1, np.ceil(max(jaw_r[0], reach_r)) + 1))
    y0 = int(max(rows[0], np.floor(nose[1])))
    y1 = int(min(rows[-1] + 1, np.ceil(chin[1] + 0.45 * face_h) + 1, CROP_SIZE))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None

    gx = np.arange(x0, x1, dtype=np.float64)
    gy = np.arange(y0, y1, dtype=np.float64)[:, None]
    alpha = mask[y0:y1, x0:x1].astype(np.float32) / 255.0
    # motion fades in with the distance from where the mask is half strong
    strong = (mask[y0:y1, x0:x1] >= 128).astype(np.uint8)
    inside = cv2.distanceTransform(strong, cv2.DIST_L2, cv2.DIST_MASK_PRECISE).astype(np.float64)
    weight = smoothstep(inside / (MOTION_RAMP_SHARE * face_h))

    # lower lip: rigid down to its outer edge, then handing over to the jaw towards the chin
    lower_outer = lips.y(gx, lips.lower_outer)[None, :]
    to_chin = smoothstep((gy - lower_outer) / max(chin[1] - lips.lower_outer, 4.0))
    under_chin = 1.0 - smoothstep((gy - chin[1]) / (0.35 * face_h))
    jaw_centre = (lips.mid_x + chin[0]) / 2
    half_jaw = max(abs(jaw_r[0] - jaw_l[0]) / 2, 0.7 * width)
    broad = np.exp(-(((gx - jaw_centre) / (0.8 * half_jaw)) ** 2))[None, :]
    lip = (1.0 - to_chin) * weight
    jaw = broad * to_chin * under_chin * weight
    # upper lip: rigid up to its outer edge, fading out towards the nose
    upper_outer = lips.y(gx, lips.upper_outer)[None, :]
    towards_nose = smoothstep((gy - nose[1]) / np.maximum(upper_outer - nose[1], 1.0))
    lift = -LIFT_SHARE * towards_nose * weight
    # widening: linear across the mouth (corners move by the full share), fading on the cheeks
    # and, like the lift, towards the nose: the nose and the folds beside it stay where they
    # are, wherever the blend mask starts (MuseTalk's mask reaches above the nose tip)
    mouth_cy = (lips.upper_outer + lips.lower_outer) / 2
    offset = gx - lips.mid_x
    half = np.where(offset < 0, lips.mid_x - lips.left[0], lips.right[0] - lips.mid_x)
    across = offset * (1.0 - smoothstep((np.abs(offset) - half) / (WIDEN_REACH * half)))
    widen = across[None, :] * np.exp(-(((gy - mouth_cy) / (0.4 * face_h)) ** 2)) * towards_nose * weight
    tear_rows = np.clip(np.round(lips.y(gx, lips.tear)).astype(int) - y0, 0, y1 - y0 - 1)
    widen_at_tear = widen[tear_rows, np.arange(x1 - x0)]
    f32 = np.float32
    return MouthGeometry(
        x0=x0, y0=y0, x1=x1, y1=y1, lips=lips, mouth_width=float(width), face_height=face_h,
        teeth_shown=teeth_shown, grid_x=gx.astype(f32), grid_y=gy.astype(f32),
        widen_at_tear=widen_at_tear.astype(f32), lip=lip.astype(f32), jaw=jaw.astype(f32),
        lift=lift.astype(f32), widen=widen.astype(f32), alpha=alpha, keep=1.0 - alpha,
        lip_tint=np.clip(lip_rgb / TYPICAL_LIP_RGB, 0.6, 1.3).astype(f32), teeth_rgb=teeth_rgb,
    )  # fmt: skip
