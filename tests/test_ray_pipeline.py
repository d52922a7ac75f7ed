"""RayPipeline on real Ray: the media clock through actors, replica failure, cluster placement.

Two Ray instances, one after the other (class-scoped, started once each):
- `TestLocalRay`: `ray.init(num_cpus=2)` with CPU inference replicas;
- `TestSimulatedGpuCluster`: `ray.cluster_utils.Cluster` with a CPU-only head and two worker
  nodes that declare one GPU each, so GPU pinning and placement run without real GPUs.
Every test uses its own Ray namespace (its own SessionDirectory and actors) and kills that
namespace's detached actors afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest
from speech import speech
from helpers import (
    CLIPPED,
    PHRASE_A,
    PHRASE_B,
    Receiver,
    assert_audio_is,
    assert_clock,
    check_interrupt,
    check_sources,
    interrupt_and_reply,
    is_idle,
    push_in_real_time,
    speak_once,
    speech_frames,
    tuned,
)

from ray_lipsync.avatar.store import AvatarStore
from ray_lipsync.clock import SAMPLES_PER_FRAME
from ray_lipsync.config import Settings
from ray_lipsync.errors import AtCapacity, SessionClosed, UnknownSession

ray = pytest.importorskip("ray")
from actors.runtime import init_ray  # noqa: E402
from actors.directory import generation_of  # noqa: E402
from actors.pipeline import RayPipeline  # noqa: E402

pytestmark = pytest.mark.ray

F = SAMPLES_PER_FRAME


def kill_namespace(namespace: str) -> None:
    """Kill the detached actors (directory, replicas, batcher, compositors) of `namespace`."""
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace:
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=namespace))
            except ValueError:  # already gone
                pass


@pytest.fixture
def make_settings(lipsync_settings: Settings):
    """Settings in a fresh namespace per test (playout delay 400 ms: a busy 2-core machine)."""
    used: list[str] = []

    def make(**pipeline: object) -> Settings:
        namespace = f"test-{uuid.uuid4().hex[:8]}"
        used.append(namespace)
        return tuned(lipsync_settings, **{"playout_delay_ms": 400, "namespace": namespace, **pipeline})

    yield make
    for namespace in used:
        kill_namespace(namespace)


async def until_ready(pipeline: RayPipeline, n: int, timeout: float = 90.0) -> None:
    """Until `n` replicas are ready (their start is bounded by the machine, not the code)."""
    deadline = time.monotonic() + timeout
    while len([r for r in await pipeline.replicas() if r["state"] == "ready"]) < n:
        assert time.monotonic() < deadline, f"{n} replicas not ready after {timeout:.0f} s"
        await asyncio.sleep(0.25)


async def bounded(work, seconds: float = 150.0):
    """Fail a test that hangs (a pending actor) instead of blocking the suite."""
    return await asyncio.wait_for(work, seconds)


async def ready_replicas(pipeline: RayPipeline, n: int, timeout: float = 60.0) -> None:
    """Wait until `n` replicas are ready (min_replicas start at connect, in the background)."""
    deadline = time.monotonic() + timeout
    while sum(r["state"] == "ready" for r in await pipeline.replicas()) < n:
        assert time.monotonic() < deadline, "replicas did not start"
        await asyncio.sleep(0.2)


def ray_env(home) -> dict:
    return {"env_vars": {"RAY_LIPSYNC_HOME": str(home)}}


# -- ray.init(num_cpus=2) ------------------------------------------------------------------


class TestLocalRay:
    @pytest.fixture(autouse=True, scope="class")
    def local_ray(self, lipsync_home):
        init_ray(
            num_cpus=2, include_dashboard=False, runtime_env=ray_env(lipsync_home), log_to_driver=False
        )
        yield
        ray.shutdown()

    def test_frames_through_actors_keep_the_clock_and_exact_audio(self, make_settings, speech_detector):
        settings = make_settings()
        voice = speech(PHRASE_A)

        async def run():
            pipeline = await RayPipeline.connect(settings)
            session, utt, stats, received = await speak_once(pipeline, voice, "u1")
            replicas = await pipeline.replica_stats()
            await pipeline.shutdown()
            return session, utt, received, stats, replicas

        session, utt, received, stats, replicas = asyncio.run(bounded(run()))
        assert_clock(received, session)
        assert_audio_is(received, utt.start_frame, voice)
        talking = {r.frame.frame_index for r in received if not is_idle(session, r.frame)}
        expected = speech_frames(speech_detector, voice, utt.start_frame)
        assert talking <= expected and len(talking) >= 0.8 * len(expected)
        assert stats.frames_dropped == 0
        assert stats.replica == replicas[0]["replica"] and replicas[0]["frames"] >= len(talking)
        assert replicas[0]["device"] == "cpu"  # reaches /metrics and the session state

    def test_a_state_clip_through_actors_is_lip_synced_on_its_frames(self, make_settings, clip_settings,
                                                                      lipsync_home):
        """The clip plan travels with the pushes to the feature stage in its actor: speech over
        the `listening` clip is rendered on the listening frames the session shows."""
        clipped = AvatarStore(clip_settings[0].avatars_dir).load(CLIPPED, mmap=False)
        AvatarStore(Settings(home=lipsync_home).avatars_dir).save(clipped)  # where the actors look
        settings = make_settings()

        async def run():
            pipeline = await RayPipeline.connect(settings)
            session = await pipeline.create_session(avatar=CLIPPED)
            rx = Receiver(session)
            at = session.change_avatar_state("listening")["from_frame"]
            utt = await push_in_real_time(session, speech(PHRASE_A), "u1")
            received = await rx.until_frame(utt.end_frame + 3)
            await rx.stop()
            await pipeline.shutdown()
            return session, at, received

        session, at, received = asyncio.run(bounded(run()))
        check_sources(received, session.avatar)
        after = [r.frame for r in received if r.frame.frame_index >= at]
        assert all(f.source_frame in session.avatar.clips["listening"] for f in after)
        assert sum(f.speech and not f.dropped for f in after) > 10

    def test_interrupt_through_actors_silences_old_speech_within_two_frames(self, make_settings):
        settings = make_settings()
        voice = np.concatenate([speech(PHRASE_A), speech(PHRASE_B)])
        reply = speech(PHRASE_B)

        async def run():
            return await interrupt_and_reply(await RayPipeline.connect(settings), voice, reply)

        check_interrupt(asyncio.run(bounded(run())), voice, reply)

    def test_killed_replica_repins_its_session_and_spares_the_other(
        self, make_settings, speech_detector, caplog
    ):
        # D = 1 s: on the shared 2-core machine the replacement replica's start competes with
        # the bystander's replica for CPU (on a cluster it starts on another node)
        settings = make_settings(min_replicas=2, playout_delay_ms=1000)
        voice = np.concatenate([speech(PHRASE_A), speech(PHRASE_B)])

        async def run():
            pipeline = await RayPipeline.connect(settings)
            await ready_replicas(pipeline, 2)
            victim = await pipeline.create_session(session_id="victim")
            bystander = await pipeline.create_session(session_id="bystander")
            pinned = {s.session_id: s.replica for s in (victim, bystander)}
            rxs = [Receiver(victim), Receiver(bystander)]
            utts = [await s.push_audio(voice, "speech") for s in (victim, bystander)]
            await asyncio.sleep(victim.clock.presentation_time(utts[0].start_frame) + 1.0 - time.time())
            killed_at = time.time()
            ray.kill(ray.get_actor(pinned["victim"], namespace=settings.pipeline.namespace))
            received = [await rx.until_frame(u.end_frame + 3) for rx, u in zip(rxs, utts)]
            for rx in rxs:
                await rx.stop()
            stats = [victim.stats(), bystander.stats()]
            replicas = await pipeline.replicas()
            await pipeline.shutdown()
            return victim, bystander, pinned, utts, killed_at, received, stats, replicas

        victim, bystander, pinned, utts, killed_at, received, stats, replicas = asyncio.run(bounded(run()))
        assert pinned["victim"] != pinned["bystander"], "least-loaded placement spreads sessions"
        assert stats[0].replica != pinned["victim"], "the victim was re-pinned"
        assert len([r for r in caplog.records if "re-pinned" in r.getMessage()]) == 1  # once
        assert stats[1].replica == pinned["bystander"] and stats[1].frames_dropped == 0
        assert pinned["victim"] not in {r["replica"] for r in replicas}, "the dead replica is forgotten"
        assert len(replicas) == 2, "a replacement was started (min_replicas=2)"
        assert stats[0].drops["stage_unavailable"] + stats[0].drops["late"] == stats[0].frames_dropped

        for session, got, utt in zip((victim, bystander), received, utts):
            assert_clock(got, session)
            assert_audio_is(got, utt.start_frame, voice)  # audio is never lost, even by the victim
        expected = speech_frames(speech_detector, voice, utts[0].start_frame)
        after = [r for r in received[0] if r.frame.presentation_time > killed_at and r.frame.frame_index in expected]
        idle_after = [r for r in after if is_idle(victim, r.frame)]
        assert len(idle_after) <= 25, "at most 1 s of speech frames lost to the failure"
        assert len(after) - len(idle_after) > 25, "the victim keeps talking on its new replica"
        talking = {r.frame.frame_index for r in received[1] if not is_idle(bystander, r.frame)}
        expected_b = speech_frames(speech_detector, voice, utts[1].start_frame)
        assert talking <= expected_b and len(talking) >= 0.8 * len(expected_b)

    def test_connect_returns_with_a_ready_replica_so_the_first_session_is_warm(self, make_settings):
        """No cold start: connecting (a gateway's start) waits until a replica of the backend
        is ready (its stages answered, the default avatar loaded), so the first session is
        pinned at once."""
        settings = make_settings()

        async def run():
            pipeline = await RayPipeline.connect(settings)
            replicas = await pipeline.directory.replicas.remote()
            session = await pipeline.create_session()
            await pipeline.close_session(session.session_id)
            await pipeline.shutdown()
            return replicas, session

        replicas, session = asyncio.run(bounded(run()))
        ready = [r["replica"] for r in replicas if r["state"] == "ready"]
        assert ready and session.replica in ready, (replicas, session.replica)

    def test_bad_use_raises_typed_errors_quickly(self, make_settings):
        settings = make_settings(sessions_per_replica=1, max_replicas=1)

        async def run():
            pipeline = await RayPipeline.connect(settings)
            with pytest.raises(UnknownSession):
                pipeline.get("nope")
            first = await pipeline.create_session()
            with pytest.raises(AtCapacity, match="retry later"):
                await asyncio.wait_for(pipeline.create_session(), 20)
            await pipeline.close_session(first.session_id)
            with pytest.raises(SessionClosed):
                await first.push_audio(np.zeros(320, np.float32))
            with pytest.raises(UnknownSession):
                pipeline.get(first.session_id)
            second = await asyncio.wait_for(pipeline.create_session(), 20)  # the slot is free again
            await pipeline.shutdown()
            return second

        assert asyncio.run(bounded(run())).replica


# -- simulated GPU cluster -------------------------------------------------------------------


class TestSimulatedGpuCluster:
    @pytest.fixture(autouse=True, scope="class")
    def gpu_cluster(self, lipsync_home):
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        # 2 CPUs per GPU node: a 1-CPU node would let a small CPU actor (feature batcher)
        # block the GPU replica's num_cpus=1 there, and the replica would never start
        gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        ray.init(address=cluster.address, runtime_env=ray_env(lipsync_home), log_to_driver=False)
        cluster.wait_for_nodes()
        yield {node.node_id for node in gpu_nodes}
        ray.shutdown()
        cluster.shutdown()

    def test_replicas_on_gpu_nodes_spread_sessions_and_cap_them(self, gpu_cluster, make_settings):
        # both replicas are started at once (min_replicas=2) and the test waits until they are
        # ready: a replica's start on a busy 2-core machine is not what this test is about
        settings = make_settings(sessions_per_replica=1, min_replicas=2, replica_wait_s=3)
        voice = speech(PHRASE_A)

        async def run():
            pipeline = await RayPipeline.connect(settings)
            await until_ready(pipeline, 2)
            sessions = [await pipeline.create_session() for _ in range(2)]
            started = time.time()
            with pytest.raises(AtCapacity):
                await asyncio.wait_for(pipeline.create_session(), 20)
            refused_after = time.time() - started
            ns = settings.pipeline.namespace
            replica_nodes = {
                s.replica: await ray.get_actor(s.replica, namespace=ns).node_id.remote() for s in sessions
            }
            driver_node = ray.get_runtime_context().get_node_id()
            gen = generation_of(settings)
            compositor_nodes = {
                node: await ray.get_actor(f"compositor-{gen}-{node[:16]}", namespace=ns).node_id.remote()
                for node in replica_nodes.values()
            }
            rx = Receiver(sessions[0])
            utt = await sessions[0].push_audio(voice, "u")
            received = await rx.until_frame(utt.end_frame + 2)
            await rx.stop()
            replicas = await pipeline.replicas()
            await pipeline.shutdown()
            return driver_node, sessions, replica_nodes, compositor_nodes, refused_after, utt, received, replicas

        driver_node, sessions, replica_nodes, compositor_nodes, refused_after, utt, received, replicas = asyncio.run(
            bounded(run())
        )
        ready = [r for r in replicas if r["state"] == "ready"]
        assert len(ready) == 2 and all(r["resources"] == "gpu" for r in replicas)  # one per GPU
        pending = [r for r in replicas if r["state"] == "starting"]
        assert len(pending) == 1, "a third GPU replica is asked for (what makes an autoscaler add a node)"
        assert len(replica_nodes) == 2, "the two sessions are on different replicas"
        assert set(replica_nodes.values()) == gpu_cluster, "one replica on each GPU node"
        assert all(node == at for node, at in compositor_nodes.items()), "crops are composited where rendered"
        assert refused_after < 10
        assert any(not is_idle(sessions[0], r.frame) for r in received), "frames render on a GPU replica"
        assert_audio_is(received, utt.start_frame, voice)


    def test_killed_gpu_replica_is_replaced_on_the_freed_gpu(self, gpu_cluster, make_settings, speech_detector):
        settings = make_settings(playout_delay_ms=1000)
        ns = settings.pipeline.namespace
        voice = np.concatenate([speech(PHRASE_A), speech(PHRASE_B)])  # speech left after the replacement starts

        async def run():
            pipeline = await RayPipeline.connect(settings)
            session = await pipeline.create_session()
            before = session.replica
            ray.kill(ray.get_actor(before, namespace=ns))  # dies before the session speaks
            rx = Receiver(session)
            utt = await session.push_audio(voice, "u")
            received = await rx.until_frame(utt.end_frame + 2)
            await rx.stop()
            alive = [r["replica"] for r in await pipeline.replicas() if r["state"] == "ready"]
            nodes = {
                name: await asyncio.wait_for(ray.get_actor(name, namespace=ns).node_id.remote(), 60)
                for name in alive
            }
            after = session.replica
            await pipeline.shutdown()
            return session, before, after, utt, received, nodes

        session, before, after, utt, received, nodes = asyncio.run(bounded(run()))
        assert after != before and after in nodes
        assert before not in nodes and len(nodes) == 1, "the dead replica was replaced"
        assert set(nodes.values()) <= gpu_cluster, "the replacement runs on a GPU node"
        assert_audio_is(received, utt.start_frame, voice)
        expected = speech_frames(speech_detector, voice, utt.start_frame)
        idle = [r for r in received if r.frame.frame_index in expected and is_idle(session, r.frame)]
        # a lone replica killed for good: the gap is its replacement's start (~1.5 s measured on
        # the busy 2-core machine); with min_replicas >= 2 sessions move at once (test above)
        # (CI bound: 5 s; the replacement's start competes with the whole suite for 2 cores)
        assert len(idle) <= 125 and len(expected) - len(idle) > 10, "at most 5 s lost, then it talks"


# -- GPUs that join later ----------------------------------------------------------------------


class TestGpusJoinLater:
    @pytest.fixture(autouse=True, scope="class")
    def growing_cluster(self, lipsync_home):
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        ray.init(address=cluster.address, runtime_env=ray_env(lipsync_home), log_to_driver=False)
        yield cluster
        ray.shutdown()
        cluster.shutdown()

    def test_a_cpu_replica_is_replaced_by_a_gpu_replica_once_gpus_exist(self, growing_cluster, make_settings):
        settings = make_settings(replica_device="auto", idle_replica_s=1)

        async def run():
            pipeline = await RayPipeline.connect(settings)
            first = await pipeline.create_session()
            before = await pipeline.replicas()
            growing_cluster.add_node(num_cpus=2, num_gpus=1)
            growing_cluster.wait_for_nodes()
            second = await asyncio.wait_for(pipeline.create_session(), 60)
            await pipeline.close_session(first.session_id)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                after = await pipeline.replicas()
                if all(r["resources"] == "gpu" for r in after):
                    break
                await asyncio.sleep(0.5)
            await pipeline.shutdown()
            return first, second, before, after

        first, second, before, after = asyncio.run(bounded(run()))
        assert [r["resources"] for r in before] == ["cpu"] and "-cpu-" in first.replica
        assert "-gpu-" in second.replica, "new sessions go to GPU replicas once the cluster has GPUs"
        assert after and all(r["resources"] == "gpu" for r in after), "the drained CPU replica was removed"
