"""Avatars: preparation (face analysis, crop boxes, masks) and the Arrow-backed store."""

from ray_lipsync.avatar.model import CROP_SIZE, LANDMARK, LANDMARK_NAMES, Avatar, mirror_index

__all__ = ["Avatar", "CROP_SIZE", "LANDMARK", "LANDMARK_NAMES", "mirror_index"]
