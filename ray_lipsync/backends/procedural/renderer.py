"""The procedural renderer: [open, spread, round] per job -> the avatar's crop with its mouth moved.

Per job, on the source frame's cached `MouthGeometry`: `mouth_warp` gives the warp (lower lip
and jaw down, upper lip and its teeth up a little, corners out for spread and in for round)
and the gap it opens; one cv2.remap applies it to the ROI, `draw_mouth` fills the gap (shaded
cavity, tongue, teeth), and one cv2.blendLinear puts the ROI back through the blend mask, so
no pixel outside the mask changes. Features ~0 give the crop back unchanged.
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
from ray_lipsync.backends.procedural.geometry import MouthGeometry, build_geometry
from ray_lipsync.backends.procedural.mouth import draw_mouth
from ray_lipsync.backends.procedural.warp import mouth_warp
from ray_lipsync.config import Settings
from ray_lipsync.errors import AvatarError, AvatarNotFound, LipsyncError
from ray_lipsync.types import RenderJob

log = logging.getLogger(__name__)

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
        self._warp(crop, geo, open_, spread, rounded)
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

    def _warp(self, crop: np.ndarray, geo: MouthGeometry, open_: float, spread: float, rounded: float) -> None:
        """Warp crop's ROI in place, draw the mouth interior, blend through the mask."""
        warp = mouth_warp(geo, open_, spread, rounded)
        warped = cv2.remap(crop, warp.map_x, warp.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if warp.cols.stop > warp.cols.start:
            draw_mouth(warped, geo, warp.cols, warp.top, warp.bottom, warp.u, open_)
        roi = crop[geo.y0 : geo.y1, geo.x0 : geo.x1]
        roi[...] = cv2.blendLinear(warped, roi, geo.alpha, geo.keep)
