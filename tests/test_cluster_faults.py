"""The Serve app on a real multi-node Ray cluster (`ray start` head + two workers that declare
one GPU each), configured only through Serve args, surviving the death of each process.

Every pipeline actor's process is killed mid-speech with SIGKILL by PID, then a whole worker
node (its raylet and everything under it). After each: speech frames resume (the frames lost
are counted by the session, with their reason), new sessions succeed, /metrics answers. A
gateway's death frees its sessions' replica slots within 10 s while the other gateway's
sessions do not notice. Capacity grows with sessions and shrinks back after they end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from talker import Talker, until

ray = pytest.importorskip("ray")

from actors.directory import generation_of, get_directory  # noqa: E402
from raycluster import serving_cluster  # noqa: E402
from ray_lipsync.settings_args import settings_from_args  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
BASE_PORT = 20100  # GCS; each node takes 30 ports from here (20100-20189)
HTTP_PORT = 20090
FRAME_S = 0.04
NAMESPACE = "faults"
# Worst speech gap accepted after a kill, in frames (measured bounds: benchmarks/README.md)
MAX_GAP_FRAMES = {"batcher": 25, "compositor": 25, "replica": 50, "node": 50}


def record(name: str, **figures: object) -> None:
    """Report a measured figure; benchmarks/failover.py collects them (LIPSYNC_FAILOVER_JSON)."""
    print(f"{name}: {figures}")
    path = os.environ.get("LIPSYNC_FAILOVER_JSON")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"case": name, **figures}) + "\n")


def serve_args(home: Path) -> dict[str, str]:
    """Settings given to the application builder the way `serve run serve_app:build k=v` does."""
    return {
        "home": str(home),
        "serve.min_gateways": "2", "serve.max_gateways": "2",
        "serve.gateway_resources": '{"gateway": 1}',  # gateways only on the head (like edge nodes)
        "pipeline.namespace": NAMESPACE,
        # three simulated nodes share this machine's 2 cores: measured headroom (admission) would
        # rightly refuse the sessions these failover tests need; admission has its own tests
        "serve.admission.enabled": "false",
        "pipeline.sessions_per_replica": "2",
        "pipeline.max_replicas": "2",
        "pipeline.replica_device": "gpu",
        "pipeline.idle_replica_s": "3",
        "pipeline.playout_delay_ms": "500",
    }


@pytest.fixture(scope="module")
def cluster(lipsync_home):
    temp_dir = Path(f"/tmp/rlc{os.getpid()}")  # short: Ray's socket paths must stay < 108 chars
    env = {"RAY_LIPSYNC_HOME": str(lipsync_home), "PYTHONPATH": str(ROOT)}
    with serving_cluster(BASE_PORT, temp_dir, env, head_resources={"gateway": 2}, workers=["gpu_a", "gpu_b"],
                         http_port=HTTP_PORT, args=serve_args(lipsync_home)) as c:
        yield c


@pytest.fixture(scope="module")
def settings(lipsync_home):
    return settings_from_args(serve_args(lipsync_home))


def url(path: str = "") -> str:
    return f"http://127.0.0.1:{HTTP_PORT}{path}"


def pid_of(name: str) -> int:
    return ray.get(ray.get_actor(name, namespace=NAMESPACE).pid.remote(), timeout=30)


def directory_replicas(settings) -> list[dict]:
    return ray.get(get_directory(settings).replicas.remote(), timeout=30)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


def test_serve_args_reach_every_replica_and_capacity_follows_sessions(cluster, settings):
    gen = generation_of(settings)

    async def main():
        async with httpx.AsyncClient(base_url=url(), timeout=60) as http:
            talkers = [await Talker(http).open() for _ in range(3)]
            states = [await t.state() for t in talkers]
            grown = directory_replicas(settings)
            # every gateway pushes its snapshot to the board each second (which gateway a new
            # session lands on also depends on how fast each answers the proxy's probe)
            gateways = await until(lambda: _gateways_on_the_board(http, 2), timeout=15)
            for t in talkers:
                await t.close()
            shrunk = await until(lambda: _one_replica(settings), timeout=30)
            return states, grown, shrunk, gateways

    states, grown, shrunk, gateways = run(main())
    # every gateway and every replica was built from the Serve args (their generation)
    assert all(f"replica-{gen}-procedural-gpu-" in s["replica"] for s in states)
    assert len(gateways) == 2 and {s["gateway"] for s in states} <= gateways, "serve.min_gateways=2 from the args"
    assert all(r["replica"].startswith(f"replica-{gen}-") and r["resources"] == "gpu" for r in grown)
    assert len([r for r in grown if r["state"] == "ready"]) == 2, "3 sessions at 2 per replica: 2 replicas"
    assert shrunk, "after the sessions ended the idle replica was removed (min_replicas=1)"


async def _gateways_on_the_board(http, count: int) -> set[str]:
    """The gateways /metrics reports (from the metrics board) once there are `count`; else
    an empty set."""
    metrics = (await http.get("/metrics")).text
    gateways = set(re.findall(r'^lipsync_sessions\{replica="([^"]+)"\}', metrics, re.M))
    return gateways if len(gateways) >= count else set()


async def _one_replica(settings) -> bool:
    return len(directory_replicas(settings)) == 1


def kill_stage(stage: str, settings, state: dict) -> None:
    gen = generation_of(settings)
    if stage == "batcher":
        name = f"batcher-{gen}-procedural"
    elif stage == "replica":
        name = state["replica"]
    else:
        node = ray.get(ray.get_actor(state["replica"], namespace=NAMESPACE).node_id.remote(), timeout=30)
        name = f"compositor-{gen}-{node[:16]}"
    os.kill(pid_of(name), signal.SIGKILL)


@pytest.mark.parametrize("stage", ["batcher", "compositor", "replica"])
def test_speech_resumes_after_a_pipeline_process_is_killed(cluster, settings, stage):
    async def main():
        async with httpx.AsyncClient(base_url=url(), timeout=60) as http:
            talkers = [await Talker(http).open() for _ in range(2)]  # 2 replicas when both talk
            await until(lambda: _ready_replicas(settings, 2), timeout=60)
            ends = [await t.say(8.0) for t in talkers]
            await asyncio.sleep(3.0)
            before = await talkers[0].state()
            kill_stage(stage, settings, before)
            created = await Talker(http).open()  # a new session works right after the kill
            await asyncio.sleep(max(ends) - time.monotonic())
            after = [await t.state() for t in talkers]
            healthy = await until(lambda: _healthy(http), timeout=30)
            metrics = (await http.get("/metrics")).status_code
            for t in [*talkers, created]:
                await t.close()
            return before, after, healthy, metrics

    before, after, healthy, metrics = run(main())
    gap = after[0]["frames_dropped"] - before["frames_dropped"]
    record(f"kill {stage}", speech_frames_lost=gap, gap_ms=round(gap * FRAME_S * 1000),
           drops=after[0]["drops"])
    assert gap <= MAX_GAP_FRAMES[stage], after[0]["drops"]
    assert after[0]["frames_sent"] > before["frames_sent"] + 100, "the session kept streaming"
    assert healthy and metrics == 200


async def _ready_replicas(settings, n: int) -> bool:
    return len([r for r in directory_replicas(settings) if r["state"] == "ready"]) >= n


async def _healthy(http: httpx.AsyncClient) -> bool:
    return (await http.get("/healthz")).status_code == 200


def test_directory_and_metrics_board_deaths_are_survived(cluster, settings):
    async def main():
        async with httpx.AsyncClient(base_url=url(), timeout=60) as http:
            talker = await Talker(http).open()
            end = await talker.say(6.0)
            await asyncio.sleep(2.0)
            before = await talker.state()
            os.kill(pid_of(f"lipsync-directory-{generation_of(settings)}"), signal.SIGKILL)
            os.kill(ray.get(ray.get_actor("ray_lipsync_metrics", namespace=NAMESPACE).pid.remote(), timeout=30), signal.SIGKILL)
            metrics = (await http.get("/metrics")).status_code  # answers while the board restarts
            started = time.monotonic()
            created = await Talker(http).open()  # the directory restarted and re-adopted its replicas
            create_s = time.monotonic() - started
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            after = await talker.state()
            pins = await until(lambda: _pinned(settings, 2), timeout=15)  # leases rebuilt the pins
            for t in (talker, created):
                await t.close()
            return before, after, metrics, create_s, pins

    before, after, metrics, create_s, pins = run(main())
    record("kill directory + metrics board", speech_frames_lost=after["frames_dropped"] - before["frames_dropped"],
           new_session_after_s=round(create_s, 2))
    assert metrics == 200
    assert after["frames_dropped"] == before["frames_dropped"], "streaming never needs the directory"
    assert create_s < 30 and pins


async def _pinned(settings, n: int) -> bool:
    return sum(r["sessions"] for r in directory_replicas(settings)) == n


def gateway_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [""])[0].startswith("ray::ServeReplica:ray-lipsync:Gateway")]


def test_a_dead_gateway_frees_its_slots_and_the_other_gateway_does_not_notice(cluster, settings):
    async def main():
        async with httpx.AsyncClient(base_url=url(), timeout=60) as http:
            talkers = []
            while len({t.sid.split(".")[0] for t in talkers}) < 2 and len(talkers) < 6:
                talkers.append(await Talker(http).open())  # new sessions spread over both gateways
            ends = [await t.say(6.0) for t in talkers]
            await asyncio.sleep(1.5)
            before = {t.sid: await t.state() for t in talkers}
            victim_pid = gateway_pids()[0]
            os.kill(victim_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.sleep(1.0)
            alive = {}
            for t in talkers:
                r = await http.get(f"/v1/sessions/{t.sid}", headers=t.auth)
                alive[t.sid] = r.status_code == 200
            survivors = [t for t in talkers if alive[t.sid]]
            freed = await until(lambda: _pinned(settings, len(survivors)), timeout=15)
            freed_s = time.monotonic() - killed_at
            await asyncio.sleep(max(0.0, max(ends) - time.monotonic()))
            after = {t.sid: await t.state() for t in survivors}
            for t in talkers:
                await t.close()
            return before, alive, after, freed, freed_s

    before, alive, after, freed, freed_s = run(main())
    record("kill gateway", slots_freed_after_s=round(freed_s, 2),
           other_gateway_frames_lost=sum(after[s]["frames_dropped"] - before[s]["frames_dropped"] for s in after))
    assert 0 < sum(alive.values()) < len(alive), "exactly one gateway's sessions ended"
    assert freed and freed_s <= 10, f"the dead gateway's slots were freed after {freed_s:.1f} s"
    for sid, state in after.items():
        assert state["frames_dropped"] == before[sid]["frames_dropped"], "the other gateway did not notice"


def test_a_dead_worker_node_is_survived(cluster, settings):
    async def main():
        async with httpx.AsyncClient(base_url=url(), timeout=60) as http:
            talkers = [await Talker(http).open() for _ in range(2)]
            await until(lambda: _ready_replicas(settings, 2), timeout=60)
            ends = {t.sid: await t.say(10.0) for t in talkers}
            await asyncio.sleep(3.0)
            # the victim: a worker holding a talker's replica but no gateway (a gateway replaced
            # after the gateway test may have landed on a worker; its sessions would end)
            states = [await t.state() for t in talkers]
            choice = None
            for talker, state in zip(talkers, states):
                node_id = ray.get(ray.get_actor(state["replica"], namespace=NAMESPACE).node_id.remote(), timeout=30)
                node = next(n for n in cluster.nodes if n.name != "head" and n.node_id() == node_id)
                if not _hosts_gateway(node):
                    choice = (talker, state, node)
                    break
            assert choice is not None, "every replica's node also hosts a gateway"
            watched, before, victim = choice
            killed = victim.kill()
            await asyncio.sleep(max(0.0, ends[watched.sid] - time.monotonic()))
            after = await watched.state()
            for t in talkers:  # one GPU node is left (2 slots): free the other talker's slot
                if t is not watched:
                    await t.close()
            started = time.monotonic()
            created = await until(lambda: _try_create(http), timeout=60, step=1.0)
            create_s = time.monotonic() - started
            metrics = (await http.get("/metrics")).status_code
            await watched.close()
            if created:
                await created.close()
            return before, after, killed, created, create_s, metrics

    before, after, killed, created, create_s, metrics = run(main())
    gap = after["frames_dropped"] - before["frames_dropped"]
    record("kill worker node", processes_killed=killed, speech_frames_lost=gap,
           gap_ms=round(gap * FRAME_S * 1000), new_session_after_s=round(create_s, 2))
    assert killed >= 2 and gap <= MAX_GAP_FRAMES["node"], after["drops"]
    assert after["replica"] != before["replica"], "the session moved off the dead node"
    assert created is not None and metrics == 200


def _hosts_gateway(node) -> bool:
    return any((p.cmdline() or [""])[0].startswith("ray::ServeReplica:ray-lipsync:Gateway")
               for p in node.processes() if p.is_running())


async def _try_create(http: httpx.AsyncClient):
    try:
        return await Talker(http).open()
    except AssertionError:
        return None
