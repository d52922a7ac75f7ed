"""The inside of the opened mouth, drawn into the gap the jaw drop opened (crop space).

The gap of column x runs from `top[x]` (the upper lip, or the avatar's own upper teeth) to
`bottom[x]` (the lower lip); its height tapers to 0 at the corners. Drawn back to front,
each layer with soft edges:

- the oral cavity: dark, tinted by the avatar's lip colour, deepest in the middle and lighter
  towards the lips and corners (soft shading, no hard inner edge);
- the tongue: a lip-coloured mound rising from the lower lip as the mouth opens wide;
- the lower teeth: a thin band just above the lower lip, only when the mouth is wide open;
- the upper teeth: a band under the upper lip, drawn only where the avatar shows none of its
  own (its own teeth stay above the gap and move with the upper lip).

Every layer's size and strength is a smooth function of the opening, so consecutive frames
never pop. The gap is covered fully (alpha 1 up to its edges, feathered outwards) because
the warp leaves pixels there that belong to neither lip.
"""

from __future__ import annotations

import cv2
import numpy as np

from ray_lipsync.backends.procedural.geometry import MouthGeometry, smoothstep

FEATHER_PX = 1.3  # soft edge of the gap, outside it
MIN_GAP_PX = 2.0  # a gap fades in over this height, so a barely open mouth is a soft line
CAVITY_DARK = np.array([30.0, 10.0, 12.0], np.float32)  # under the upper lip and in the corners
CAVITY_LIT = np.array([112.0, 42.0, 46.0], np.float32)  # lower middle, towards the light
UPPER_TEETH_SHARE = 0.055  # upper teeth height (of nose-to-chin), when drawn
LOWER_TEETH_SHARE = 0.03
TONGUE_WIDTH = 0.3  # tongue half width, of the mouth width
TONGUE_RGB = np.array([184.0, 86.0, 90.0], np.float32)


def _ramp(value: float, start: float, width: float) -> float:
    """0 below `start`, 1 above `start + width`, smooth in between."""
    return float(smoothstep(np.array((value - start) / width)))


def draw_mouth(
    roi: np.ndarray,
    geo: MouthGeometry,
    cols: slice,
    top: np.ndarray,
    bottom: np.ndarray,
    u: np.ndarray,
    open_: float,
) -> None:
    """Draw the mouth interior into `roi` (the warped ROI, uint8) in place.

    top, bottom, u: per column of `cols` (ROI columns), the gap's edges (crop y) and the
    position across the mouth (-1..1).
    """
    height = bottom - top
    ya = int(max(np.floor(top.min() - FEATHER_PX - 1), geo.y0))
    yb = int(min(np.ceil(bottom.max() + FEATHER_PX + 1), geo.y1))
    if yb <= ya:
        return
    y = np.arange(ya, yb, dtype=np.float32)[:, None]
    below_top = y - top  # px below the gap's top edge
    above_bottom = bottom - y
    inside = np.minimum(below_top, above_bottom)
    cover = np.clip(1.0 + inside / FEATHER_PX, 0.0, 1.0) * smoothstep(height / MIN_GAP_PX)
    across = np.clip(1.0 - u * u, 0.0, 1.0)  # 1 at the midline, 0 at the corners

    # The colour is built as three planes, (3, rows, cols): NumPy's loops then run along the
    # rows instead of over 3 channels at a time (about half the time of the whole drawing).
    tint = geo.lip_tint[:, None, None]

    # cavity: dark and warm, darkest under the upper lip and in the corners
    v = np.clip(below_top / np.maximum(height, 0.5), 0.0, 1.0)
    light = (0.35 + 0.65 * v) * np.sqrt(across)
    colour = (CAVITY_DARK[:, None, None] + (CAVITY_LIT - CAVITY_DARK)[:, None, None] * light) * tint

    # tongue: a rounded mound behind the middle of the lower lip, rising as the mouth opens
    tongue_amount = _ramp(open_, 0.15, 0.5)
    xs = geo.grid_x[cols]
    mid_height = float(np.interp(geo.lips.mid_x, xs, height))
    if tongue_amount > 0.0 and mid_height > 0.5:
        radius_y = 0.55 * mid_height * tongue_amount
        centre_y = float(np.interp(geo.lips.mid_x, xs, bottom)) + 0.2 * radius_y
        dx = (xs - geo.lips.mid_x) / (TONGUE_WIDTH * geo.mouth_width)
        inside_t = 1.0 - np.sqrt(dx[None, :] ** 2 + ((y - centre_y) / radius_y) ** 2)
        tongue = np.clip(inside_t * radius_y / 1.5, 0.0, 1.0) * tongue_amount
        shade = 0.4 + 0.45 * np.sqrt(np.clip(inside_t, 0.0, 1.0))
        colour += tongue * (shade * (TONGUE_RGB * geo.lip_tint)[:, None, None] - colour)

    # lower teeth: a thin band above the lower lip, wide open only
    lower_amount = _ramp(open_, 0.5, 0.4)
    if lower_amount > 0.0:
        lower_h = np.minimum(LOWER_TEETH_SHARE * geo.face_height * lower_amount * across, 0.2 * height)
        lower = np.clip((lower_h - above_bottom) / 0.8, 0.0, 1.0) * smoothstep((0.6 - np.abs(u)) / 0.3)
        shade = (0.45 + 0.35 * across)[None, None, :]
        colour += (0.8 * lower) * (shade * geo.teeth_rgb[:, None, None] - colour)

    # upper teeth under the upper lip, where the avatar shows none
    if geo.teeth_shown < 1.0:
        upper_h = np.minimum(UPPER_TEETH_SHARE * geo.face_height * across**0.3, 0.45 * height)
        upper = np.clip((upper_h - below_top) / 0.9, 0.0, 1.0) * smoothstep((0.92 - np.abs(u)) / 0.2)
        lit = np.clip(1.0 - 0.6 * below_top / np.maximum(upper_h, 0.5), 0.0, 1.0)
        shade = 0.62 + 0.38 * lit * across**0.5
        colour += (0.95 * (1.0 - geo.teeth_shown) * upper) * (shade * geo.teeth_rgb[:, None, None] - colour)

    region = roi[ya - geo.y0 : yb - geo.y0, cols]
    drawn = cv2.merge(list(np.clip(colour + 0.5, 0.0, 255.0).astype(np.uint8)))
    region[...] = cv2.blendLinear(drawn, region, cover, 1.0 - cover)
