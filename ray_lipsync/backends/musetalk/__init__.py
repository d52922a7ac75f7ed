"""MuseTalk v1.5 neural backend: Whisper-tiny features -> one-step UNet + VAE decode.

Weights are user-supplied under `settings.models_dir` (see models/README.md); nothing is
downloaded. Modules: weights (check + load once per process), features (streaming Whisper
features), avatar (per-frame VAE latents at preparation), renderer (batched UNet + decode),
fidelity (streaming vs offline feature distance).
"""

from ray_lipsync.backends.musetalk.avatar import LATENTS_KEY, add_latents, compute_latents
from ray_lipsync.backends.musetalk.features import MuseTalkFeaturizer, offline_features
from ray_lipsync.backends.musetalk.renderer import MuseTalkRenderer
from ray_lipsync.backends.musetalk.weights import MuseTalkModels, check_weights, load_models, shared_models

__all__ = [
    "LATENTS_KEY",
    "MuseTalkFeaturizer",
    "MuseTalkModels",
    "MuseTalkRenderer",
    "add_latents",
    "check_weights",
    "compute_latents",
    "load_models",
    "offline_features",
    "shared_models",
]
