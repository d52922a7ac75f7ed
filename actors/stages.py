"""The worker actors: feature batcher, inference replica, compositor.

The frame path of one dispatch round: the gateway calls its session's pinned replica once
(`InferenceReplica.round`) with the audio of all its sessions pinned there. The replica's
`Engine` (ray_lipsync/streaming/engine.py) asks the feature batcher for features (they come
back to the replica, where they are needed), renders them in its cross-session batches and
has the compositor on its own node turn the crops into mouth patches. Only the patches go
back to the gateway: crops and features never pass through it.

Every actor is restartable (`max_restarts=-1`) and keeps no state that cannot be rebuilt: a
push carries what a restarted batcher needs to reopen the session (`AudioPush.spec`), a job
names its avatar. While the batcher or the compositor is unavailable the engine does their
work with its own in-process stages (built with it, so warm), and a session keeps streaming.
"""

from __future__ import annotations

import asyncio
import logging
import os
import numpy as np
import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.runtime import serial_opencv
from ray_lipsync.compositing import Patch
from ray_lipsync.config import Settings
from ray_lipsync.heap import freeze_startup_heap
from ray_lipsync.streaming.engine import (
    AvatarCache,
    Engine,
    Patcher,
    RoundResult,
    StageGuard,
    new_feature_batcher,
)
from ray_lipsync.types import AudioPush, FrameJob

log = logging.getLogger(__name__)

try:  # raised while an actor restarts or its process cannot be reached
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover
    ActorUnavailableError = RayActorError  # type: ignore[misc, assignment]

STAGE_FAILURES = (RayActorError, ActorUnavailableError, asyncio.TimeoutError)
RESTARTABLE = {"max_restarts": -1, "max_task_retries": 0}  # restart, never replay stale work
STAGE_START_TIMEOUT_S = 60.0


@ray.remote(**RESTARTABLE)
class FeatureBatcherActor:
    """One per backend: the core FeatureBatcher behind actor calls (async, concurrent)."""

    def __init__(self, settings: Settings, backend: str) -> None:
        serial_opencv()
        self._batcher = new_feature_batcher(settings, backend)

    def lookahead_ms(self) -> int:
        return self._batcher.lookahead_ms

    async def process(self, pushes: list[AudioPush]) -> list[list[FrameJob]]:
        """Several sessions' pushes of one round, served by one featurizer step."""
        return await self._batcher.process_pushes(pushes)

    async def interrupt(self, session_id: str, epoch: int, cut_frame: int) -> None:
        if session_id in self._batcher.stages:
            await self._batcher.interrupt(session_id, epoch, cut_frame)

    async def close(self, session_id: str) -> None:
        await self._batcher.close(session_id)

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()


@ray.remote(**RESTARTABLE)
class CompositorActor:
    """Turns crops into mouth patches on the node of the replicas that render them.

    It returns `Patch`es (the blended mouth region, a few KB) rather than full frames: the
    gateway pastes them into its own memory-mapped avatar frames, so no full frame and no
    crop crosses the network.
    """

    def __init__(self, settings: Settings) -> None:
        serial_opencv()
        self._patcher = Patcher(AvatarCache(settings))

    def patch_many(self, frames: list[tuple[str, int]], crops: list[np.ndarray]) -> list[Patch]:
        return self._patcher.patch_many(frames, crops)

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def node_compositor(settings: Settings, generation: str, node_id: str):
    """The compositor of `node_id` (created by the first replica there to ask)."""
    return CompositorActor.options(
        name=f"compositor-{generation}-{node_id[:16]}",
        namespace=settings.pipeline.namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,  # light; pinned to its node by affinity
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(settings)


def _guard(name: str, handle, settings: Settings) -> StageGuard:
    """A replica's guard of `handle`'s stage: not called until it has answered (`answered=False`)."""
    return StageGuard(name, handle, lambda: handle.ping.remote(), answered=False,
                      timeout_s=settings.pipeline.stage_timeout_ms / 1000, failures=STAGE_FAILURES)


@ray.remote(**RESTARTABLE)
class InferenceReplica:
    """An `Engine` (the backend's renderer, loaded once) behind actor calls: renders the rounds
    of every session pinned here, in oldest-deadline-first cross-session batches."""

    def __init__(self, settings: Settings, backend: str, name: str, generation: str, batcher: object) -> None:
        serial_opencv()
        self.name = name
        self._settings = settings
        self.node = ray.get_runtime_context().get_node_id()
        self._engine = Engine(
            settings, backend, name,
            # Neither stage gets a call until it has answered this replica (its warm-up, or the
            # probe of the first round): a restarted replica may be given sessions at once,
            # while the batcher restarts beside it or the compositor of a new node, created
            # now, is still starting; every round would wait `stage_timeout_ms` on it.
            features=_guard(f"feature batcher ({backend})", batcher, settings),
            # Compositing runs in the node's compositor actor, in parallel with this replica's
            # next render (compositing in-process measured slower: benchmarks/README.md).
            compositor=_guard(f"compositor on node {self.node[:8]}",
                              node_compositor(settings, generation, self.node), settings),
        )
        self._ready: asyncio.Task | None = None
        log.info("replica %s started (%s) on node %s", name, backend, self.node)

    async def ready(self) -> str:
        """Answer once the batcher and this node's compositor answer and the default avatar
        is loaded, so the first session's first frames pay none of their start (a stage that
        does not come up in time is marked down: this replica does its work until it answers).
        The directory pins sessions here only after this."""
        await asyncio.shield(self._warming())
        return self.name

    def _warming(self) -> asyncio.Task:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._warm())
        return self._ready

    async def _warm(self) -> None:
        engine = self._engine

        async def answer(guard: StageGuard) -> None:
            if not await guard.wait_up(STAGE_START_TIMEOUT_S):
                log.warning("%s did not start in %.0f s; replica %s works without it until it answers",
                            guard.name, STAGE_START_TIMEOUT_S, self.name)

        async def default_avatar() -> None:
            try:
                await engine.prepare(self._settings.avatar.name)
            except Exception:  # noqa: BLE001 - a session on it will say why
                log.warning("replica %s could not load the default avatar", self.name, exc_info=True)

        guards = [g for g in (engine.features, engine.compositor) if g is not None]
        await asyncio.gather(*(answer(g) for g in guards), default_avatar())
        freeze_startup_heap()  # a full collection then walks only what rounds allocate
        log.info("replica %s ready (%s)", self.name, engine.backend)

    async def round(self, pushes: list[AudioPush]) -> list[RoundResult]:
        """Features, render and mouth patches for one gateway's pushes of one tick."""
        return await self._engine.round(pushes)

    async def prepare(self, avatar: str) -> int:
        """Load `avatar` before a session on it starts; returns the backend's lookahead (ms)."""
        return await self._engine.prepare(avatar)

    async def interrupt(self, session_id: str, epoch: int, cut_frame: int) -> None:
        await self._engine.interrupt(session_id, epoch, cut_frame)

    async def close_session(self, session_id: str) -> None:
        await self._engine.close_session(session_id)

    def stats(self) -> dict:
        return self._engine.stats().as_dict()

    async def ping(self) -> str:
        """Answers at once. A restarted replica is pinged (not asked `ready`) before the
        directory gives it sessions again: the first ping starts its warm-up."""
        self._warming()
        return self.name

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this replica runs on (placement checks, metrics)."""
        return self.node
