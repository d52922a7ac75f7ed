"""The engine: one replica's work for every session pinned to it.

An `Engine` turns audio pushes into mouth patches: features (one featurizer step across the
sessions of a round), render batches (oldest deadline first, streaming/scheduler.py) and
compositing into patches. It is the same class in-process (`LocalPipeline`) and inside an
inference replica actor (actors/stages.py); there, the feature stage and the compositor
usually run in their own actors, reached through a `StageGuard`, and the engine's own
in-process stages (built with it, warm) take over while they are unavailable.

The one deadline origin: a push's frame 0 is presented `push.due_in_s` after the push
reaches the engine (`time.monotonic()` on arrival), never a wall-clock time from another node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Awaitable, Callable, Sequence, TypeVar

import numpy as np

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.backends import create_featurizer, create_renderer
from ray_lipsync.compositing import Compositor, Patch
from ray_lipsync.config import Settings
from ray_lipsync.streaming.drops import DropReason
from ray_lipsync.streaming.features import FeatureBatcher
from ray_lipsync.streaming.scheduler import BatchWorker, RenderQueue
from ray_lipsync.types import AudioPush, FrameJob, RenderJob

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RoundResult:
    """One push's outcome: its ready frames, which are speech, and per speech frame a mouth
    patch or the reason there is none."""

    frames: list[int]
    speech: list[bool]
    patches: list[Patch | DropReason]


@dataclass
class EngineStats:
    """The one stats schema of an engine (a replica), in-process or in an actor."""

    replica: str
    backend: str
    device: str
    sessions: int
    queue_depth: int
    rounds: int
    batches: int
    frames: int
    max_batch_seen: int
    dropped_stale: int
    dropped_late: int
    batcher_down: bool
    compositor_down: bool
    failovers: int

    def as_dict(self) -> dict:
        return asdict(self)


def load_avatar(settings: Settings, name: str) -> Avatar:
    """Load a prepared avatar (the default one is prepared on first use)."""
    from ray_lipsync.avatar.default import load_or_prepare
    from ray_lipsync.avatar.store import AvatarStore

    return load_or_prepare(AvatarStore(settings.avatars_dir, settings.avatar_uri), name, settings.avatar)


class AvatarCache:
    """Avatars loaded once per process, by name (loading runs off the event loop)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._avatars: dict[str, Avatar] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._avatars

    def __getitem__(self, name: str) -> Avatar:
        return self._avatars[name]

    async def get(self, name: str) -> Avatar:
        if name not in self._avatars:
            self._avatars[name] = await asyncio.to_thread(load_avatar, self._settings, name)
        return self._avatars[name]

    def load(self, name: str) -> Avatar:
        """Blocking `get`, for code that already runs off the event loop."""
        if name not in self._avatars:
            self._avatars[name] = load_avatar(self._settings, name)
        return self._avatars[name]


def create_vad(settings: Settings):
    """The Silero VAD configured by `settings.audio` (onnxruntime is imported only here)."""
    from ray_lipsync.audio.vad import SpeechDetector

    return SpeechDetector.from_config(settings.audio)


def new_feature_batcher(settings: Settings, backend: str) -> FeatureBatcher:
    """A feature batcher for `backend` (its featurizer and VAD loaded now)."""
    return FeatureBatcher(create_featurizer(settings, backend), create_vad(settings), settings.pipeline.lookahead_ms)


class Patcher:
    """Crops -> mouth patches for the avatars of an `AvatarCache`."""

    def __init__(self, avatars: AvatarCache) -> None:
        self._avatars = avatars
        self._compositor = Compositor()

    def patch_many(self, frames: Sequence[tuple[str, int]], crops: Sequence[np.ndarray]) -> list[Patch]:
        """Blocking (loads an avatar it has not seen): call it off the event loop."""
        return [self._compositor.patch(self._avatars.load(name), k, crop) for (name, k), crop in zip(frames, crops)]


class StageGuard:
    """Calls a stage in another process, or its in-process twin while that is unavailable.

    A call that fails with one of `failures` or takes longer than `timeout_s` marks the
    stage down; calls then go straight to the in-process path (no timeout paid per round)
    for at least `hold_s` and until a background `ping` answers again (the hold keeps a
    stage that is only slow from flapping). `down` is reported in the engine's stats.

    `answered` False: the stage was just created (its process may still be starting) and
    gets no call until the probe (started by `wait_up` or the first call) sees it answer:
    until then every round would wait `timeout_s` for it.
    """

    def __init__(self, name: str, handle: object, ping: Callable[[], Awaitable[object]], *,
                 timeout_s: float, failures: tuple[type[BaseException], ...],
                 probe_s: float = 0.25, hold_s: float = 2.0, answered: bool = True) -> None:
        self.name = name
        self.handle = handle
        self._ping = ping
        self.timeout_s = timeout_s
        self._failures = failures + (asyncio.TimeoutError,)
        self.probe_s = probe_s
        self.hold_s = hold_s
        self.down = not answered
        self.failovers = 0
        self._probe: asyncio.Task | None = None

    async def call(self, remote: Callable[[object], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        if not self.down:
            try:
                return await asyncio.wait_for(remote(self.handle), self.timeout_s)
            except self._failures as exc:
                self.mark_down(type(exc).__name__)
        else:
            self._watch(0.0)  # not answered yet: probe (a failed stage's probe runs already)
        return await local()

    def mark_down(self, why: str) -> None:
        if not self.down:
            self.down = True
            self.failovers += 1
            log.warning("%s unavailable (%s); working in-process until it answers", self.name, why)
        self._watch(self.hold_s)

    async def wait_up(self, timeout_s: float) -> bool:
        """Until the stage answers, at most `timeout_s` (the probe runs on): whether it does."""
        if self.down:
            self._watch(0.0)
            await asyncio.wait({self._probe}, timeout=timeout_s)
        return not self.down

    def _watch(self, hold_s: float) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_up(hold_s))

    async def _answers(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._ping(), timeout_s)
            return True
        except self._failures:
            return False
        except Exception:  # noqa: BLE001 - any other failure: not answering either
            return False

    async def _wait_up(self, hold_s: float) -> None:
        await asyncio.sleep(hold_s)
        while self.down:
            if await self._answers(self.probe_s * 4):
                self.down = False
                log.info("%s answers", self.name)
            else:
                await asyncio.sleep(self.probe_s)


class Engine:
    """Features, render batches and mouth patches for the sessions of one replica.

    `features` / `compositor`: guards of the out-of-process stages (None: in-process only).
    The in-process feature batcher and patcher always exist (built with the engine), so a
    failover never waits for a cold start.
    """

    def __init__(self, settings: Settings, backend: str, name: str = "local", *,
                 features: StageGuard | None = None, compositor: StageGuard | None = None) -> None:
        self.name = name
        self.backend = backend
        self._settings = settings
        self._renderer = create_renderer(settings, backend)
        self._queue = RenderQueue(settings.pipeline.max_batch)
        self._worker = BatchWorker(self._queue, self._render)
        self.avatars = AvatarCache(settings)
        self._rendered: set[str] = set()  # avatars loaded into the renderer
        self._batcher = new_feature_batcher(settings, backend)
        self._patcher = Patcher(self.avatars)
        self.features = features
        self.compositor = compositor
        self._sessions: set[str] = set()
        self.rounds = 0

    @property
    def lookahead_ms(self) -> int:
        return self._batcher.lookahead_ms

    @property
    def device(self) -> str:
        return str(self._renderer.device)

    async def prepare(self, avatar: str) -> int:
        """Load `avatar` (renderer and compositor) before a session on it starts, so its first
        round pays nothing; returns the backend's lookahead (ms)."""
        if avatar not in self._rendered:
            loaded = await self.avatars.get(avatar)
            await asyncio.to_thread(self._renderer.load_avatar, loaded)
            self._rendered.add(avatar)
        return self.lookahead_ms

    # -- the round ------------------------------------------------------------------------
    async def round(self, pushes: Sequence[AudioPush]) -> list[RoundResult]:
        """Features, render and mouth patches for the pushes of one round."""
        arrived = time.monotonic()
        self.rounds += 1
        for push in pushes:
            self._sessions.add(push.session_id)
            self._queue.set_epoch(push.session_id, push.epoch)
            await self.prepare(push.spec.avatar)
        jobs_per_push = await self._jobs(pushes)
        speech_per_push = [[j for j in jobs if j.speech] for jobs in jobs_per_push]
        crops_per_push = await asyncio.gather(*(
            self._worker.run(speech, arrived + push.due_in_s) if speech else _nothing()
            for push, speech in zip(pushes, speech_per_push)))
        todo = [(j.avatar, j.avatar_frame, c) for speech, crops in zip(speech_per_push, crops_per_push)
                for j, c in zip(speech, crops) if not isinstance(c, DropReason)]
        patches = iter(await self._patches(todo) if todo else [])
        results = []
        for jobs, crops in zip(jobs_per_push, crops_per_push):
            out: list[Patch | DropReason] = [c if isinstance(c, DropReason) else next(patches) for c in crops]
            results.append(RoundResult([j.frame_index for j in jobs], [j.speech for j in jobs], out))
        return results

    async def _jobs(self, pushes: Sequence[AudioPush]) -> list[list[FrameJob]]:
        local = lambda: self._batcher.process_pushes(pushes)  # noqa: E731
        if self.features is None:
            return await local()
        return await self.features.call(lambda batcher: batcher.process.remote(list(pushes)), local)  # type: ignore[attr-defined]

    async def _patches(self, todo: list[tuple[str, int, np.ndarray]]) -> list[Patch]:
        frames = [(name, k) for name, k, _ in todo]
        crops = [c for _, _, c in todo]
        local = lambda: asyncio.to_thread(self._patcher.patch_many, frames, crops)  # noqa: E731
        if self.compositor is None:
            return await local()
        return await self.compositor.call(
            lambda compositor: compositor.patch_many.remote(frames, crops), local)  # type: ignore[attr-defined]

    def _render(self, jobs: list[FrameJob]) -> Sequence[np.ndarray | None]:
        return self._renderer.render([RenderJob(j.avatar, j.avatar_frame, j.features) for j in jobs])

    # -- session control ------------------------------------------------------------------
    async def interrupt(self, session_id: str, epoch: int, cut_frame: int) -> None:
        """Drop the session's work older than `epoch`; its audio from `cut_frame` on is gone."""
        self._queue.set_epoch(session_id, epoch)
        if session_id in self._batcher.stages:
            await self._batcher.interrupt(session_id, epoch, cut_frame)
        if self.features is not None:
            await self.features.call(
                lambda batcher: batcher.interrupt.remote(session_id, epoch, cut_frame), _nothing)  # type: ignore[attr-defined]

    async def close_session(self, session_id: str) -> None:
        self._sessions.discard(session_id)
        self._queue.forget(session_id)
        await self._batcher.close(session_id)
        if self.features is not None:
            await self.features.call(lambda batcher: batcher.close.remote(session_id), _nothing)  # type: ignore[attr-defined]

    # -- introspection --------------------------------------------------------------------
    def stats(self) -> EngineStats:
        q = self._queue.stats
        guards = [g for g in (self.features, self.compositor) if g is not None]
        return EngineStats(
            replica=self.name, backend=self.backend, device=self.device,
            sessions=len(self._sessions), queue_depth=len(self._queue), rounds=self.rounds,
            batches=q.batches, frames=q.frames, max_batch_seen=q.max_batch_seen,
            dropped_stale=q.dropped_stale, dropped_late=q.dropped_late,
            batcher_down=bool(self.features and self.features.down),
            compositor_down=bool(self.compositor and self.compositor.down),
            failovers=sum(g.failovers for g in guards),
        )


async def _nothing() -> list:
    return []
