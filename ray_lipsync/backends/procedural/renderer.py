"""The procedural renderer: warps the avatar's lower face by [open, spread, round].

Per job: jaw drop = open x max_drop (lower lip and chin move down, smooth falloff), the upper
lip lifts a little, the mouth widens (spread) or narrows (round), and a shaded dark mouth
interior with soft edges (and a hint of upper teeth) fills the gap between the lips. Only the
ROI inside the blend mask is touched (one cv2.remap on precomputed fields and one
cv2.blendLinear, in uint8); features ~0 give the crop back unchanged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Sequence

import cv2
import numpy as np

from ray_lipsync.avatar.model import CROP_SIZE, Avatar
from ray_lipsync.backends.base import Renderer
from ray_lipsync.backends.procedural.features import FEATURE_DIM
from ray_lipsync.backends.procedural.geometry import UPPER_LIP_LIFT as UPPER_LIFT_SHARE
from ray_lipsync.backends.procedural.geometry import MouthGeometry, build_geometry
from ray_lipsync.config import Settings
from ray_lipsync.errors import AvatarError, AvatarNotFound, LipsyncError
from ray_lipsync.types import RenderJob

log = logging.getLogger(__name__)

SPREAD_GAIN = 0.16  # relative width change at spread = 1
ROUND_GAIN = 0.22  # relative narrowing at round = 1
MOUTH_RGB = np.array([70.0, 22.0, 28.0], np.float32)  # mouth interior (scaled by shading)
TEETH_RGB = np.array([214.0, 206.0, 196.0], np.float32)
IDLE_EPS = 1e-3  # features below this leave the crop unchanged
GEOMETRY_CACHE = 2048  # source frames whose warp geometry is kept (LRU)


class ProceduralRenderer(Renderer):
    """CPU renderer for `ProceduralFeaturizer` features (see module doc)."""

    name = "procedural"

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._avatars: dict[str, Avatar] = {}
        self._geometry: OrderedDict[tuple[str, int], MouthGeometry | None] = OrderedDict()

    def load_avatar(self, avatar: Avatar) -> None:
        if avatar.crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
            raise AvatarError(
                f"avatar {avatar.name!r} has crops of shape {avatar.crops.shape[1:]}, expected "
                f"({CROP_SIZE}, {CROP_SIZE}, 3); prepare it again"
            )
        if self._avatars.get(avatar.name) is avatar:
            return
        self._avatars[avatar.name] = avatar
        for key in [k for k in self._geometry if k[0] == avatar.name]:
            del self._geometry[key]

    def render(self, jobs: Sequence[RenderJob]) -> list[np.ndarray]:
        return [self.render_one(job) for job in jobs]

    def render_one(self, job: RenderJob) -> np.ndarray:
        """The (256, 256, 3) uint8 crop of one job."""
        avatar = self._avatars.get(job.avatar)
        if avatar is None:
            raise AvatarNotFound(f"avatar {job.avatar!r} is not loaded in this renderer; call load_avatar first")
        if not 0 <= job.avatar_frame < len(avatar):
            raise AvatarError(
                f"avatar {job.avatar!r} has {len(avatar)} frames, job asks for frame {job.avatar_frame}"
            )
        features = np.asarray(job.features, dtype=np.float32).reshape(-1)
        if features.shape != (FEATURE_DIM,) or not np.all(np.isfinite(features)):
            raise LipsyncError(
                f"procedural features must be {FEATURE_DIM} finite floats [open, spread, round], "
                f"got {job.features!r}; use ProceduralFeaturizer"
            )
        open_, spread, rounded = np.clip(features, 0.0, 1.0).tolist()
        crop = np.array(avatar.crops[job.avatar_frame])  # writable copy
        if max(open_, spread, rounded) < IDLE_EPS:
            return crop
        geo = self._geometry_of(avatar, job.avatar_frame)
        if geo is None:
            return crop
        self._warp(crop, geo, open_, SPREAD_GAIN * spread - ROUND_GAIN * rounded)
        return crop

    def _geometry_of(self, avatar: Avatar, index: int) -> MouthGeometry | None:
        key = (avatar.name, index)
        if key in self._geometry:
            self._geometry.move_to_end(key)
            return self._geometry[key]
        geo = build_geometry(avatar, index)
        self._geometry[key] = geo
        if len(self._geometry) > GEOMETRY_CACHE:
            self._geometry.popitem(last=False)
        return geo

    def _warp(self, crop: np.ndarray, geo: MouthGeometry, open_: float, widen: float) -> None:
        """Warp crop's ROI in place, draw the mouth interior, blend through the mask."""
        drop_px = open_ * geo.max_drop
        map_x = geo.grid_x[None, :] - widen * geo.widen
        map_y = geo.grid_y - drop_px * geo.drop
        warped = cv2.remap(crop, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if drop_px > 0.5:
            self._draw_interior(warped, geo, drop_px, widen, open_)
        roi = crop[geo.y0 : geo.y1, geo.x0 : geo.x1]
        roi[...] = cv2.blendLinear(warped, roi, geo.alpha, geo.keep)

    @staticmethod
    def _draw_interior(
        warped: np.ndarray, geo: MouthGeometry, drop_px: float, widen: float, open_: float
    ) -> None:
        """Shaded mouth interior in the gap the jaw drop opened (ROI coordinates), soft-edged.

        The gap runs from the (lifted) tear line to the lower lip's new upper edge; where the
        avatar's mouth is closed, a hint of upper teeth is drawn at its top.
        """
        top = geo.lip_gap_bottom - UPPER_LIFT_SHARE * drop_px - 1.0
        bottom = geo.lip_gap_bottom + drop_px
        half_h = max((bottom - top) / 2, 0.5)
        centre_y = (top + bottom) / 2
        half_w = 0.5 * geo.mouth_width * (1.0 + widen)
        xa = int(max(geo.x0, np.floor(geo.cx - half_w - 2)))
        xb = int(min(geo.x1, np.ceil(geo.cx + half_w + 2)))
        ya = int(max(geo.y0, np.floor(top - 2)))
        yb = int(min(geo.y1, np.ceil(bottom + 2)))
        if xb <= xa or yb <= ya:
            return
        xs = (np.arange(xa, xb, dtype=np.float32) - geo.cx) / half_w
        y_abs = np.arange(ya, yb, dtype=np.float32)[:, None]
        ys = (y_abs - centre_y) / half_h
        # a lens: the opening tapers towards the corners
        dist = np.sqrt(xs[None, :] ** 2 + (ys / np.clip(1.0 - xs[None, :] ** 2, 0.05, 1.0)) ** 2)
        alpha = np.clip((1.0 - dist) * min(half_w, half_h) / 2.0, 0.0, 1.0)[:, :, None]
        shade = (0.45 + 0.9 * np.clip(0.6 * ys**2 + 0.6 * xs[None, :] ** 2, 0.0, 1.0))[:, :, None]
        colour = MOUTH_RGB * shade
        if geo.lip_gap_bottom - geo.lip_gap_top < 3.0:
            teeth_h = min(0.6 * half_h, 0.05 * geo.face_height)
            teeth = np.clip((top + teeth_h - y_abs) / 1.5, 0.0, 1.0) * (np.abs(xs) < 0.65)[None, :]
            teeth = (0.8 * teeth)[:, :, None]
            colour = colour * (1.0 - teeth) + TEETH_RGB * teeth
        region = warped[ya - geo.y0 : yb - geo.y0, xa - geo.x0 : xb - geo.x0]
        region[...] = region * (1.0 - alpha) + colour * alpha + 0.5
