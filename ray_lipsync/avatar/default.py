"""The built-in "default" avatar: skimage's astronaut portrait, prepared once and cached.

Its Face Mesh landmarks ship with the package (`default_face.json`), so the default avatar is
prepared without MediaPipe (the optional `prepare` extra, needed only for avatars of your own).
`python -m ray_lipsync.avatar.default` measures them again and rewrites the file.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.avatar.store import AvatarStore, validate_name
from ray_lipsync.config import AvatarConfig
from ray_lipsync.errors import AvatarError

log = logging.getLogger(__name__)

DEFAULT_NAME = "default"
DEFAULT_SIZE = 512
DEFAULT_FACE = "default_face.json"


def default_image() -> np.ndarray:
    """skimage.data.astronaut() as a 512x512 RGB uint8 image."""
    from skimage import data

    image = np.ascontiguousarray(data.astronaut()[..., :3], dtype=np.uint8)
    if image.shape[:2] != (DEFAULT_SIZE, DEFAULT_SIZE):
        image = cv2.resize(image, (DEFAULT_SIZE, DEFAULT_SIZE), interpolation=cv2.INTER_AREA)
    return image


def default_landmarks() -> np.ndarray:
    """The (478, 2) Face Mesh landmarks of `default_image()`, in its pixels (shipped data)."""
    text = resources.files(__package__).joinpath(DEFAULT_FACE).read_text()
    return np.asarray(json.loads(text)["landmarks"], dtype=np.float32)


def measure_default_landmarks() -> np.ndarray:
    """Run Face Mesh on `default_image()` (needs MediaPipe) and return its landmarks."""
    from ray_lipsync.avatar.face import FaceAnalyzer

    with FaceAnalyzer(static_image_mode=True) as analyzer:
        observation = analyzer.analyze(default_image())
    if observation is None:
        raise AvatarError("Face Mesh found no face in the default image")
    return observation.landmarks


def write_default_landmarks(path: Path) -> None:
    """Measure the default image's landmarks and write them as `DEFAULT_FACE` JSON."""
    import mediapipe

    payload = {
        "image": f"skimage.data.astronaut, {DEFAULT_SIZE}x{DEFAULT_SIZE} RGB",
        "detector": f"MediaPipe {mediapipe.__version__} Face Mesh (static image, refined landmarks)",
        "landmarks": [[round(float(x), 3), round(float(y), 3)] for x, y in measure_default_landmarks()],
    }
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n")


def ensure_default_avatar(store: AvatarStore, config: AvatarConfig) -> Avatar:
    """Load the "default" avatar: from the store, else from its shared location, else
    prepared and saved."""
    if store.exists(DEFAULT_NAME) or store.fetch(DEFAULT_NAME):
        try:
            return store.load(DEFAULT_NAME)
        except AvatarError as exc:  # an older store format: the default can be made again
            log.warning("re-preparing the default avatar: %s", exc)
    from ray_lipsync.avatar.prepare import prepare_image

    log.info("preparing the default avatar in %s", store.root)
    avatar, report = prepare_image(
        default_image(), DEFAULT_NAME, config, source="skimage.data.astronaut", landmarks=default_landmarks()
    )
    store.save(avatar, report)
    return store.load(DEFAULT_NAME)


def load_or_prepare(store: AvatarStore, name: str, config: AvatarConfig) -> Avatar:
    """Load avatar `name`; "default" is prepared on first use, other names must exist
    (AvatarNotFound otherwise)."""
    if validate_name(name) == DEFAULT_NAME:
        return ensure_default_avatar(store, config)
    return store.load(name)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    target = Path(__file__).with_name(DEFAULT_FACE)
    write_default_landmarks(target)
    log.info("wrote %s", target)
