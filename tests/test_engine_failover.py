"""The engine with its feature batcher in another process that dies, restarts and dies again:
the engine's in-process twin takes over each time, and every frame of the session comes out
exactly once (none lost at a switch, none finished twice from a stage that missed audio)."""

from __future__ import annotations

import asyncio

import numpy as np
from speech import speech

from ray_lipsync.clock import SAMPLES_PER_FRAME as F
from ray_lipsync.streaming.engine import Engine, StageGuard, create_vad
from ray_lipsync.streaming.features import FeatureBatcher
from ray_lipsync.backends.procedural import ProceduralFeaturizer
from ray_lipsync.types import AudioPush, StageSpec


class Dead(Exception):
    """What a call to the killed batcher raises (Ray: RayActorError)."""


class _Method:
    def __init__(self, actor: "BatcherProcess", call) -> None:
        self._actor, self._call = actor, call

    def remote(self, *args):
        async def run():
            if self._actor.batcher is None:
                raise Dead("the batcher process is gone")
            return await self._call(self._actor.batcher, *args)
        return run()


class BatcherProcess:
    """An actor handle's shape (`method.remote(...)` -> awaitable) over a batcher that can be
    killed and restarted (a restart starts with no session, as Ray's does)."""

    def __init__(self, make) -> None:
        self._make = make
        self.batcher: FeatureBatcher | None = make()
        self.process = _Method(self, lambda b, pushes: b.process_pushes(pushes))
        self.ping = _Method(self, lambda b: asyncio.sleep(0))
        self.close = _Method(self, lambda b, sid: b.close(sid))
        self.interrupt = _Method(self, lambda b, *a: b.interrupt(*a))

    def kill(self) -> None:
        self.batcher = None

    def restart(self) -> None:
        self.batcher = self._make()


def test_a_batcher_that_dies_twice_loses_no_frame_and_repeats_none(lipsync_settings):
    settings = lipsync_settings
    vad = create_vad(settings)
    remote = BatcherProcess(lambda: FeatureBatcher(ProceduralFeaturizer(settings), vad))
    guard = StageGuard("feature batcher", remote, lambda: remote.ping.remote(), timeout_s=5.0,
                       failures=(Dead,), probe_s=0.01, hold_s=0.0)
    engine = Engine(settings, "procedural", features=guard)
    voice = np.concatenate([speech()] * 3)
    spec = StageSpec("default", avatar_frames=1)

    async def push(k: int) -> list[int]:
        """Audio up to frame k + 1 (so frame k has its 40 ms lookahead), starting at frame k:
        as the session sends it, each push repeats the audio of the first frame it completes."""
        audio = voice[k * F:(k + 2) * F]
        (result,) = await engine.round([AudioPush("s", 0, k * F, audio, False, spec, 100.0)])
        return result.frames

    async def until_up() -> None:
        for _ in range(500):
            if not guard.down:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the restarted batcher was not used again")

    async def run() -> list[int]:
        await engine.prepare("default")
        frames = []
        for k in range(80):
            if k in (20, 60):
                remote.kill()  # the round of push k fails over to the in-process twin
            if k == 40:
                remote.restart()
                await until_up()
            frames += await push(k)
        assert guard.failovers == 2
        return frames

    frames = asyncio.run(run())
    assert sorted(frames) == frames  # in order
    assert frames == list(range(frames[0], 80)), [f for f in frames if frames.count(f) > 1]


def test_a_stage_that_has_not_answered_yet_gets_no_call_until_it_does():
    """A compositor created with its replica on a new node starts after the replica: rounds
    must not wait the stage timeout on it; they go in-process until its ping answers."""
    started = asyncio.Event()
    calls: list[str] = []

    async def ping():
        if not started.is_set():
            await asyncio.sleep(3600)  # a process still starting: no answer at all
        return True

    async def remote(handle):
        calls.append("remote")
        return "remote"

    async def local():
        calls.append("local")
        return "local"

    async def run() -> None:
        guard = StageGuard("compositor", object(), ping, timeout_s=30.0, failures=(Dead,),
                           probe_s=0.01, answered=False)
        assert guard.down
        assert await guard.call(remote, local) == "local"  # not tried: no timeout paid
        started.set()
        for _ in range(500):
            if not guard.down:
                break
            await asyncio.sleep(0.01)
        assert await guard.call(remote, local) == "remote"
        assert guard.failovers == 0  # it never failed

    asyncio.run(run())
    assert calls == ["local", "remote"]
