"""Per-avatar MuseTalk latents: VAE-encode every source crop once, at preparation time.

For each 256x256 crop (already cut by MuseTalk v1.5's crop rules in `Avatar.crops`):
x = crop / 255 normalised to [-1, 1]; a masked copy has its lower half set to -1 (black
before normalisation, as MuseTalk does); both are VAE-encoded and the latents concatenated
-> [8, 32, 32] (masked first, then reference), scaled by 0.18215.

The latent is *sampled* from the VAE posterior (mean + std * noise), as MuseTalk does, with
the noise drawn from a CPU generator seeded per frame (seed = source frame index), so
preparation is reproducible and does not depend on the batch size. Every source frame gets
its latent, a clip's (`avatar prepare --clip`) included; the idle cycle and the state clips
reuse source frames by mirror indexing: nothing is duplicated.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ray_lipsync.avatar.model import CROP_SIZE
from ray_lipsync.backends.musetalk.weights import VAE_SCALE, models_for
from ray_lipsync.config import Settings
from ray_lipsync.errors import AvatarError

log = logging.getLogger(__name__)

LATENTS_KEY = "musetalk_latents"
LATENT_SHAPE = (8, CROP_SIZE // 8, CROP_SIZE // 8)


def crop_inputs(crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, reference) VAE inputs [B, 3, 256, 256] in [-1, 1] from RGB uint8 crops [B, 256, 256, 3]."""
    if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or crops.dtype != np.uint8:
        raise AvatarError(
            f"crops must be RGB uint8 (N, {CROP_SIZE}, {CROP_SIZE}, 3), got {crops.dtype} {crops.shape}; "
            "re-prepare the avatar"
        )
    x = torch.from_numpy(np.array(crops, copy=True)).permute(0, 3, 1, 2).float() / 255.0
    masked = x.clone()
    masked[:, :, CROP_SIZE // 2 :, :] = 0.0
    return masked * 2.0 - 1.0, x * 2.0 - 1.0


def encode_crops(vae: Any, crops: np.ndarray, first_index: int = 0) -> np.ndarray:
    """UNet input latents [B, 8, 32, 32] float32 for crops [B, 256, 256, 3] (see module doc)."""
    masked, reference = crop_inputs(crops)
    param = next(vae.parameters())
    n = len(crops)
    pairs = torch.stack([masked, reference], dim=1).reshape(2 * n, 3, CROP_SIZE, CROP_SIZE)
    with torch.inference_mode():
        dist = vae.encode(pairs.to(device=param.device, dtype=param.dtype)).latent_dist
        noise = torch.stack(
            [
                torch.randn((2, *dist.mean.shape[1:]), generator=torch.Generator().manual_seed(first_index + row))
                for row in range(n)
            ]
        ).reshape(dist.mean.shape)
        latents = (dist.mean + dist.std * noise.to(device=param.device, dtype=param.dtype)) * VAE_SCALE
    return latents.reshape(n, *LATENT_SHAPE).float().cpu().numpy()


def compute_latents(vae: Any, crops: np.ndarray, batch: int = 8, progress: bool = True) -> np.ndarray:
    """Latents [N, 8, 32, 32] of all crops, with a progress bar."""
    parts = []
    with tqdm(total=len(crops), desc="musetalk latents", unit="frame", disable=not progress) as bar:
        for start in range(0, len(crops), batch):
            parts.append(encode_crops(vae, crops[start : start + batch], first_index=start))
            bar.update(len(parts[-1]))
    return np.concatenate(parts) if parts else np.zeros((0, *LATENT_SHAPE), np.float32)


def add_latents(store: Any, name: str, settings: Settings, device: str | torch.device | None = None) -> np.ndarray:
    """Compute the MuseTalk latents of stored avatar `name` and save them as its extras.

    Called by `ray-lipsync avatar prepare --backend musetalk`; `store` is an AvatarStore
    (`load(name) -> Avatar`, `add_extras(name, {key: array})`). The latents are stored as
    float16 (N, 8, 32, 32), half the size, the precision the GPU renderer runs in; returned.
    """
    avatar = store.load(name)
    models = models_for(settings, ("vae",), device)
    log.info("encoding %d crops of avatar %r for MuseTalk", len(avatar), name)
    latents = compute_latents(models.vae, np.asarray(avatar.crops)).astype(np.float16)
    store.add_extras(name, {LATENTS_KEY: latents})
    return latents
