"""Avatar preparation: face analysis, MuseTalk crop boxes, landmarks, blend masks, videos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data

from ray_lipsync.avatar import LANDMARK, Avatar
from ray_lipsync.avatar.face import FaceAnalyzer
from ray_lipsync.avatar.motion import write_video
from ray_lipsync.avatar.prepare import PrepareReport, fill_missing, prepare_image, prepare_video
from ray_lipsync.config import AvatarConfig
from ray_lipsync.errors import AvatarError
from helpers import MEDIA

CONFIG = AvatarConfig()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="module")
def prepared(astronaut: np.ndarray) -> tuple[Avatar, PrepareReport]:
    return prepare_image(astronaut, "astronaut", CONFIG)


def test_analyzer_finds_astronaut_face(astronaut: np.ndarray) -> None:
    with FaceAnalyzer() as analyzer:
        face = analyzer.analyze(astronaut)
        assert analyzer.analyze(np.full((128, 128, 3), 90, np.uint8)) is None
    assert face is not None
    assert face.landmarks.shape == (478, 2)
    x1, y1, x2, y2 = face.box
    # the astronaut's face sits in the upper middle of the 512x512 portrait
    assert 150 < x1 < x2 < 300 and 40 < y1 < y2 < 220
    assert np.all((face.named >= face.box[:2] - 1) & (face.named <= face.box[2:] + 1))


def test_image_avatar_shapes_and_report(prepared: tuple[Avatar, PrepareReport]) -> None:
    avatar, report = prepared
    assert len(avatar) == 1 and avatar.size == (512, 512)
    assert avatar.crops.shape == (1, 256, 256, 3) and avatar.crops.dtype == np.uint8
    assert avatar.masks.shape == (1, 256, 256) and avatar.masks.dtype == np.uint8
    assert avatar.landmarks.shape == (1, len(LANDMARK), 2)
    assert avatar.detected.tolist() == [True]
    assert report.frames == 1 and report.detected == 1 and report.interpolated == []
    assert report.seconds > 0


def test_crop_box_follows_musetalk_rule(prepared: tuple[Avatar, PrepareReport], astronaut: np.ndarray) -> None:
    avatar, _ = prepared
    x1, y1, x2, y2 = avatar.crop_boxes[0].tolist()
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    assert 60 < x2 - x1 < 160 and 60 < y2 - y1 < 160  # a face, not the whole portrait
    with FaceAnalyzer() as analyzer:
        face = analyzer.analyze(astronaut)
    assert face is not None
    chin_y = face.landmarks[:, 1].max()
    assert y2 == pytest.approx(chin_y + CONFIG.extra_margin, abs=1.0)
    # half-face point = iBUG 29: two thirds down the nose line from Face Mesh 168 to 1
    half_y = face.landmarks[168, 1] + 2 / 3 * (face.landmarks[1, 1] - face.landmarks[168, 1])
    assert y1 == pytest.approx(half_y - (chin_y - half_y), abs=1.0)
    assert abs(half_y - face.landmarks[5, 1]) < 3  # close to Face Mesh 5, as iBUG 29 is
    assert x1 == pytest.approx(face.landmarks[:, 0].min(), abs=1.0)
    # the crop is the box's pixels: its mean colour matches the frame region's
    region = astronaut[y1:y2, x1:x2].reshape(-1, 3).mean(0)
    assert np.allclose(avatar.crops[0].reshape(-1, 3).mean(0), region, atol=4)


def test_landmarks_are_ordered_like_a_face(prepared: tuple[Avatar, PrepareReport]) -> None:
    lm = prepared[0].landmarks[0]
    x, y = lm[:, 0], lm[:, 1]
    L = LANDMARK
    assert np.all((lm >= 0) & (lm <= 256))
    assert x[L["mouth_left"]] < x[L["mouth_right"]] and x[L["jaw_left"]] < x[L["jaw_right"]]
    assert y[L["nose_tip"]] < y[L["upper_lip_top"]] <= y[L["upper_lip_bottom"]]
    assert y[L["upper_lip_bottom"]] <= y[L["lower_lip_top"]] < y[L["lower_lip_bottom"]] < y[L["chin"]]
    assert y[L["chin"]] == y.max()
    assert x[L["mouth_left"]] < x[L["nose_tip"]] < x[L["mouth_right"]]


def test_mask_covers_mouth_and_fades_to_border(prepared: tuple[Avatar, PrepareReport]) -> None:
    avatar, _ = prepared
    mask = avatar.masks[0].astype(np.int32)
    lm = avatar.landmarks[0]
    for name in ("upper_lip_bottom", "lower_lip_top", "lower_lip_bottom"):
        cx, cy = np.round(lm[LANDMARK[name]]).astype(int)
        assert mask[cy - 2 : cy + 3, cx - 2 : cx + 3].min() == 255, name
    for name in ("mouth_left", "mouth_right"):
        cx, cy = np.round(lm[LANDMARK[name]]).astype(int)
        assert mask[cy, cx] >= 200, name
    assert mask[0].max() == mask[-1].max() == mask[:, 0].max() == mask[:, -1].max() == 0
    # top edge at the box centre (MuseTalk "jaw" mode), feathered over mask_feather x 256 px
    half = int(CONFIG.mask_feather * 256 / 2)
    assert mask[: 128 - half - 1].max() == 0  # eyes and upper nose stay original
    cx = int(round(lm[LANDMARK["nose_tip"], 0]))
    assert 100 <= mask[128, cx] <= 155 and mask[128 + half + 2, cx] == 255
    # feathered: no step between neighbouring pixels larger than ~1/6 of full scale
    assert np.abs(np.diff(mask, axis=0)).max() <= 40
    assert np.abs(np.diff(mask, axis=1)).max() <= 40
    assert 0 < np.count_nonzero((mask > 0) & (mask < 255))


@pytest.mark.parametrize(
    "image",
    [np.full((256, 256, 3), 128, np.uint8), np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)],
    ids=["flat", "noise"],
)
def test_image_without_face_raises(image: np.ndarray) -> None:
    with pytest.raises(AvatarError, match="no face"):
        prepare_image(image, "noface", CONFIG)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((64, 64), np.uint8), "RGB"),
        (np.zeros((64, 64, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 3), np.uint8), "at least"),
        ("not an image", "numpy"),
    ],
)
def test_bad_image_input_raises(image: object, match: str) -> None:
    with pytest.raises(AvatarError, match=match):
        prepare_image(image, "bad", CONFIG)  # type: ignore[arg-type]


def test_bad_name_rejected_before_work(astronaut: np.ndarray) -> None:
    with pytest.raises(AvatarError, match="invalid avatar name"):
        prepare_image(astronaut, "../etc", CONFIG)


def test_large_image_is_downscaled(astronaut: np.ndarray) -> None:
    big = np.kron(astronaut, np.ones((3, 3, 1), np.uint8))  # 1536x1536
    avatar, _ = prepare_image(big, "big", AvatarConfig(max_side=768))
    assert avatar.size == (768, 768)
    assert avatar.detected.all()


def test_fill_missing_interpolates_and_holds() -> None:
    points = np.zeros((6, 1, 2), np.float32)
    points[1] = 10.0
    points[4] = 40.0
    found = np.array([False, True, False, False, True, False])
    out = fill_missing(points, found)[:, 0, 0]
    assert out.tolist() == [10.0, 10.0, 20.0, 30.0, 40.0, 40.0]
    with pytest.raises(AvatarError):
        fill_missing(points, np.zeros(6, bool))


def test_video_with_blanked_face_interpolates(tmp_path: Path, astronaut: np.ndarray) -> None:
    frames = []
    for i in range(10):
        frame = astronaut[:384, 64:448].copy()  # 384x384, face included
        if 4 <= i <= 6:
            frame[20:200, 90:240] = 128  # face painted over
        frames.append(frame)
    path = tmp_path / "blank.mp4"
    write_video(path, frames)
    avatar, report = prepare_video(path, "blanked", CONFIG, progress=False)
    assert report.frames == len(avatar) == 10
    assert report.interpolated == [4, 5, 6] and report.detected == 7
    assert avatar.detected.tolist() == [True] * 4 + [False] * 3 + [True] * 3
    assert avatar.fps == pytest.approx(25.0)
    boxes = avatar.crop_boxes.astype(float)
    assert np.abs(boxes[4:7] - boxes[3]).max() <= 3  # the face did not move: boxes hold still
    assert (avatar.masks[:, 160:200, 100:156] == 255).all()  # around the mouth


def test_video_max_frames_and_errors(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = tmp_path / "short.mp4"
    write_video(path, [astronaut[:384, 64:448]] * 6)
    avatar, report = prepare_video(path, "capped", AvatarConfig(max_frames=3), progress=False)
    assert len(avatar) == 3 and report.interpolated == []
    with pytest.raises(AvatarError, match="does not exist"):
        prepare_video(tmp_path / "missing.mp4", "x", CONFIG, progress=False)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 50)
    with pytest.raises(AvatarError, match="cannot decode"):
        prepare_video(junk, "x", CONFIG, progress=False)
    noface = tmp_path / "noface.mp4"
    write_video(noface, [np.full((128, 128, 3), 60, np.uint8)] * 3)
    with pytest.raises(AvatarError, match="no face"):
        prepare_video(noface, "x", CONFIG, progress=False)


@pytest.mark.skipif(not (MEDIA / "yongen.mp4").is_file(), reason="../shared/media/yongen.mp4 absent")
def test_yongen_video_prepares() -> None:
    avatar, report = prepare_video(MEDIA / "yongen.mp4", "yongen", AvatarConfig(max_frames=30), progress=False)
    assert len(avatar) == report.frames == 30
    assert report.detected == 30 and avatar.detected.all()
    assert avatar.size == (704, 1216) and avatar.fps == pytest.approx(25.0)
    boxes = avatar.crop_boxes.astype(float)
    assert np.abs(np.diff(boxes, axis=0)).max() <= 4  # smoothed: no jumps between frames
    lm = avatar.landmarks
    assert (lm[:, LANDMARK["nose_tip"], 1] < lm[:, LANDMARK["upper_lip_top"], 1]).all()
    assert (avatar.masks[:, 0, :] == 0).all()
