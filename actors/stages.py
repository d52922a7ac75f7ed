"""The worker actors: feature batcher, inference replica, compositor.

The frame path of one dispatch round: the gateway calls its session's pinned replica once
(`InferenceReplica.round`) with the audio of all its sessions pinned there; the replica asks
the feature batcher for features (they come back to the replica, where they are needed),
renders them in its cross-session batches and has the compositor on its own node turn the
crops into mouth patches. Only the patches go back to the gateway: crops and features never
pass through it.

Every actor is restartable (`max_restarts=-1`) and keeps no state that cannot be rebuilt: a
push carries what a restarted batcher needs to reopen the session (`AudioPush.spec`), a job
names its avatar. While the batcher or the compositor is unavailable the replica does their
work itself (`StageFallback`), so a session keeps streaming through their death.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence, TypeVar

import numpy as np
import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.runtime import serial_opencv
from ray_lipsync.avatar.model import Avatar
from ray_lipsync.backends import create_featurizer, create_renderer
from ray_lipsync.compositing import Compositor, Patch
from ray_lipsync.config import Settings
from ray_lipsync.heap import freeze_startup_heap
from ray_lipsync.streaming.drops import DropReason
from ray_lipsync.streaming.features import FeatureBatcher
from ray_lipsync.streaming.local import create_vad, load_avatar
from ray_lipsync.streaming.scheduler import BatchWorker, RenderQueue
from ray_lipsync.types import AudioPush, FrameJob, RenderJob

log = logging.getLogger(__name__)

try:  # raised while an actor restarts or its process cannot be reached
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover
    ActorUnavailableError = RayActorError  # type: ignore[misc, assignment]

STAGE_FAILURES = (RayActorError, ActorUnavailableError, asyncio.TimeoutError)
RESTARTABLE = {"max_restarts": -1, "max_task_retries": 0}  # restart, never replay stale work
STAGE_START_TIMEOUT_S = 60.0
T = TypeVar("T")


@dataclass
class RoundResult:
    """One push's outcome: its ready frames, which are speech, and per speech frame a mouth
    patch or the reason there is none."""

    frames: list[int]
    speech: list[bool]
    patches: list[Patch | DropReason]


class StageFallback:
    """Calls a remote stage, or does its work in-process while the stage is unavailable.

    A call that fails or takes longer than `timeout_s` marks the stage down; calls then go
    straight to the local path (no timeout paid per round) for at least `hold_s` and until a
    background ping answers again (the hold keeps a stage that is only slow from flapping).
    `down` is reported in the replica's stats and in /healthz.
    """

    def __init__(self, name: str, handle: object, timeout_s: float, probe_s: float = 0.25,
                 hold_s: float = 2.0) -> None:
        self.name = name
        self.handle = handle
        self.timeout_s = timeout_s
        self.probe_s = probe_s
        self.hold_s = hold_s
        self.down = False
        self.failovers = 0
        self._probe: asyncio.Task | None = None

    async def call(self, remote: Callable[[object], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        if not self.down:
            try:
                return await asyncio.wait_for(remote(self.handle), self.timeout_s)
            except STAGE_FAILURES as exc:
                self.down = True
                self.failovers += 1
                log.warning("%s unavailable (%s); working in-process until it answers", self.name,
                            type(exc).__name__)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_up())
        return await local()

    async def _wait_up(self) -> None:
        await asyncio.sleep(self.hold_s)
        while self.down:
            try:
                await asyncio.wait_for(self.handle.ping.remote(), self.probe_s * 4)  # type: ignore[attr-defined]
                self.down = False
                log.info("%s is back", self.name)
            except STAGE_FAILURES:
                await asyncio.sleep(self.probe_s)


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

    def stats(self) -> dict:
        return {"sessions": len(self._batcher.stages), "steps": self._batcher.steps, "frames": self._batcher.frames}


def new_feature_batcher(settings: Settings, backend: str) -> FeatureBatcher:
    return FeatureBatcher(create_featurizer(settings, backend), create_vad(settings), settings.pipeline.lookahead_ms)


@ray.remote(**RESTARTABLE)
class CompositorActor:
    """Turns crops into mouth patches on the node of the replicas that render them.

    It returns `Patch`es (the blended mouth region, a few KB) rather than full frames: the
    gateway pastes them into its own memory-mapped avatar frames, so no full frame and no
    crop crosses the network.
    """

    def __init__(self, settings: Settings) -> None:
        serial_opencv()
        self._patcher = Patcher(settings)

    def patch_many(self, frames: list[tuple[str, int]], crops: list[np.ndarray]) -> list[Patch]:
        return self._patcher.patch_many(frames, crops)

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class Patcher:
    """Compositor with its own avatar cache (the compositor actor's work, and its fallback)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._compositor = Compositor()
        self._avatars: dict[str, Avatar] = {}

    def patch_many(self, frames: Sequence[tuple[str, int]], crops: Sequence[np.ndarray]) -> list[Patch]:
        return [self._compositor.patch(self._avatar(name), k, crop) for (name, k), crop in zip(frames, crops)]

    def _avatar(self, name: str) -> Avatar:
        if name not in self._avatars:
            self._avatars[name] = load_avatar(self._settings, name)
        return self._avatars[name]


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


@ray.remote(**RESTARTABLE)
class InferenceReplica:
    """Holds a backend's renderer once; renders the rounds of every session pinned here.

    Each batch is the oldest-deadline-first set of up to max_batch queued frames from every
    session of every gateway calling this replica (streaming/scheduler.py).
    """

    def __init__(self, settings: Settings, backend: str, name: str, generation: str, batcher: object) -> None:
        serial_opencv()
        self.name = name
        self._settings = settings
        self._backend = backend
        self._renderer = create_renderer(settings, backend)
        self._queue = RenderQueue(settings.pipeline.max_batch)
        self._worker = BatchWorker(self._queue, self._render)
        self._avatars: dict[str, Avatar] = {}
        # standby feature stage: a batcher failure then costs no model load on the frame path
        self._local_batcher = new_feature_batcher(settings, backend)
        self._patcher = Patcher(settings)
        self.node = ray.get_runtime_context().get_node_id()
        timeout = settings.pipeline.stage_timeout_ms / 1000
        self._features = StageFallback(f"feature batcher ({backend})", batcher, timeout)
        # Compositing runs in the node's compositor actor, in parallel with this replica's next
        # render (compositing in-process here was measured slower: benchmarks/README.md).
        self._compositor = StageFallback(
            f"compositor on node {self.node[:8]}", node_compositor(settings, generation, self.node), timeout)
        self.rounds = 0
        self._ready: asyncio.Task | None = None
        log.info("replica %s started (%s) on node %s", name, backend, self.node)

    async def ready(self) -> str:
        """Answer once the batcher and this node's compositor answer and the default avatar
        is loaded, so the first session's first frames pay none of their start (a stage that
        does not come up in time is marked down: this replica does its work until it answers).
        The directory pins sessions here only after this."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._warm())
        await asyncio.shield(self._ready)
        return self.name

    async def _warm(self) -> None:
        stages = {"batcher": self._features, "compositor": self._compositor}

        async def answer(name: str, stage: StageFallback) -> None:
            try:
                await asyncio.wait_for(stage.handle.ping.remote(), STAGE_START_TIMEOUT_S)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001
                log.warning("%s did not start in %.0f s (%s); replica %s works without it for now",
                            name, STAGE_START_TIMEOUT_S, type(exc).__name__, self.name)
                stage.down = True

        async def default_avatar() -> None:
            try:
                await self._ensure_avatar(self._settings.avatar.name)
            except Exception:  # noqa: BLE001 - a session on it will say why
                log.warning("replica %s could not load the default avatar", self.name, exc_info=True)

        await asyncio.gather(*(answer(n, s) for n, s in stages.items()), default_avatar())
        freeze_startup_heap()  # a full collection then walks only what rounds allocate
        log.info("replica %s ready (%s)", self.name, self._backend)

    # -- the round --------------------------------------------------------------------
    async def round(self, pushes: list[AudioPush]) -> list[RoundResult]:
        """Features, render and mouth patches for one gateway's pushes of one tick."""
        arrived = time.monotonic()
        self.rounds += 1
        for push in pushes:
            self._queue.set_epoch(push.session_id, push.epoch)
            await self._ensure_avatar(push.spec.avatar)
        jobs_per_push = await self._features.call(
            lambda batcher: batcher.process.remote(pushes),  # type: ignore[attr-defined]
            lambda: self._local_batcher.process_pushes(pushes))
        speech_per_push = [[j for j in jobs if j.speech] for jobs in jobs_per_push]
        crops_per_push = await asyncio.gather(*(
            self._worker.run(speech, arrived + push.due_in_s) if speech else _none()
            for push, speech in zip(pushes, speech_per_push)))
        todo = [(j.avatar, j.avatar_frame, c) for speech, crops in zip(speech_per_push, crops_per_push)
                for j, c in zip(speech, crops) if not isinstance(c, DropReason)]
        patches = iter(await self._patches(todo) if todo else [])
        results = []
        for jobs, crops in zip(jobs_per_push, crops_per_push):
            out: list[Patch | DropReason] = [c if isinstance(c, DropReason) else next(patches) for c in crops]
            results.append(RoundResult([j.frame_index for j in jobs], [j.speech for j in jobs], out))
        return results

    async def _patches(self, todo: list[tuple[str, int, np.ndarray]]) -> list[Patch]:
        frames = [(name, k) for name, k, _ in todo]
        crops = [c for _, _, c in todo]
        return await self._compositor.call(
            lambda compositor: compositor.patch_many.remote(frames, crops),  # type: ignore[attr-defined]
            lambda: asyncio.to_thread(self._patcher.patch_many, frames, crops))

    def _render(self, jobs: list[FrameJob]) -> Sequence[np.ndarray | None]:
        return self._renderer.render([RenderJob(j.avatar, j.avatar_frame, j.features) for j in jobs])

    async def _ensure_avatar(self, avatar: str) -> None:
        if avatar not in self._avatars:
            loaded = await asyncio.to_thread(load_avatar, self._settings, avatar)
            await asyncio.to_thread(self._renderer.load_avatar, loaded)
            self._avatars[avatar] = loaded

    # -- session control ----------------------------------------------------------------
    async def prepare(self, avatar: str) -> int:
        """Load `avatar` before a session on it starts (its first round then pays nothing);
        returns the backend's lookahead (ms)."""
        await self._ensure_avatar(avatar)

        async def local() -> int:
            return self._local_batcher.lookahead_ms

        return await self._features.call(lambda batcher: batcher.lookahead_ms.remote(), local)  # type: ignore[attr-defined]

    async def interrupt(self, session_id: str, epoch: int, cut_frame: int) -> None:
        self._queue.set_epoch(session_id, epoch)
        if session_id in self._local_batcher.stages:
            await self._local_batcher.interrupt(session_id, epoch, cut_frame)
        await self._features.call(
            lambda batcher: batcher.interrupt.remote(session_id, epoch, cut_frame),  # type: ignore[attr-defined]
            _none)

    async def close_session(self, session_id: str) -> None:
        self._queue.forget(session_id)
        await self._local_batcher.close(session_id)
        await self._features.call(
            lambda batcher: batcher.close.remote(session_id), _none)  # type: ignore[attr-defined]

    # -- introspection --------------------------------------------------------------------
    def stats(self) -> dict:
        q = self._queue.stats
        return {
            "replica": self.name,
            "backend": self._backend,
            "device": str(self._renderer.device),
            "queue_depth": len(self._queue),
            "rounds": self.rounds,
            "batches": q.batches,
            "frames": q.frames,
            "max_batch_seen": q.max_batch_seen,
            "dropped_stale": q.dropped_stale,
            "dropped_late": q.dropped_late,
            "batcher_down": self._features.down,
            "compositor_down": self._compositor.down,
            "failovers": self._features.failovers + self._compositor.failovers,
        }

    def ping(self) -> str:
        return self.name

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this replica runs on (placement checks, metrics)."""
        return self.node


async def _none() -> list:
    return []
