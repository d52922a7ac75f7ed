"""The built-in "default" avatar: skimage's astronaut portrait, prepared once and cached."""

from __future__ import annotations

import logging

import cv2
import numpy as np

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.avatar.store import AvatarStore, validate_name
from ray_lipsync.config import AvatarConfig
from ray_lipsync.errors import AvatarError

log = logging.getLogger(__name__)

DEFAULT_NAME = "default"
DEFAULT_SIZE = 512


def default_image() -> np.ndarray:
    """skimage.data.astronaut() as a 512x512 RGB uint8 image."""
    from skimage import data

    image = np.ascontiguousarray(data.astronaut()[..., :3], dtype=np.uint8)
    if image.shape[:2] != (DEFAULT_SIZE, DEFAULT_SIZE):
        image = cv2.resize(image, (DEFAULT_SIZE, DEFAULT_SIZE), interpolation=cv2.INTER_AREA)
    return image


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
    avatar, report = prepare_image(default_image(), DEFAULT_NAME, config, source="skimage.data.astronaut")
    store.save(avatar, report)
    return store.load(DEFAULT_NAME)


def load_or_prepare(store: AvatarStore, name: str, config: AvatarConfig) -> Avatar:
    """Load avatar `name`; "default" is prepared on first use, other names must exist
    (AvatarNotFound otherwise)."""
    if validate_name(name) == DEFAULT_NAME:
        return ensure_default_avatar(store, config)
    return store.load(name)
