"""The worker actors: feature batcher, inference replica, compositor."""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import numpy as np
import ray

from actors.runtime import serial_opencv
from ray_lipsync.avatar.model import Avatar
from ray_lipsync.backends import create_featurizer, create_renderer
from ray_lipsync.clock import SessionClock
from ray_lipsync.compositing import Patch
from ray_lipsync.config import Settings
from ray_lipsync.streaming.features import FeatureBatcher, Schedule
from ray_lipsync.streaming.local import create_vad, load_avatar
from ray_lipsync.streaming.scheduler import BatchWorker, RenderQueue
from ray_lipsync.types import FrameJob, RenderJob

log = logging.getLogger(__name__)


@ray.remote
class FeatureBatcherActor:
    """One per backend: the core FeatureBatcher behind actor calls (async, concurrent)."""

    def __init__(self, settings: Settings, backend: str) -> None:
        serial_opencv()
        featurizer = create_featurizer(settings, backend)
        self._batcher = FeatureBatcher(featurizer, create_vad(settings), settings.pipeline.lookahead_ms)

    def lookahead_ms(self) -> int:
        return self._batcher.lookahead_ms

    async def open(self, session_id: str, clock: SessionClock, avatar_frames: int, schedule: Schedule) -> None:
        self._batcher.open(session_id, clock, avatar_frames, schedule)

    async def process_many(self, pushes: list[tuple[str, int, int, np.ndarray, bool]]) -> list[list[FrameJob]]:
        """Several sessions' pushes of one dispatch round, served by one featurizer step."""
        return list(await asyncio.gather(*(self._batcher.process(*push) for push in pushes)))

    async def interrupt(self, session_id: str, epoch: int, cut_frame: int) -> None:
        await self._batcher.interrupt(session_id, epoch, cut_frame)

    async def close(self, session_id: str) -> None:
        await self._batcher.close(session_id)

    def stats(self) -> dict:
        return {"sessions": len(self._batcher.stages), "steps": self._batcher.steps, "frames": self._batcher.frames}


@ray.remote
class InferenceReplica:
    """Holds a backend's renderer once; batches ready frames of all its sessions.

    Each batch is the oldest-deadline-first set of up to max_batch queued frames from every
    session pinned here (see streaming/scheduler.py).
    """

    def __init__(self, settings: Settings, backend: str, name: str) -> None:
        serial_opencv()
        self.name = name
        self._settings = settings
        self._renderer = create_renderer(settings, backend)
        self._queue = RenderQueue(settings.pipeline.max_batch)
        self._worker = BatchWorker(self._queue, self._render)
        self._avatars: dict[str, Avatar] = {}
        self._session_avatar: dict[str, str] = {}
        log.info("replica %s ready (%s) on node %s", name, backend, ray.get_runtime_context().get_node_id())

    def _render(self, jobs: list[FrameJob]) -> Sequence[np.ndarray | None]:
        return self._renderer.render(
            [RenderJob(self._session_avatar[j.session_id], j.avatar_frame, j.features) for j in jobs]
        )

    async def open_session(self, session_id: str, avatar: str) -> None:
        if avatar not in self._avatars:
            loaded = load_avatar(self._settings, avatar)
            self._renderer.load_avatar(loaded)
            self._avatars[avatar] = loaded
        self._session_avatar[session_id] = avatar

    async def render(self, jobs: list[FrameJob]) -> list[np.ndarray | None]:
        """Crops for `jobs` (None for those dropped as stale or late)."""
        live = [j for j in jobs if j.session_id in self._session_avatar]
        results = iter(await self._worker.run(live)) if live else iter(())
        return [next(results) if j.session_id in self._session_avatar else None for j in jobs]

    async def set_epoch(self, session_id: str, epoch: int) -> None:
        self._queue.set_epoch(session_id, epoch)

    async def close_session(self, session_id: str) -> None:
        self._queue.forget(session_id)
        self._session_avatar.pop(session_id, None)

    def stats(self) -> dict:
        q = self._queue.stats
        return {
            "replica": self.name,
            "device": str(self._renderer.device),
            "sessions": len(self._session_avatar),
            "queue_depth": len(self._queue),
            "batches": q.batches,
            "frames": q.frames,
            "max_batch_seen": q.max_batch_seen,
            "dropped_stale": q.dropped_stale,
            "dropped_late": q.dropped_late,
        }

    def ping(self) -> str:
        return self.name

    def node_id(self) -> str:
        """The Ray node this replica runs on (placement checks, metrics)."""
        return ray.get_runtime_context().get_node_id()


@ray.remote
class CompositorActor:
    """Blends crops into avatar frames; lives on the node that streams the sessions.

    It returns `Patch`es (the blended mouth region, a few KB) rather than full frames: the
    gateway pastes them into its own memory-mapped avatar frames, so no full frame passes
    through the object store (on a 2-core node that transfer cost more than the blending).
    """

    def __init__(self, settings: Settings) -> None:
        from ray_lipsync.compositing import Compositor

        serial_opencv()
        self._settings = settings
        self._compositor = Compositor()
        self._avatars: dict[str, Avatar] = {}

    def patch_many(
        self, frames: list[tuple[str, int]], crops: list[np.ndarray | None]
    ) -> list[Patch | None]:
        """Patches for (avatar, avatar frame) pairs and their crops (None stays None)."""
        return [
            None if crop is None else self._compositor.patch(self._avatar(name), k, crop)
            for (name, k), crop in zip(frames, crops)
        ]

    def _avatar(self, name: str) -> Avatar:
        if name not in self._avatars:
            self._avatars[name] = load_avatar(self._settings, name)
        return self._avatars[name]

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
