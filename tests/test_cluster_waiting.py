"""A session whose replica's node died while no replica has room waits, visibly, and resumes
when a replacement node joins: a real 3-node Ray cluster (`ray start` head + two workers that
declare one GPU each), at full capacity (one session per replica, at most two replicas)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from talker import Talker, until

ray = pytest.importorskip("ray")

from raycluster import LocalCluster, serving_cluster  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
BASE_PORT = 20400  # GCS; each node takes 30 ports from here (20400-20519)
HTTP_PORT = 20390
NAMESPACE = "waiting"


def serve_args(home: Path) -> dict[str, str]:
    return {
        "home": str(home),
        "serve.min_gateways": "1", "serve.max_gateways": "1",
        "serve.gateway_resources": '{"gateway": 1}',  # the gateway on the head, which survives
        "pipeline.namespace": NAMESPACE,
        # three simulated nodes share this machine's 2 cores: measured headroom (admission) would
        # rightly refuse the sessions these failover tests need; admission has its own tests
        "serve.admission.enabled": "false",
        "pipeline.sessions_per_replica": "1",
        "pipeline.max_replicas": "2",
        "pipeline.replica_device": "gpu",
        "pipeline.replica_wait_s": "2",
        "pipeline.playout_delay_ms": "400",
    }


@pytest.fixture(scope="module")
def cluster(lipsync_home):
    temp_dir = Path(f"/tmp/rlw{os.getpid()}")  # short: Ray's socket paths must stay < 108 chars
    env = {"RAY_LIPSYNC_HOME": str(lipsync_home), "PYTHONPATH": str(ROOT)}
    with serving_cluster(BASE_PORT, temp_dir, env, head_resources={"gateway": 1}, workers=["gpu_a", "gpu_b"],
                         http_port=HTTP_PORT, args=serve_args(lipsync_home)) as c:
        yield c


async def state_events(http: httpx.AsyncClient, talker: Talker, into: list) -> None:
    """Record the session's `session.state` events (server-sent events)."""
    token = talker.auth["Authorization"].split()[1]
    async with http.stream("GET", f"/v1/sessions/{talker.sid}/events?token={token}") as response:
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "session.state":
                into.append(json.loads(line[6:])["state"])


def node_of_replica(cluster: LocalCluster, replica: str):
    node_id = ray.get(ray.get_actor(replica, namespace=NAMESPACE).node_id.remote(), timeout=30)
    return next(n for n in cluster.nodes if n.name != "head" and n.node_id() == node_id)


def test_a_session_without_room_waits_visibly_and_resumes_when_a_node_joins(cluster):
    async def main():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{HTTP_PORT}", timeout=60) as http:
            talkers = []
            for _ in range(2):  # both replicas in use (the second starts for the second session)
                talkers.append(await until(lambda: _try_open(http), timeout=90, step=1.0))
                assert talkers[-1] is not None, "a session could not be created"
            watched = talkers[0]
            states: list[str] = []
            listener = asyncio.create_task(state_events(http, watched, states))
            await watched.say(25.0)
            await asyncio.sleep(2.0)
            before = await watched.state()
            victim = node_of_replica(cluster, before["replica"])
            victim.kill()  # it stays listed: its ports are not reused
            waiting = await until(lambda: _state_is(watched, "waiting_for_replica"), timeout=30)
            health = (await http.get("/healthz")).json()
            refused = (await http.post("/v1/sessions", json={})).status_code  # no room anywhere
            during = await watched.state()
            cluster.add_worker("gpu_c", num_cpus=2, num_gpus=1)  # a replacement node joins
            joined = time.monotonic()
            resumed = await until(lambda: _state_is(watched, "streaming"), timeout=90)
            resumed_s = time.monotonic() - joined
            sent = (await watched.state())["frames_sent"]
            speaking = await until(lambda: _talks_again(watched, during["frames_dropped"]), timeout=30)
            after = await watched.state()
            listener.cancel()
            for t in talkers:
                await t.close()
            return before, waiting, health, refused, during, resumed, resumed_s, sent, speaking, after, states

    before, waiting, health, refused, during, resumed, resumed_s, sent, speaking, after, states = asyncio.run(
        asyncio.wait_for(main(), 300))
    print(f"resumed {resumed_s:.1f} s after the node joined")
    assert waiting, "the session says it waits for a replica"
    assert health["status"] == "degraded" and any("waiting" in s for s in health["unavailable"]), health
    assert refused == 503, "no room: a new session is refused, not queued behind the waiting one"
    assert resumed, f"the session resumed once a node joined (state {after['state']})"
    assert after["replica"] != before["replica"] or after["state"] == "streaming"
    assert speaking and after["frames_sent"] > sent, "frames flow again"
    assert states[:2] == ["waiting_for_replica", "streaming"], states


async def _try_open(http: httpx.AsyncClient):
    try:
        return await Talker(http).open()
    except AssertionError:
        return None


async def _state_is(talker: Talker, state: str) -> bool:
    return (await talker.state())["state"] == state


async def _talks_again(talker: Talker, dropped_before: int) -> bool:
    """Speech frames render again: frames are sent while no more drops are counted."""
    first = await talker.state()
    await asyncio.sleep(1.0)
    second = await talker.state()
    return second["frames_sent"] > first["frames_sent"] and second["frames_dropped"] == first["frames_dropped"]
