"""The procedural backend: the embedded CPU default (no weights), audio-driven mouth motion.

`ProceduralFeaturizer` turns audio into [open, spread, round] per frame; `ProceduralRenderer`
warps the avatar's lower face accordingly. `synthetic_avatar` draws a face for tests and
benchmarks that must run without prepared media.
"""

from ray_lipsync.backends.procedural.features import (
    FEATURE_DIM,
    FEATURE_NAMES,
    ProceduralFeaturizer,
    ProceduralState,
)
from ray_lipsync.backends.procedural.renderer import ProceduralRenderer
from ray_lipsync.backends.procedural.synthetic import synthetic_avatar

__all__ = [
    "FEATURE_DIM",
    "FEATURE_NAMES",
    "ProceduralFeaturizer",
    "ProceduralRenderer",
    "ProceduralState",
    "synthetic_avatar",
]
