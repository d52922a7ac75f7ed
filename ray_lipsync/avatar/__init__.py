"""Avatars: preparation (face analysis, crop boxes, masks) and the Arrow-backed store.

The model and the store import light; preparation (MediaPipe, PyAV) loads on first use of
`prepare_image`, `prepare_video`, `run_prepare`, `list_avatars` or `ensure_default_avatar`.
"""

from __future__ import annotations

from typing import Any

from ray_lipsync.avatar.model import CROP_SIZE, LANDMARK, LANDMARK_NAMES, Avatar, mirror_index
from ray_lipsync.avatar.store import AvatarStore, validate_name

_LAZY = {
    "PrepareReport": "ray_lipsync.avatar.prepare",
    "prepare_image": "ray_lipsync.avatar.prepare",
    "prepare_video": "ray_lipsync.avatar.prepare",
    "run_prepare": "ray_lipsync.avatar.prepare",
    "list_avatars": "ray_lipsync.avatar.prepare",
    "ensure_default_avatar": "ray_lipsync.avatar.default",
    "load_or_prepare": "ray_lipsync.avatar.default",
    "FaceAnalyzer": "ray_lipsync.avatar.face",
    "FaceObservation": "ray_lipsync.avatar.face",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Avatar",
    "AvatarStore",
    "CROP_SIZE",
    "LANDMARK",
    "LANDMARK_NAMES",
    "mirror_index",
    "validate_name",
    *_LAZY,
]
