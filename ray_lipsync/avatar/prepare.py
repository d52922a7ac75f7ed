"""Avatar preparation: frames -> face crop boxes, 256x256 crops, landmarks and blend masks.

Crop boxes follow MuseTalk v1.5: from the face landmarks x1 = min x, x2 = max x, y2 = max y
(chin); the "half face" point is iBUG point 29 (`face.half_face_point`, interpolated two thirds
down the nose line), y1 = half_y - (y2 - half_y); then y2 += extra_margin; clipped to the
frame. The blend mask's top edge is the box centre (MuseTalk's "jaw" mode cuts its face-parsing
mask at half the height of a box centred on the face box). The crop (resized to 256x256) is what backends
animate; the blend mask says which crop pixels the compositor takes from the backend.

Frames without a detected face get landmarks interpolated linearly from the nearest detected
frames (held at the ends) and are reported; a source with no face at all is an AvatarError.

Clips (`--clip listening=listen.mp4`) are prepared exactly like the main video and appended to
its per-frame arrays (`join_clips`), so every stage renders a clip's frames as it renders the
main video's; a clip must have the main video's frame size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from ray_lipsync.avatar.face import (
    FACE_OVAL,
    NUM_LANDMARKS,
    FaceAnalyzer,
    FaceObservation,
    check_rgb,
    half_face_point,
    named_landmarks,
)
from ray_lipsync.avatar.model import CROP_SIZE, LANDMARK, Avatar, validate_clip_name
from ray_lipsync.avatar.store import AvatarStore, validate_name
from ray_lipsync.config import AvatarConfig, Settings
from ray_lipsync.errors import AvatarError

log = logging.getLogger(__name__)

BOX_SMOOTHING_SIGMA = 1.5  # frames; Gaussian smoothing of crop boxes over time (video only)
_FACE_OVAL = np.array(FACE_OVAL, dtype=np.int64)


@dataclass
class PrepareReport:
    """What preparation found: frame count, detections, interpolated frame indices, time;
    `clips`: the same of each clip, by name (frame indices within the clip)."""

    frames: int
    detected: int
    interpolated: list[int] = field(default_factory=list)
    seconds: float = 0.0
    source: str = ""
    clips: dict[str, "PrepareReport"] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrepareReport":
        return cls(
            frames=int(data["frames"]),
            detected=int(data["detected"]),
            interpolated=[int(i) for i in data.get("interpolated", [])],
            seconds=float(data.get("seconds", 0.0)),
            source=str(data.get("source", "")),
            clips={str(k): cls.from_dict(v) for k, v in data.get("clips", {}).items()},
        )


# --- geometry -------------------------------------------------------------------------------


def crop_box(landmarks: np.ndarray, extra_margin: int) -> np.ndarray:
    """MuseTalk v1.5 crop box (x1, y1, x2, y2) as float, unclipped, from (478, 2) landmarks."""
    x1, _ = landmarks.min(axis=0)
    x2, y2 = landmarks.max(axis=0)
    half_y = half_face_point(landmarks)[1]
    y1 = half_y - (y2 - half_y)
    return np.array([x1, y1, x2, y2 + extra_margin], dtype=np.float64)


def clip_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """Round a float box to int32 pixels inside a width x height frame (at least 2x2)."""
    x1 = int(np.clip(round(box[0]), 0, width - 2))
    y1 = int(np.clip(round(box[1]), 0, height - 2))
    x2 = int(np.clip(round(box[2]), x1 + 2, width))
    y2 = int(np.clip(round(box[3]), y1 + 2, height))
    return np.array([x1, y1, x2, y2], dtype=np.int32)


def to_crop(points: np.ndarray, box: np.ndarray, crop_size: int = CROP_SIZE) -> np.ndarray:
    """Frame-pixel points -> crop coordinates of `box` resized to crop_size x crop_size."""
    x1, y1, x2, y2 = (float(v) for v in box)
    scale = np.array([crop_size / (x2 - x1), crop_size / (y2 - y1)], dtype=np.float32)
    return ((points - np.array([x1, y1], dtype=np.float32)) * scale).astype(np.float32)


def cut_crop(frame: np.ndarray, box: np.ndarray, crop_size: int = CROP_SIZE) -> np.ndarray:
    """The box's pixels of `frame`, resized to crop_size x crop_size (RGB uint8)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return cv2.resize(frame[y1:y2, x1:x2], (crop_size, crop_size), interpolation=cv2.INTER_LANCZOS4)


def smooth_tracks(values: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing of (N, D) tracks along N (edges held)."""
    n = len(values)
    radius = int(np.ceil(3 * sigma))
    if n < 2 or radius == 0:
        return values.copy()
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.concatenate([np.repeat(values[:1], radius, 0), values, np.repeat(values[-1:], radius, 0)])
    return np.stack([np.convolve(padded[:, d], taps, mode="valid") for d in range(values.shape[1])], 1)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def lower_face_mask(crop_points: np.ndarray, crop_size: int = CROP_SIZE, feather: float = 0.08) -> np.ndarray:
    """Feathered lower-face blend mask (crop_size, crop_size) uint8 from (478, 2) crop landmarks.

    The region is the face oval below the crop's centre row (MuseTalk's "jaw" mode: its mask
    is cut at half the height of a box centred on the face box), i.e. bounded by the jaw line
    and the chin. Its edge is feathered over
    `feather * crop_size` pixels centred on the edge (smoothstep), and the mask is faded to
    0 over the same width at the crop border, so composites show no seam.
    """
    width = max(feather * crop_size, 1.0)
    region = np.zeros((crop_size, crop_size), dtype=np.uint8)
    cv2.fillPoly(region, [np.round(crop_points[_FACE_OVAL]).astype(np.int32)], 1)
    region[: crop_size // 2] = 0
    inside = cv2.distanceTransform(region, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - region, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    signed = np.where(region > 0, inside - 0.5, 0.5 - outside)
    alpha = _smoothstep(signed / width + 0.5)
    grid = np.arange(crop_size, dtype=np.float32)
    edge = np.minimum(grid, crop_size - 1 - grid)
    border = _smoothstep(np.minimum(edge[:, None], edge[None, :]) / width)
    return np.round(alpha * border * 255.0).astype(np.uint8)


def fill_missing(points: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Interpolate (N, K, 2) landmark tracks linearly where `found` is False (held at ends)."""
    known = np.flatnonzero(found)
    if known.size == 0:
        raise AvatarError("no face found in any frame")
    out = points.reshape(len(points), -1).astype(np.float32, copy=True)
    missing = np.flatnonzero(~np.asarray(found))
    if missing.size:
        pos = np.searchsorted(known, missing)
        prev = known[np.clip(pos - 1, 0, known.size - 1)]
        nxt = known[np.clip(pos, 0, known.size - 1)]
        weight = np.where(nxt == prev, 0.0, (missing - prev) / np.maximum(nxt - prev, 1))[:, None]
        out[missing] = out[prev] * (1.0 - weight) + out[nxt] * weight
    return out.reshape(points.shape)


# --- preparation ----------------------------------------------------------------------------


def _fit(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the longest side is at most max_side (RGB uint8)."""
    height, width = rgb.shape[:2]
    if max(height, width) <= max_side:
        return rgb
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def build_avatar(
    name: str,
    frames: np.ndarray,
    observations: Sequence[FaceObservation | None],
    config: AvatarConfig,
    *,
    fps: float = 25.0,
    smooth: bool = False,
) -> tuple[Avatar, list[int]]:
    """Assemble an Avatar from frames and their face observations; returns it and the
    indices of frames whose face was interpolated."""
    n, height, width = frames.shape[:3]
    size = config.crop_size
    found = np.array([o is not None for o in observations], dtype=bool)
    if not found.any():
        raise AvatarError(
            f"avatar {name!r}: no face found in any of {n} frame(s); use a source where one "
            "face is clearly visible, roughly frontal and at least ~80 px tall"
        )
    points = np.zeros((n, NUM_LANDMARKS, 2), dtype=np.float32)
    for i, obs in enumerate(observations):
        if obs is not None:
            points[i] = obs.landmarks
    points = fill_missing(points, found)
    raw = np.stack([crop_box(p, config.extra_margin) for p in points])
    if smooth:
        raw = smooth_tracks(raw, BOX_SMOOTHING_SIGMA)
    boxes = np.stack([clip_box(b, width, height) for b in raw])
    crops = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.uint8)
    named = np.empty((n, len(LANDMARK), 2), dtype=np.float32)
    for i in range(n):
        crop_points = to_crop(points[i], boxes[i], size)
        crops[i] = cut_crop(frames[i], boxes[i], size)
        masks[i] = lower_face_mask(crop_points, size, config.mask_feather)
        named[i] = named_landmarks(crop_points)
    avatar = Avatar(
        name=name, frames=frames, crop_boxes=boxes, crops=crops, masks=masks,
        landmarks=named, detected=found, fps=float(fps),
    )  # fmt: skip
    return avatar, [int(i) for i in np.flatnonzero(~found)]


def prepare_image(
    rgb: np.ndarray,
    name: str,
    config: AvatarConfig,
    *,
    source: str = "image",
    landmarks: np.ndarray | None = None,
) -> tuple[Avatar, PrepareReport]:
    """Prepare a one-frame avatar from an RGB uint8 image (H, W, 3).

    `landmarks` are its (478, 2) Face Mesh landmarks in `rgb` pixels when already known (the
    default avatar ships them); otherwise MediaPipe finds the face.
    """
    start = time.perf_counter()
    validate_name(name)
    rgb = check_rgb(rgb)
    frame = np.ascontiguousarray(_fit(rgb, config.max_side))
    if landmarks is not None:
        scale = np.array([frame.shape[1] / rgb.shape[1], frame.shape[0] / rgb.shape[0]], dtype=np.float32)
        observation: FaceObservation | None = FaceObservation.from_landmarks(np.asarray(landmarks) * scale)
    else:
        with FaceAnalyzer(static_image_mode=True) as analyzer:
            observation = analyzer.analyze(frame)
    if observation is None:
        raise AvatarError(
            f"avatar {name!r}: no face found in the {frame.shape[1]}x{frame.shape[0]} image; use "
            "a portrait where one face is clearly visible, roughly frontal and at least ~80 px tall"
        )
    avatar, interpolated = build_avatar(name, frame[None], [observation], config)
    report = PrepareReport(1, 1, interpolated, time.perf_counter() - start, source)
    log.info("prepared avatar %r from %s in %.2f s", name, source, report.seconds)
    return avatar, report


def _decode(path: Path, max_frames: int, max_side: int, progress: bool) -> tuple[np.ndarray, float]:
    """Decode up to max_frames RGB frames (downscaled to max_side) into one (N, H, W, 3) array,
    and the frame rate."""
    import av
    from tqdm import tqdm

    frames: np.ndarray | None = None
    count = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise AvatarError(f"{path} has no video stream; pass a video with the avatar's face")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 25.0
            total = min(stream.frames, max_frames) if stream.frames else max_frames
            with tqdm(total=total, desc=f"decode {path.name}", unit="frame", disable=not progress) as bar:
                for frame in container.decode(stream):
                    rgb = _fit(frame.to_ndarray(format="rgb24"), max_side)
                    if frames is None:  # filled in place: no second copy of the whole video
                        frames = np.empty((max(total, 1), *rgb.shape), dtype=np.uint8)
                    elif rgb.shape != frames.shape[1:]:
                        raise AvatarError(f"video {path} changes frame size mid-stream; re-encode it at one size")
                    if count == len(frames):
                        frames = np.concatenate([frames, np.empty_like(frames[: min(count, max_frames - count)])])
                    frames[count] = rgb
                    count += 1
                    bar.update(1)
                    if count >= max_frames:
                        break
    except (av.FFmpegError, OSError) as exc:
        raise AvatarError(f"cannot decode video {path}: {exc}; pass a readable video file") from exc
    if frames is None or count == 0:
        raise AvatarError(f"video {path} has no decodable frames")
    return frames[:count], fps


def prepare_video(
    path: str | Path, name: str, config: AvatarConfig, progress: bool = True
) -> tuple[Avatar, PrepareReport]:
    """Prepare an avatar from the first config.max_frames frames of a video (PyAV decode)."""
    from tqdm import tqdm

    start = time.perf_counter()
    validate_name(name)
    path = Path(path)
    if not path.is_file():
        raise AvatarError(f"video {path} does not exist; pass the path of an existing file")
    frames, fps = _decode(path, config.max_frames, config.max_side, progress)
    observations: list[FaceObservation | None] = []
    with FaceAnalyzer(static_image_mode=False) as analyzer:
        for frame in tqdm(frames, desc=f"faces {name}", unit="frame", disable=not progress):
            observations.append(analyzer.analyze(frame))
    avatar, interpolated = build_avatar(name, frames, observations, config, fps=fps, smooth=True)
    report = PrepareReport(len(frames), len(frames) - len(interpolated), interpolated,
                           time.perf_counter() - start, str(path))  # fmt: skip
    if interpolated:
        log.warning("avatar %r: no face in %d of %d frames (interpolated)", name, len(interpolated), len(frames))
    log.info("prepared avatar %r: %d frames from %s in %.1f s", name, len(frames), path, report.seconds)
    return avatar, report


def join_clips(main: Avatar, clips: Mapping[str, Avatar]) -> Avatar:
    """`main` with each clip's per-frame arrays appended, in order (`Avatar.clips` records
    where); AvatarError when a clip's frame size differs from the main video's."""
    parts = [main]
    ranges: dict[str, range] = {}
    start = len(main)
    for name, clip in clips.items():
        if clip.size != main.size:
            raise AvatarError(
                f"clip {name!r} is {clip.size[0]}x{clip.size[1]} pixels, the main video "
                f"{main.size[0]}x{main.size[1]}: a clip must have the main video's frame size "
                "(re-encode it at that size)"
            )
        if set(clip.extras) != set(main.extras):
            raise AvatarError(f"clip {name!r} has backend data {sorted(clip.extras)}, the main video "
                              f"{sorted(main.extras)}; prepare them with the same backend")
        ranges[name] = range(start, start + len(clip))
        start += len(clip)
        parts.append(clip)
    if not clips:
        return main

    def stacked(attr: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(p, attr)) for p in parts])

    return Avatar(
        name=main.name, frames=stacked("frames"), crop_boxes=stacked("crop_boxes"),
        crops=stacked("crops"), masks=stacked("masks"), landmarks=stacked("landmarks"),
        detected=stacked("detected"), fps=main.fps,
        extras={k: np.concatenate([p.extras[k] for p in parts]) for k in main.extras},
        clips=ranges,
    )  # fmt: skip


def parse_clip(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` (the CLI's --clip) -> (name, path); ValueError when malformed."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise ValueError(f"--clip takes NAME=VIDEO (e.g. listening=listen.mp4), got {spec!r}")
    return validate_clip_name(name), Path(path)


# --- CLI hooks ------------------------------------------------------------------------------


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8; AvatarError when it is missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise AvatarError(f"image {path} does not exist; pass the path of an existing file")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise AvatarError(f"cannot read image {path}; use a PNG or JPEG file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def run_prepare(
    settings: Settings,
    *,
    image: Path | None,
    video: Path | None,
    name: str,
    backend: str = "procedural",
    progress: bool = True,
    clips: Mapping[str, Path] | None = None,
) -> PrepareReport:
    """`ray-lipsync avatar prepare`: prepare from an image or a video (and its `clips`, name
    -> video, each prepared like a video and appended), save it in the store
    (settings.avatars_dir) and add the backend's per-frame data (musetalk: VAE latents) of
    every frame, the clips' included."""
    from ray_lipsync.backends import BACKENDS

    validate_name(name)
    if (image is None) == (video is None):
        raise AvatarError("pass exactly one of --image PATH or --video PATH")
    if backend not in BACKENDS:
        raise AvatarError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    clips = dict(clips or {})
    for clip in clips:
        try:
            validate_clip_name(clip)
        except ValueError as exc:
            raise AvatarError(str(exc)) from None
    if image is not None:
        avatar, report = prepare_image(read_image(image), name, settings.avatar, source=str(image))
    else:
        assert video is not None
        avatar, report = prepare_video(video, name, settings.avatar, progress=progress)
    prepared = {}
    for clip, path in clips.items():
        prepared[clip], report.clips[clip] = prepare_video(path, name, settings.avatar, progress=progress)
    avatar = join_clips(avatar, prepared)
    store = AvatarStore(settings.avatars_dir, settings.avatar_uri)
    store.save(avatar, report)
    if backend == "musetalk":
        from ray_lipsync.backends.musetalk.avatar import add_latents

        add_latents(store, name, settings)
    if store.shared is not None:  # every node fetches it from there on first use
        store.upload(name)
    return report


def list_avatars(settings: Settings) -> list[dict[str, Any]]:
    """`ray-lipsync avatar list`: one summary dict per prepared avatar, by name."""
    store = AvatarStore(settings.avatars_dir, settings.avatar_uri)
    rows = []
    for name in store.names():
        manifest = store.manifest(name)
        rows.append({
            "name": name,
            "frames": manifest["frames"],
            "width": manifest["width"],
            "height": manifest["height"],
            "fps": manifest["fps"],
            "source": manifest.get("source", ""),
            "created": manifest.get("created", ""),
            "extras": sorted(manifest.get("extras", {})),
            "clips": {clip: stop - start for clip, (start, stop) in manifest.get("clips", {}).items()},
        })  # fmt: skip
    return rows
