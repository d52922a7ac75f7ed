"""Compositing: crops pasted through the feathered mask, no visible box edge."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ray_lipsync.backends.procedural import synthetic_avatar
from ray_lipsync.compositing import Compositor, composite
from ray_lipsync.errors import AvatarError


def noise_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 1.5)


def full_mask() -> np.ndarray:
    return np.full((256, 256), 255, np.uint8)


def border(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels on the box outline that lie inside the image."""
    x1, y1, x2, y2 = box
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    on_edge = inside & ((xs == x1) | (xs == x2 - 1) | (ys == y1) | (ys == y2 - 1))
    return on_edge


@pytest.mark.parametrize(
    "box", [(100, 120, 400, 420), (-60, 300, 240, 600), (380, -40, 560, 140), (10, 10, 138, 138)]
)
def test_box_border_shows_the_original_frame(box) -> None:
    frame = noise_image(512, 512, 0)
    crop = np.zeros((256, 256, 3), np.uint8)  # maximally different from the frame
    out = composite(frame, crop, np.array(box), full_mask())
    edge = border(frame, box)
    assert edge.any()
    np.testing.assert_array_equal(out[edge], frame[edge])
    x1, y1, x2, y2 = box
    inside = np.zeros(frame.shape[:2], bool)
    inside[max(y1, 0) : y2, max(x1, 0) : x2] = True
    np.testing.assert_array_equal(out[~inside], frame[~inside])  # nothing outside the box moves
    assert out[inside & ~edge].mean() < 1.0  # and the crop did land inside it
    assert out.shape == frame.shape and out.dtype == np.uint8


def test_crop_is_resized_into_the_box() -> None:
    frame = noise_image(480, 640, 1)
    crop = noise_image(256, 256, 2)
    box = (200, 100, 500, 400)
    out = composite(frame, crop, np.array(box), full_mask())
    expected = cv2.resize(crop, (300, 300), interpolation=cv2.INTER_LINEAR)
    diff = np.abs(out[101:399, 201:499].astype(int) - expected[1:-1, 1:-1])
    assert diff.max() <= 1


def test_feathered_mask_blends() -> None:
    frame = np.full((300, 300, 3), 200, np.uint8)
    crop = np.zeros((256, 256, 3), np.uint8)
    mask = np.zeros((256, 256), np.uint8)
    mask[:, 128:] = 255
    mask[:, 120:136] = np.linspace(0, 255, 16).astype(np.uint8)
    out = composite(frame, crop, np.array((22, 22, 278, 278)), mask)
    row = out[150, 22:278, 0].astype(int)
    assert (row[:118] == 200).all() and (row[140:-1] == 0).all()
    assert (np.diff(row[115:140]) <= 0).all()  # monotone ramp, no step
    assert frame[150, 150, 0] == 200  # input untouched


def test_compositor_idle_and_speech_frames() -> None:
    avatar = synthetic_avatar(n_frames=3)
    before = avatar.frames.copy()
    compositor = Compositor()
    idle = compositor.compose(avatar, 1, None)
    assert not idle.flags.writeable
    np.testing.assert_array_equal(idle, avatar.frames[1])
    out = compositor.compose(avatar, 1, avatar.crops[1])
    # pasting the frame's own crop back changes almost nothing (resampling only)
    assert np.abs(out.astype(int) - avatar.frames[1]).mean() < 1.0
    black = compositor.compose(avatar, 2, np.zeros((256, 256, 3), np.uint8))
    mask_region = black.astype(int).sum(axis=2) < avatar.frames[2].astype(int).sum(axis=2)
    x1, y1, x2, y2 = avatar.crop_boxes[2]
    ys, xs = np.nonzero(mask_region)
    assert ys.min() > y1 and ys.max() < y2 - 1 and xs.min() > x1 and xs.max() < x2 - 1
    np.testing.assert_array_equal(avatar.frames, before)  # the avatar is never modified
    np.testing.assert_array_equal(compositor.compose(avatar, 2, None), avatar.frames[2])


def test_patch_is_the_changed_region_only() -> None:
    avatar = synthetic_avatar(n_frames=2)
    compositor = Compositor()
    crop = np.zeros((256, 256, 3), np.uint8)
    patch = compositor.patch(avatar, 1, crop)
    full = compositor.compose(avatar, 1, crop)
    np.testing.assert_array_equal(patch.apply(avatar.frames[1]), full)
    h, w = patch.pixels.shape[:2]
    outside = full.copy()
    outside[patch.y0 : patch.y0 + h, patch.x0 : patch.x0 + w] = avatar.frames[1][patch.y0 : patch.y0 + h, patch.x0 : patch.x0 + w]
    np.testing.assert_array_equal(outside, avatar.frames[1])  # nothing changes outside it
    assert patch.avatar_frame == 1 and patch.pixels.nbytes < full.nbytes / 2


def test_validation() -> None:
    frame = noise_image(64, 64, 0)
    with pytest.raises(AvatarError, match="crop must be"):
        composite(frame, np.zeros((128, 128, 3), np.uint8), np.array((0, 0, 32, 32)), full_mask())
    with pytest.raises(AvatarError, match="degenerate"):
        composite(frame, np.zeros((256, 256, 3), np.uint8), np.array((5, 5, 5, 30)), full_mask())
    avatar = synthetic_avatar(n_frames=1)
    with pytest.raises(AvatarError, match="frames"):
        Compositor().compose(avatar, 3, None)
