"""One frame's mouth pose -> the warp of the ROI and the gap the mouth opens.

The pose is [open, spread, round]: jaw drop = open x max_drop (less for rounded vowels),
relative width change = spread x SPREAD_GAIN - round x ROUND_GAIN. The per-source-frame
fields of `MouthGeometry` are scaled and added, so a frame costs a few array operations.

Along the tear line every output column knows where its source lies (after widening) and how
far the mouth opens there, `(1 - u^2) ** power` across the mouth (u: -1 and 1 at the
corners; spread makes the opening flatter, round rounder). Below the tear line pixels come
from `drop x (opening x lip + jaw)` higher up, above it from lower down (`lift`), so the
lower lip moves down, the upper lip up, and between them a gap opens whose edges the
`MouthWarp` reports for drawing the interior. Past the corners the opening is 0 and the warp
is continuous: no tear in the skin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_lipsync.backends.procedural.geometry import LIFT_SHARE, MouthGeometry

SPREAD_GAIN = 0.14  # relative width change at spread = 1
ROUND_GAIN = 0.2  # relative narrowing at round = 1
ROUND_DROP = 0.2  # rounded vowels drop the jaw this much less
LENS_POWER = 1.0  # opening across the mouth: (1 - u^2) ** power (smaller: rounder)
SPREAD_LENS = 0.2  # spread flattens the opening towards the corners
ROUND_LENS = 0.25  # round makes it rounder


@dataclass(frozen=True)
class MouthWarp:
    """Source coordinates of every ROI pixel, and the gap per open ROI column."""

    map_x: np.ndarray  # (h, w) float32 crop x to sample
    map_y: np.ndarray  # (h, w) float32 crop y to sample
    cols: slice  # ROI columns where the mouth is open (empty when closed)
    top: np.ndarray  # per open column: the gap's upper edge (crop y)
    bottom: np.ndarray  # ... its lower edge
    u: np.ndarray  # ... position across the mouth, -1..1


def mouth_warp(geo: MouthGeometry, open_: float, spread: float, rounded: float) -> MouthWarp:
    """The warp of pose [open_, spread, rounded] (each in [0, 1]) on source frame `geo`."""
    lips = geo.lips
    drop = np.float32(open_ * geo.max_drop * (1.0 - ROUND_DROP * rounded))
    widen = np.float32(SPREAD_GAIN * spread - ROUND_GAIN * rounded)
    source_x = geo.grid_x - widen * geo.widen_at_tear
    u = lips.u(source_x).astype(np.float32)
    power = np.float32(LENS_POWER + SPREAD_LENS * spread - ROUND_LENS * rounded)
    opening = np.clip(1.0 - u * u, 0.0, 1.0) ** power
    tear = lips.y(source_x, lips.tear).astype(np.float32)
    below = geo.grid_y >= tear[None, :]
    profile = opening[None, :] * np.where(below, geo.lip, geo.lift) + geo.jaw
    map_y = geo.grid_y - drop * profile
    map_x = geo.grid_x[None, :] - widen * geo.widen
    open_cols = np.flatnonzero(opening > 0.0) if drop > 0 else np.zeros(0, int)
    cols = slice(int(open_cols[0]), int(open_cols[-1]) + 1) if len(open_cols) else slice(0, 0)
    gap = drop * opening[cols]
    return MouthWarp(map_x, map_y, cols, tear[cols] - LIFT_SHARE * gap, tear[cols] + gap, u[cols])
