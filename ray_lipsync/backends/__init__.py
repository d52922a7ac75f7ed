"""Lip-sync backends. `create_featurizer` / `create_renderer` import a backend only when used."""

from __future__ import annotations

from ray_lipsync.backends.base import Featurizer, Renderer
from ray_lipsync.config import Settings

BACKENDS = ("procedural", "musetalk")


def create_featurizer(settings: Settings, backend: str | None = None) -> Featurizer:
    name = backend or settings.backend
    if name == "procedural":
        from ray_lipsync.backends.procedural import ProceduralFeaturizer

        return ProceduralFeaturizer(settings)
    if name == "musetalk":
        from ray_lipsync.backends.musetalk import MuseTalkFeaturizer

        return MuseTalkFeaturizer(settings)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def create_renderer(settings: Settings, backend: str | None = None) -> Renderer:
    name = backend or settings.backend
    if name == "procedural":
        from ray_lipsync.backends.procedural import ProceduralRenderer

        return ProceduralRenderer(settings)
    if name == "musetalk":
        from ray_lipsync.backends.musetalk import MuseTalkRenderer

        return MuseTalkRenderer(settings)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Featurizer", "Renderer", "create_featurizer", "create_renderer"]
