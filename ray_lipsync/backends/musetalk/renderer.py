"""MuseTalk v1.5 renderer: one UNet step + VAE decode per batch of frames from any sessions.

latents [B, 8, 32, 32] (masked + reference, prepared per avatar frame) and audio features
[B, 50, 384] + sinusoidal positions -> unet(latents, t=0, encoder_hidden_states).sample
[B, 4, 32, 32] -> vae.decode(lat / 0.18215) -> `to_uint8`: (x / 2 + 0.5).clamp(0, 1), then x 255 and
rounding in float32 (as MuseTalk's `decode_latents`, which converts to float32 before scaling)
-> RGB uint8 [B, 256, 256, 3]. Batches larger than `pipeline.max_batch` are split; the last
may be partial. `musetalk.compile` wraps the UNet and the VAE decoder in `torch.compile`;
`musetalk.cuda_graphs` replays the whole step from CUDA graphs (graphs.py).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.backends.base import Renderer
from ray_lipsync.backends.musetalk.avatar import LATENT_SHAPE, LATENTS_KEY
from ray_lipsync.backends.musetalk.features import FEATURE_SHAPE
from ray_lipsync.backends.musetalk.graphs import Capture, GraphedStep, Step
from ray_lipsync.backends.musetalk.weights import VAE_SCALE, MuseTalkModels, models_for
from ray_lipsync.config import Settings
from ray_lipsync.errors import AvatarError, AvatarNotFound
from ray_lipsync.types import RenderJob

log = logging.getLogger(__name__)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Transformer sinusoidal position table [length, dim]: sin on even, cos on odd channels."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, H, W] in [-1, 1] (any dtype) -> uint8 [B, H, W, 3], as MuseTalk does:
    (x / 2 + 0.5).clamp(0, 1) in the model's dtype, then x 255 and round in float32."""
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class Networks:
    """The callables of one render step: the UNet and the VAE decoder (plain or compiled), and
    `graphed`, the whole step replayed from CUDA graphs when the renderer uses them."""

    unet: Callable[..., Any]
    decode: Callable[..., Any]
    graphed: GraphedStep | None = None

    @classmethod
    def of(cls, models: MuseTalkModels, compile: bool = False) -> "Networks":
        """`models`' UNet and VAE decoder; with `compile`, their `torch.compile`d forms, made
        once per process for each loaded model set (so every renderer shares the compiled
        graphs: the first batches of new sizes compile, later renderers start warm)."""
        return _compiled(models) if compile else cls(models.unet, models.vae.decode)

    def step(self, models: MuseTalkModels) -> Step:
        """latents [B, 8, 32, 32] and cond [B, 50, 384] (on the device, in the models' dtype) ->
        uint8 crops [B, 256, 256, 3] on the device."""
        if self.graphed is not None:
            return self.graphed
        timestep = torch.zeros((), device=models.device, dtype=torch.long)

        def step(latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            pred = self.unet(latents, timestep, encoder_hidden_states=cond).sample
            return to_uint8(self.decode(pred / VAE_SCALE).sample)

        return step

    def with_graphs(self, models: MuseTalkModels, max_batch: int, capture: Capture | None = None) -> "Networks":
        """These networks with every batch size up to `max_batch` captured as CUDA graphs
        (`capture` replaces the CUDA capture in tests)."""
        graphed = GraphedStep(self.step(models), capture)
        with torch.inference_mode():
            example = (torch.zeros((1, *LATENT_SHAPE), device=models.device, dtype=models.dtype),
                       torch.zeros((1, *FEATURE_SHAPE), device=models.device, dtype=models.dtype))
            graphed.warm(example, max_batch)
        return replace(self, graphed=graphed)


@functools.lru_cache(maxsize=4)
def _compiled(models: MuseTalkModels) -> Networks:
    log.info("musetalk: torch.compile of the UNet and VAE decoder (first batches compile)")
    return Networks(torch.compile(models.unet), torch.compile(models.vae.decode))


def render_latents(
    models: MuseTalkModels,
    latents: torch.Tensor,
    features: torch.Tensor,
    positions: torch.Tensor,
    networks: Networks | None = None,
) -> np.ndarray:
    """Crops [B, 256, 256, 3] uint8 from latents [B, 8, 32, 32] and features [B, 50, 384]."""
    step = (networks or Networks.of(models)).step(models)
    with torch.inference_mode():
        cond = features.to(models.device, models.dtype) + positions
        return step(latents.to(models.device, models.dtype), cond).cpu().numpy()


class MuseTalkRenderer(Renderer):
    """Renders batches of `RenderJob`s of any sessions with MuseTalk v1.5 (one forward each)."""

    name = "musetalk"

    def __init__(
        self,
        settings: Settings,
        device: str | torch.device | None = None,
        models: MuseTalkModels | None = None,
    ) -> None:
        """Load UNet + VAE from `settings.models_dir` (once per process), or use `models`."""
        self.models = models = models or models_for(settings, ("unet", "vae"), device)
        self.device = models.device
        self.max_batch = settings.pipeline.max_batch
        self.networks = Networks.of(models, settings.musetalk.compile)
        if settings.musetalk.cuda_graphs:
            if self.device.type == "cuda":
                self.networks = self.networks.with_graphs(models, self.max_batch)
            else:
                log.warning("musetalk.cuda_graphs needs CUDA; the render step runs eager on %s", self.device)
        self.positions = sinusoidal_positions(*FEATURE_SHAPE).to(self.device, models.dtype)
        self._latents: dict[str, torch.Tensor] = {}

    def load_avatar(self, avatar: Avatar) -> None:
        """Hold the avatar's prepared latents on the device (idempotent)."""
        if avatar.name in self._latents:
            return
        latents = avatar.extras.get(LATENTS_KEY)
        if latents is None:
            raise AvatarError(
                f"avatar {avatar.name!r} has no MuseTalk latents; run "
                f"`ray-lipsync avatar prepare --backend musetalk` for it (name {avatar.name!r})"
            )
        latents = np.asarray(latents)
        if latents.shape != (len(avatar), *LATENT_SHAPE):
            raise AvatarError(
                f"avatar {avatar.name!r}: musetalk_latents has shape {latents.shape}, expected "
                f"{(len(avatar), *LATENT_SHAPE)}; prepare it again with --backend musetalk"
            )
        self._latents[avatar.name] = torch.from_numpy(np.array(latents, dtype=np.float32)).to(
            self.device, self.models.dtype
        )
        log.info("musetalk: avatar %r loaded (%d frames)", avatar.name, len(latents))

    def _inputs(self, jobs: Sequence[RenderJob]) -> tuple[torch.Tensor, torch.Tensor]:
        rows, feats = [], []
        for job in jobs:
            table = self._latents.get(job.avatar)
            if table is None:
                raise AvatarNotFound(f"avatar {job.avatar!r} is not loaded in this renderer; call load_avatar first")
            if not 0 <= job.avatar_frame < len(table):
                raise AvatarError(f"avatar {job.avatar!r} has {len(table)} frames, job asks for {job.avatar_frame}")
            if np.shape(job.features) != FEATURE_SHAPE:
                raise ValueError(f"MuseTalk features must have shape {FEATURE_SHAPE}, got {np.shape(job.features)}")
            rows.append(table[job.avatar_frame])
            feats.append(np.asarray(job.features, dtype=np.float32))
        return torch.stack(rows), torch.from_numpy(np.stack(feats))

    def render(self, jobs: Sequence[RenderJob]) -> list[np.ndarray]:
        """One (256, 256, 3) uint8 crop per job, in order (batches of at most `max_batch`)."""
        crops: list[np.ndarray] = []
        for start in range(0, len(jobs), self.max_batch):
            latents, features = self._inputs(jobs[start : start + self.max_batch])
            batch = render_latents(self.models, latents, features, self.positions, self.networks)
            crops.extend(batch[i] for i in range(len(batch)))
        return crops
