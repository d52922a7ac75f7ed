"""Paste 256x256 face crops back into full avatar frames through the feathered blend mask.

`composite` is the stateless operation; `Compositor` keeps, per avatar source frame, the mask
resized to its crop box and clipped to the frame (the blend region), so each frame costs one
crop resize and one alpha blend on that region only. The one-pixel border of every crop box
always shows the original frame, whatever the mask: no box edge can become visible.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from ray_lipsync.avatar.model import CROP_SIZE, Avatar
from ray_lipsync.errors import AvatarError, AvatarNotFound

log = logging.getLogger(__name__)

BLEND_CACHE = 2048  # source frames whose blend region is kept (LRU)


@dataclass(frozen=True)
class BlendRegion:
    """Where a crop lands in a frame: frame[fy0:fy1, fx0:fx1] <- box[by0:by1, bx0:bx1]."""

    fx0: int
    fy0: int
    fx1: int
    fy1: int
    bx0: int
    by0: int
    box_w: int
    box_h: int
    alpha: np.ndarray  # (fy1 - fy0, fx1 - fx0, 1) uint16 weights in [0, 255]

    @property
    def empty(self) -> bool:
        return self.fx1 <= self.fx0 or self.fy1 <= self.fy0


def _check_crop(crop: np.ndarray) -> None:
    if crop.shape != (CROP_SIZE, CROP_SIZE, 3) or crop.dtype != np.uint8:
        raise AvatarError(
            f"a crop must be ({CROP_SIZE}, {CROP_SIZE}, 3) uint8 RGB, got {crop.shape} {crop.dtype}"
        )


def blend_region(frame_size: tuple[int, int], crop_box: np.ndarray, mask: np.ndarray) -> BlendRegion:
    """The blend region of a crop box (x1, y1, x2, y2) in a frame of (width, height)."""
    width, height = frame_size
    x1, y1, x2, y2 = (int(v) for v in np.asarray(crop_box).reshape(4))
    box_w, box_h = x2 - x1, y2 - y1
    if box_w < 2 or box_h < 2:
        raise AvatarError(f"crop box {[x1, y1, x2, y2]} is degenerate; prepare the avatar again")
    if mask.shape != (CROP_SIZE, CROP_SIZE):
        raise AvatarError(f"a blend mask must be ({CROP_SIZE}, {CROP_SIZE}), got {mask.shape}")
    alpha = cv2.resize(np.ascontiguousarray(mask), (box_w, box_h), interpolation=cv2.INTER_LINEAR)
    alpha[0, :] = alpha[-1, :] = 0
    alpha[:, 0] = alpha[:, -1] = 0
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    # blend only where the mask is non-zero and the box overlaps the frame
    by0 = int(rows[0]) if len(rows) else 0
    by1 = int(rows[-1]) + 1 if len(rows) else 0
    bx0 = int(cols[0]) if len(cols) else 0
    bx1 = int(cols[-1]) + 1 if len(cols) else 0
    fx0, fx1 = max(x1 + bx0, 0), min(x1 + bx1, width)
    fy0, fy1 = max(y1 + by0, 0), min(y1 + by1, height)
    bx0, by0 = fx0 - x1, fy0 - y1
    region_alpha = alpha[by0 : by0 + max(fy1 - fy0, 0), bx0 : bx0 + max(fx1 - fx0, 0)]
    return BlendRegion(
        fx0=fx0, fy0=fy0, fx1=fx1, fy1=fy1, bx0=bx0, by0=by0, box_w=box_w, box_h=box_h,
        alpha=region_alpha.astype(np.uint16)[:, :, None],
    )


@dataclass(frozen=True)
class Patch:
    """The pixels a composed frame changes: frame[y0:y0 + h, x0:x0 + w] = pixels.

    A patch covers only the blend region (the mouth area), a few KB instead of a full frame,
    so a compositor on another process can ship it cheaply to the process holding the frames.
    """

    avatar_frame: int
    x0: int
    y0: int
    pixels: np.ndarray  # (h, w, 3) uint8

    def apply(self, source: np.ndarray) -> np.ndarray:
        """A copy of `source` (the avatar frame) with the patch pasted in."""
        out = np.array(source)
        h, w = self.pixels.shape[:2]
        out[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.pixels
        return out


def blend_patch(frame: np.ndarray, crop: np.ndarray, region: BlendRegion) -> np.ndarray:
    """The pixels of `frame` over `region` with `crop` alpha-blended in (a new array)."""
    h, w = region.fy1 - region.fy0, region.fx1 - region.fx0
    roi = frame[region.fy0 : region.fy1, region.fx0 : region.fx1]
    if region.empty:
        return np.array(roi)
    scale_x, scale_y = CROP_SIZE / region.box_w, CROP_SIZE / region.box_h
    # resample only the part of the crop the region needs; same sampling as cv2.resize
    affine = np.array(
        [
            [scale_x, 0.0, (region.bx0 + 0.5) * scale_x - 0.5],
            [0.0, scale_y, (region.by0 + 0.5) * scale_y - 0.5],
        ],
        np.float32,
    )
    patch = cv2.warpAffine(
        crop, affine, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )
    a = region.alpha
    blended = (patch.astype(np.uint16) * a + roi.astype(np.uint16) * (255 - a) + 127) // 255
    return blended.astype(np.uint8)


def blend_into(frame: np.ndarray, crop: np.ndarray, region: BlendRegion) -> None:
    """Alpha-blend `crop` into `frame` (modified in place) over `region`."""
    if not region.empty:
        frame[region.fy0 : region.fy1, region.fx0 : region.fx1] = blend_patch(frame, crop, region)


def composite(frame: np.ndarray, crop: np.ndarray, crop_box: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of `frame` with `crop` pasted into `crop_box` through the feathered `mask`.

    frame: (H, W, 3) uint8 RGB; crop: (256, 256, 3) uint8; crop_box: x1, y1, x2, y2 in frame
    pixels (may extend past the frame); mask: (256, 256) uint8, 255 = crop pixels.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise AvatarError(f"a frame must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
    _check_crop(crop)
    out = np.array(frame)
    blend_into(out, crop, blend_region((frame.shape[1], frame.shape[0]), crop_box, mask))
    return out


class Compositor:
    """Full frames from avatar frames and rendered crops, with per-frame blend regions cached."""

    def __init__(self) -> None:
        self._avatars: dict[str, Avatar] = {}
        self._regions: OrderedDict[tuple[str, int], BlendRegion] = OrderedDict()

    def load_avatar(self, avatar: Avatar) -> None:
        """Register `avatar` (idempotent); a new avatar object under a known name replaces it."""
        if self._avatars.get(avatar.name) is avatar:
            return
        self._avatars[avatar.name] = avatar
        for key in [k for k in self._regions if k[0] == avatar.name]:
            del self._regions[key]

    def compose(self, avatar: Avatar, avatar_frame: int, crop: np.ndarray | None) -> np.ndarray:
        """The full frame: source frame `avatar_frame` with `crop` blended in.

        `crop` None gives the idle source frame itself as a read-only view (no copy).
        """
        source = self._source(avatar, avatar_frame)
        if crop is None:
            view = source.view()
            view.flags.writeable = False
            return view
        return self._patch(avatar, avatar_frame, source, crop).apply(source)

    def patch(self, avatar: Avatar, avatar_frame: int, crop: np.ndarray) -> Patch:
        """Only what `compose` changes in source frame `avatar_frame`: the blended region."""
        return self._patch(avatar, avatar_frame, self._source(avatar, avatar_frame), crop)

    def _patch(self, avatar: Avatar, avatar_frame: int, source: np.ndarray, crop: np.ndarray) -> Patch:
        _check_crop(crop)
        region = self._region(avatar, avatar_frame)
        return Patch(avatar_frame, region.fx0, region.fy0, blend_patch(source, crop, region))

    def _source(self, avatar: Avatar, avatar_frame: int) -> np.ndarray:
        self.load_avatar(avatar)
        if not 0 <= avatar_frame < len(avatar):
            raise AvatarError(f"avatar {avatar.name!r} has {len(avatar)} frames, asked for {avatar_frame}")
        return avatar.frames[avatar_frame]

    def _region(self, avatar: Avatar, index: int) -> BlendRegion:
        if avatar.name not in self._avatars:
            raise AvatarNotFound(f"avatar {avatar.name!r} is not loaded in this compositor")
        key = (avatar.name, index)
        region = self._regions.get(key)
        if region is None:
            region = blend_region(avatar.size, avatar.crop_boxes[index], np.asarray(avatar.masks[index]))
            self._regions[key] = region
            if len(self._regions) > BLEND_CACHE:
                self._regions.popitem(last=False)
        else:
            self._regions.move_to_end(key)
        return region
