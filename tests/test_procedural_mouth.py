"""The procedural mouth as a user sees it: the default avatar (the astronaut, whose smile shows
teeth), the drawn face (closed lips) and yongen.mp4 (a video avatar; skipped when absent).

Openings are measured on the images: pixels that turned much darker than the idle frame.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest

from ray_lipsync.avatar.model import LANDMARK, Avatar
from ray_lipsync.backends.procedural import ProceduralRenderer, synthetic_avatar
from ray_lipsync.backends.procedural.geometry import build_geometry
from ray_lipsync.backends.procedural.warp import mouth_warp
from ray_lipsync.clock import SAMPLES_PER_FRAME, frames_in_samples
from ray_lipsync.config import AvatarConfig, Settings
from ray_lipsync.render import detect_speech, render_frames
from ray_lipsync.types import RenderJob

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
DARKER = 40.0  # luma drop that counts a pixel as opened mouth
SHAPES = [(1.0, 0.0, 0.0), (0.6, 1.0, 0.0), (0.6, 0.0, 1.0), (1.0, 1.0, 1.0), (0.3, 0.5, 0.2)]


def luma(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def loudness(samples: np.ndarray) -> np.ndarray:
    n = frames_in_samples(len(samples))
    return np.sqrt(np.mean(samples[: n * SAMPLES_PER_FRAME].reshape(n, -1).astype(np.float64) ** 2, axis=1))


def render(renderer: ProceduralRenderer, avatar: Avatar, features, frame: int = 0) -> np.ndarray:
    return renderer.render([RenderJob(avatar.name, frame, np.asarray(features, np.float32))])[0]


def avatars(default_avatar: Avatar, yongen: Avatar | None) -> list[Avatar]:
    """The default avatar, the drawn face and, when its video is here, yongen."""
    return [default_avatar, synthetic_avatar(n_frames=2)] + ([yongen] if yongen is not None else [])


def opened(crop: np.ndarray, idle: np.ndarray) -> np.ndarray:
    """Bool map of pixels much darker than the idle crop."""
    return luma(idle) - luma(crop) > DARKER


@pytest.fixture(scope="module")
def default_avatar(lipsync_settings) -> Avatar:
    from ray_lipsync.avatar.default import load_or_prepare
    from ray_lipsync.avatar.store import AvatarStore

    return load_or_prepare(AvatarStore(lipsync_settings.avatars_dir), "default", lipsync_settings.avatar)


@pytest.fixture(scope="module")
def yongen() -> Avatar | None:
    """The first frames of yongen.mp4 as a video avatar, None when the file is absent."""
    if not (MEDIA / "yongen.mp4").is_file():
        return None
    from ray_lipsync.avatar.prepare import prepare_video

    return prepare_video(MEDIA / "yongen.mp4", "yongen", AvatarConfig(max_frames=6), progress=False)[0]


@pytest.fixture(scope="module")
def renderer(default_avatar) -> ProceduralRenderer:
    renderer = ProceduralRenderer(Settings())
    renderer.load_avatar(default_avatar)
    renderer.load_avatar(synthetic_avatar(n_frames=2))
    return renderer


def test_opening_follows_loudness_and_silence_is_idle(default_avatar, speech_clip, lipsync_settings) -> None:
    avatar = default_avatar
    speech = detect_speech(speech_clip, lipsync_settings)
    x1, y1, x2, y2 = (int(v) for v in avatar.crop_boxes[0])
    idle = avatar.frames[0]
    opening = []
    for frame in render_frames(speech_clip, avatar, lipsync_settings, speech=speech):
        if not frame.speech:
            np.testing.assert_array_equal(frame.image, idle)
        opening.append(opened(frame.image[y1:y2, x1:x2], idle[y1:y2, x1:x2]).sum())
    opening = np.array(opening, np.float64)
    level = loudness(speech_clip)
    r = np.corrcoef(opening, level)[0, 1]
    assert r >= 0.7, f"mouth opening vs loudness: Pearson r = {r:.2f}"
    # the mouth closes between phrases and opens wide on loud syllables
    assert opening[~speech].max() == 0 and np.percentile(opening[speech], 90) > 60


def test_zero_features_give_the_idle_crop(renderer, default_avatar) -> None:
    for avatar in (default_avatar, synthetic_avatar(n_frames=2)):
        np.testing.assert_array_equal(render(renderer, avatar, [0, 0, 0]), avatar.crops[0])


def test_upper_teeth_keep_their_brightness(renderer, default_avatar) -> None:
    avatar = default_avatar
    geo = build_geometry(avatar, 0)
    assert geo is not None and geo.shows_teeth
    lm = avatar.landmarks[0]
    top, bottom = lm[LANDMARK["upper_lip_bottom"], 1], lm[LANDMARK["lower_lip_top"], 1]
    half = (lm[LANDMARK["mouth_right"], 0] - lm[LANDMARK["mouth_left"], 0]) / 2
    cols = slice(int(geo.lips.mid_x - 0.4 * half), int(geo.lips.mid_x + 0.4 * half))
    teeth = slice(int(top + 0.15 * (bottom - top)), int(top + 0.5 * (bottom - top)))
    idle = luma(avatar.crops[0])
    for level in (0.3, 0.6, 1.0):
        crop = luma(render(renderer, avatar, [level, 0.0, 0.0]))
        assert crop[teeth, cols].mean() > 0.93 * idle[teeth, cols].mean()
    # ... while below them the mouth is open and dark
    gap = slice(int(bottom + 2), int(bottom + 0.5 * geo.max_drop))
    assert crop[gap, cols].mean() < 0.4 * idle[gap, cols].mean()


def test_closed_lips_open_onto_drawn_teeth(renderer) -> None:
    avatar = synthetic_avatar(n_frames=2)
    geo = build_geometry(avatar, 0)
    assert geo is not None and not geo.shows_teeth
    crop = luma(render(renderer, avatar, [1.0, 0.0, 0.0]))
    cols = slice(int(geo.lips.mid_x - 0.2 * geo.mouth_width), int(geo.lips.mid_x + 0.2 * geo.mouth_width))
    rows = slice(int(geo.lips.tear - 0.2 * geo.max_drop), int(geo.lips.tear + geo.max_drop))
    column = crop[rows, cols].mean(axis=1)
    top_third = column[: len(column) // 3]
    assert top_third.max() > 150 and column.min() < 60  # teeth under the upper lip, dark below


def test_no_pixel_changes_outside_the_mask_and_no_seam(renderer, default_avatar, yongen) -> None:
    for avatar in avatars(default_avatar, yongen):
        renderer.load_avatar(avatar)
        for frame in range(min(len(avatar), 2)):
            idle, mask = avatar.crops[frame], np.asarray(avatar.masks[frame])
            for shape in SHAPES:
                crop = render(renderer, avatar, shape, frame)
                np.testing.assert_array_equal(crop[mask == 0], idle[mask == 0])
                # the outer half of the mask's feather shows the original pixels too, so the
                # compositor's blend never mixes moved and unmoved edges (no seam, no ghost)
                faint = mask < 128
                np.testing.assert_array_equal(crop[faint], idle[faint])


def test_warp_has_no_tear_outside_the_opening(default_avatar, yongen) -> None:
    """The source coordinates change smoothly everywhere but across the gap the mouth opens."""
    for avatar in avatars(default_avatar, yongen):
        geo = build_geometry(avatar, 0)
        assert geo is not None
        for shape in SHAPES:
            warp = mouth_warp(geo, *shape)
            gap = np.zeros(warp.map_y.shape, bool)
            rows = geo.grid_y[:, 0][:, None]
            gap[:, warp.cols] = (rows >= np.floor(warp.top) - 1) & (rows <= np.ceil(warp.bottom) + 1)
            down, across = ~(gap[1:] | gap[:-1]), ~(gap[:, 1:] | gap[:, :-1])
            ring_gap = np.pad(gap, 1)  # outside the ROI nothing moves: its border is checked too
            ring_down, ring_across = ~(ring_gap[1:] | ring_gap[:-1]), ~(ring_gap[:, 1:] | ring_gap[:, :-1])
            for field, grid in ((warp.map_x, geo.grid_x[None, :]), (warp.map_y, geo.grid_y)):
                offset = np.pad(field - grid, 1)  # neighbours' offsets differ by < 2 px: no tear
                assert np.abs(np.diff(offset, axis=0))[ring_down].max() < 2.0, (avatar.name, shape)
                assert np.abs(np.diff(offset, axis=1))[ring_across].max() < 2.0, (avatar.name, shape)
            # the source order is kept (no fold): compressed or stretched, never flipped
            assert np.diff(warp.map_y, axis=0)[down].min() > 0 and np.diff(warp.map_x, axis=1)[across].min() > 0


def test_opening_grows_smoothly(renderer, default_avatar) -> None:
    """No pops: equal steps in open give similar image changes, and the first is tiny."""
    avatar = default_avatar
    idle = avatar.crops[0].astype(np.float32)
    levels = np.linspace(0.0, 1.0, 26)
    crops = [render(renderer, avatar, [level, 0.2, 0.1]).astype(np.float32) for level in levels]
    steps = np.array([np.abs(b - a).mean() for a, b in pairwise(crops)])
    areas = [opened(c, idle).sum() for c in crops]
    assert steps[0] < 2.0 * np.median(steps)
    assert steps.max() < 3.0 * np.median(steps)
    assert all(b >= a for a, b in pairwise(areas)) and areas[-1] > 300


def test_corners_move_for_spread_and_round(renderer, default_avatar) -> None:
    avatar = default_avatar
    idle = avatar.crops[0]

    def opening_width(features) -> int:
        """Width of the opened mouth: the largest connected region of much darker pixels (skin
        folds beside the corners, which follow the corners in and out, are not the opening)."""
        dark = opened(render(renderer, avatar, features), idle).astype(np.uint8)
        _, _, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
        return int(stats[1 + np.argmax(stats[1:, cv2.CC_STAT_AREA]), cv2.CC_STAT_WIDTH])

    neutral = opening_width([0.6, 0.0, 0.0])
    assert opening_width([0.6, 1.0, 0.0]) > neutral + 4
    assert opening_width([0.6, 0.0, 1.0]) < neutral - 4


def test_video_avatar_opens_steadily(renderer, yongen) -> None:
    if yongen is None:
        pytest.skip("../shared/media/yongen.mp4 absent")
    renderer.load_avatar(yongen)
    areas, bright = [], []
    for frame in range(len(yongen)):
        idle = yongen.crops[frame]
        crop = render(renderer, yongen, [0.8, 0.0, 0.0], frame)
        areas.append(opened(crop, idle).sum())
        geo = build_geometry(yongen, frame)
        assert geo is not None
        x = int(geo.lips.mid_x)
        column = luma(crop)[int(geo.lips.tear - 4) : int(geo.lips.tear + 0.5 * geo.max_drop), x - 3 : x + 3]
        bright.append(column.max())
    areas = np.array(areas, np.float64)
    assert areas.min() > 150 and areas.std() < 0.2 * areas.mean()  # the same opening in every frame
    assert min(bright) > 170  # upper teeth drawn under the closed-lipped avatar's upper lip


def test_teeth_that_come_and_go_in_a_video_change_gradually(default_avatar) -> None:
    """A source frame without visible teeth between two with them: the opening's tear line and
    the drawn teeth follow a smoothed score, not a per-frame switch."""
    lm = default_avatar.landmarks[0]
    crops = np.repeat(np.asarray(default_avatar.crops[:1]), 3, axis=0)
    top, bottom = int(lm[LANDMARK["upper_lip_bottom"], 1]), int(lm[LANDMARK["lower_lip_top"], 1]) + 1
    crops[1, top:bottom] = (150, 70, 75)  # the middle frame's teeth hidden behind lip colour
    video = Avatar(
        name="teeth", frames=np.repeat(default_avatar.frames[:1], 3, axis=0),
        crop_boxes=np.repeat(default_avatar.crop_boxes[:1], 3, axis=0), crops=crops,
        masks=np.repeat(default_avatar.masks[:1], 3, axis=0),
        landmarks=np.repeat(default_avatar.landmarks[:1], 3, axis=0), detected=np.ones(3, bool),
    )  # fmt: skip
    shown = [build_geometry(video, i).teeth_shown for i in range(3)]
    assert shown[0] == shown[2] and 0.6 < shown[0] < 0.9 and 0.3 < shown[1] < 0.7
