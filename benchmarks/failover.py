"""Failover under load: speech lost when pipeline processes die while sessions talk.

    python benchmarks/failover.py [--kills 5] [--sessions 4] [--json benchmarks/results/failover.json]

Two deployments, both real:

- **cluster**: a multi-node Ray cluster on this machine (tests/raycluster.py: `ray start` head
  + two workers that declare one GPU each), the Serve app configured through Serve args (two
  gateways on the head, two inference replicas with room for every session). N WebRTC
  sessions (tests/talker.py) talk without pause. Each stage is killed `--kills` times with
  SIGKILL by PID: the feature batcher, the compositor on the node of session 0's replica,
  session 0's replica (the other has room), that replica's whole worker node (a replacement
  node joins after each kill's window), and a gateway (its sessions end; how soon their slots free).
- **server**: `ray-lipsync serve` (one node, the defaults) with N talking sessions; all its
  pipeline processes (directory, metrics board, feature batcher, replica, compositor) are
  killed at once, `--kills` times.

Per kill, every session's `frames_dropped` is read before the kill and after recovery (the
service healthy again, plus 2 s); speech lost = the largest increase over the sessions (frames
of 40 ms), with the drop reasons. A quiet window of the same length ("no kill") measures what
the load alone drops. Reported: median and worst per case, each kill's figures, the commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from output import git_commit, machine_speed  # noqa: E402
from raycluster import LocalCluster, serving_cluster  # noqa: E402
from talker import Talker  # noqa: E402

BASE_PORT = 21100  # cluster: GCS; each node takes 30 ports from here
CLUSTER_HTTP = 21090
SERVER_HTTP = 21095
NAMESPACE = "failover"
SETTLE_S = 2.0  # after the service is healthy again, before reading the sessions
QUIET_S = 6.0  # the no-kill window
HEAL_WAIT_S = 10.0  # a window ends this long after the kill if /healthz is still 503 (a node
# kill: its replica stays missing until a replacement node joins, after the window)
TOP_UP_S = 10.0  # each session keeps at least this much speech queued


def cluster_args(home: Path, sessions: int) -> dict[str, str]:
    return {
        "home": str(home),
        "serve.min_gateways": "2", "serve.max_gateways": "2",
        "serve.gateway_resources": '{"gateway": 1}',
        "pipeline.namespace": NAMESPACE,
        "pipeline.sessions_per_replica": str(sessions),
        "pipeline.min_replicas": "2", "pipeline.max_replicas": "2",
        "pipeline.replica_device": "gpu",
        # three simulated nodes on this machine's 2 cores: admission would (rightly) refuse the
        # sessions this benchmark needs; what it measures is failover
        "serve.admission.enabled": "false",
    }


class Load:
    """N talking sessions and what they dropped."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.talkers: list[Talker] = []
        self._feeder: asyncio.Task | None = None

    async def open(self, n: int) -> None:
        while len(self.talkers) < n:
            self.talkers.append(await Talker(self.http).open())
        if self._feeder is None:
            self._feeder = asyncio.create_task(self._feed())

    async def _feed(self) -> None:
        while True:
            for talker in list(self.talkers):
                try:
                    state = await talker.state()
                    if state["queued_audio_s"] < TOP_UP_S:
                        await talker.say(2 * TOP_UP_S)
                except (AssertionError, httpx.HTTPError, RuntimeError):
                    pass  # its gateway died (it is replaced), or the load is closing
            await asyncio.sleep(1.0)

    async def states(self) -> dict[str, dict]:
        out = {}
        for talker in self.talkers:
            try:
                out[talker.sid] = await talker.state()
            except (AssertionError, httpx.HTTPError):
                pass
        return out

    async def close(self) -> None:
        if self._feeder is not None:
            self._feeder.cancel()
        for talker in self.talkers:
            try:
                await talker.close()
            except Exception:  # noqa: BLE001
                pass


def lost(before: dict[str, dict], after: dict[str, dict]) -> dict:
    """Speech frames dropped between two readings: the worst session, with its reasons."""
    worst, reasons = 0, {}
    for sid, state in after.items():
        if sid not in before:
            continue
        gap = state["frames_dropped"] - before[sid]["frames_dropped"]
        if gap >= worst:
            worst = gap
            reasons = {k: v - before[sid]["drops"].get(k, 0) for k, v in state["drops"].items()
                       if v - before[sid]["drops"].get(k, 0)}
    return {"frames": worst, "ms": worst * 40, "reasons": reasons}


async def until(predicate, timeout: float, step: float = 0.2) -> float | None:
    """Seconds until `predicate()` is true, None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(step)
    return None


async def healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


def pids(prefix: str) -> list[int]:
    """PIDs of processes whose title starts with `prefix` (Ray names them ray::Class)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or [""]
        if cmd and cmd[0].startswith(prefix):
            found.append(proc.pid)
    return found


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU time (user + system) of every process now: pid -> (title, seconds)."""
    out = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd, times = proc.info["cmdline"], proc.info["cpu_times"]
        if cmd and times is not None:
            title = Path(cmd[0]).name
            if title.startswith("ray::"):  # ray::Class.method while a call runs: by class
                title = title.split(".")[0]
            out[proc.pid] = (title[:48], times.user + times.system)
    return out


def cpu_spent(before: dict[int, tuple[str, float]], top: int = 8) -> dict[str, float]:
    """The processes that used the most CPU since `before` (seconds, by title; the window's
    new processes count from zero)."""
    spent: dict[str, float] = {}
    for pid, (title, seconds) in cpu_seconds().items():
        used = seconds - before.get(pid, (title, 0.0))[1]
        spent[title] = spent.get(title, 0.0) + used
    return {t: round(v, 2) for t, v in sorted(spent.items(), key=lambda kv: -kv[1])[:top]}


def summary(kills: list[dict]) -> dict:
    frames = [k["frames"] for k in kills]
    return {"kills": len(frames), "median_frames": statistics.median(frames) if frames else None,
            "worst_frames": max(frames) if frames else None, "each": kills}


# -- cluster -----------------------------------------------------------------------------------


CLUSTER_CASES = ("no kill", "batcher", "compositor", "replica", "worker node", "gateway")


async def cluster_cases(cluster: LocalCluster, settings, kills: int, sessions: int,
                        cases: tuple[str, ...] = CLUSTER_CASES) -> dict:
    import ray

    from actors.directory import generation_of, get_directory

    gen = generation_of(settings)
    directory = get_directory(settings)
    results: dict[str, dict] = {}
    spare = iter(range(100))

    def actor_pid(name: str) -> int:
        deadline = time.monotonic() + 60
        while True:  # a stage killed just before may still be restarting
            try:
                return ray.get(ray.get_actor(name, namespace=NAMESPACE).pid.remote(), timeout=30)
            except ray.exceptions.RayError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def actor_node(name: str) -> str:
        return ray.get(ray.get_actor(name, namespace=NAMESPACE).node_id.remote(), timeout=30)

    async def replicas_ready(n: int) -> bool:
        return len([r for r in ray.get(directory.replicas.remote(), timeout=30) if r["state"] == "ready"]) >= n

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{CLUSTER_HTTP}", timeout=60) as http:
        load = Load(http)
        await until(lambda: replicas_ready(2), 120)
        await load.open(sessions)
        await asyncio.sleep(5.0)  # past the sessions' first seconds

        restores: list = []  # what a kill took away, given back after its window

        async def one(kill) -> dict:
            before = await load.states()
            cpu = cpu_seconds()
            killed = time.monotonic()
            what = kill(before)
            recovered = await until(lambda: healthy(http), HEAL_WAIT_S)
            await asyncio.sleep(max(SETTLE_S, QUIET_S - (time.monotonic() - killed)))
            figures = {**lost(before, await load.states()), "killed": what,
                       "healthy_after_s": None if recovered is None else round(recovered, 2),
                       "window_s": round(time.monotonic() - killed, 1), "cpu_s": cpu_spent(cpu)}
            print(f"  {figures}", flush=True)
            for restore in restores:  # after the window: capacity for the next kill
                restore()
            restores.clear()
            await until(lambda: replicas_ready(2), 90)
            return figures

        def session0(before: dict) -> dict:
            return before[load.talkers[0].sid]

        def kill_batcher(before):
            pid = actor_pid(f"batcher-{gen}-procedural")
            os.kill(pid, signal.SIGKILL)
            return "batcher"

        def kill_compositor(before):
            node = actor_node(session0(before)["replica"])
            os.kill(actor_pid(f"compositor-{gen}-{node[:16]}"), signal.SIGKILL)
            return "compositor"

        def kill_replica(before):
            os.kill(actor_pid(session0(before)["replica"]), signal.SIGKILL)
            return "replica"

        def kill_node(before):
            node_id = actor_node(session0(before)["replica"])
            victim = next(n for n in cluster.nodes if n.name != "head" and n.node_id() == node_id)
            count = victim.kill()  # it stays listed: its ports are not reused
            # A replacement node joins after the window: on a real cluster its start costs a
            # new machine's CPU, here it would cost the two cores the sessions run on.
            restores.append(lambda: cluster.add_worker(f"gpu_{next(spare)}", num_cpus=2, num_gpus=1))
            return f"node ({count} processes)"

        def quiet(before):
            return "none"

        for case, kill in (("no kill", quiet), ("batcher", kill_batcher), ("compositor", kill_compositor),
                           ("replica", kill_replica), ("worker node", kill_node)):
            if case not in cases:
                continue
            print(f"{case}:", flush=True)
            results[case] = summary([await one(kill) for _ in range(kills)])

        if "gateway" not in cases:
            await load.close()
            return results
        print("gateway:", flush=True)
        freed = []
        for _ in range(kills):
            gateways = pids("ray::ServeReplica:ray-lipsync:Gateway")
            os.kill(gateways[0], signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.sleep(1.0)
            alive = await load.states()
            load.talkers = [t for t in load.talkers if t.sid in alive]
            pinned = lambda: _pinned(directory, len(load.talkers))  # noqa: E731
            seconds = await until(pinned, 30)
            figures = {"slots_free_after_s": None if seconds is None else round(1.0 + seconds, 2),
                       "sessions_ended": sessions - len(load.talkers)}
            print(f"  {figures}", flush=True)
            freed.append(figures)
            await until(lambda: healthy(http), 60)
            await until(lambda: _gateways(2), 60)
            await load.open(sessions)
            del killed
        free_s = [f["slots_free_after_s"] for f in freed if f["slots_free_after_s"] is not None]
        results["gateway"] = {"kills": len(freed), "median_slots_free_s": statistics.median(free_s) if free_s else None,
                              "worst_slots_free_s": max(free_s) if free_s else None,
                              "not_freed": len(freed) - len(free_s), "each": freed}
        await load.close()
    return results


async def _pinned(directory, n: int) -> bool:
    import ray

    return sum(r["sessions"] for r in ray.get(directory.replicas.remote(), timeout=30)) == n


async def _gateways(n: int) -> bool:
    return len(pids("ray::ServeReplica:ray-lipsync:Gateway")) >= n


def run_cluster(home: Path, kills: int, sessions: int, cases: tuple[str, ...] = CLUSTER_CASES) -> dict:
    from ray_lipsync.settings_args import settings_from_args

    args = cluster_args(home, sessions)
    env = {"RAY_LIPSYNC_HOME": str(home), "PYTHONPATH": str(ROOT)}
    with serving_cluster(BASE_PORT, Path(f"/tmp/rfo{os.getpid()}"), env, head_resources={"gateway": 2},
                         workers=["gpu_a", "gpu_b"], http_port=CLUSTER_HTTP, args=args) as cluster:
        return asyncio.run(cluster_cases(cluster, settings_from_args(args), kills, sessions, cases))


# -- one server ----------------------------------------------------------------------------------

PIPELINE_TITLES = ("ray::SessionDirectory", "ray::MetricsBoard", "ray::FeatureBatcherActor",
                   "ray::InferenceReplica", "ray::CompositorActor")


async def server_case(kills: int, sessions: int) -> dict:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{SERVER_HTTP}", timeout=60) as http:
        load = Load(http)
        await load.open(sessions)
        await asyncio.sleep(5.0)
        each = []
        for _ in range(kills):
            before = await load.states()
            cpu = cpu_seconds()
            victims = [pid for title in PIPELINE_TITLES for pid in pids(title)]
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            recovered = await until(lambda: healthy(http), 60)
            await asyncio.sleep(SETTLE_S)
            figures = {**lost(before, await load.states()), "processes_killed": len(victims),
                       "healthy_after_s": None if recovered is None else round(recovered, 2),
                       "cpu_s": cpu_spent(cpu)}
            print(f"  {figures}", flush=True)
            each.append(figures)
            await asyncio.sleep(3.0)
        await load.close()
    return summary(each)


def run_server(home: Path, kills: int, sessions: int, standby: str) -> dict:
    config = home / "server-settings.json"
    config.write_text(json.dumps({"pipeline": {"standby": standby},  # failover, not admission
                                  "serve": {"admission": {"enabled": False}}}))
    cmd = [str(Path(sys.executable).with_name("ray-lipsync")), "--home", str(home), "--config", str(config),
           "serve", "--port", str(SERVER_HTTP)]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{SERVER_HTTP}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("ray-lipsync serve did not come up")
            time.sleep(0.5)
        return asyncio.run(server_case(kills, sessions))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="kills per case")
    parser.add_argument("--sessions", type=int, default=4, help="talking sessions")
    parser.add_argument("--only", choices=("cluster", "server"), help="run one deployment")
    parser.add_argument("--cases", default=",".join(CLUSTER_CASES),
                        help=f"cluster: the cases to run, comma-separated (of {', '.join(CLUSTER_CASES)})")
    parser.add_argument("--standby", choices=("auto", "on", "off"), default="auto",
                        help="server: the gateways' standby engine (pipeline.standby)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "failover.json")
    args = parser.parse_args()
    cases = tuple(c.strip() for c in args.cases.split(","))
    if unknown := set(cases) - set(CLUSTER_CASES):
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    from ray_lipsync.avatar.default import load_or_prepare
    from ray_lipsync.avatar.store import AvatarStore
    from ray_lipsync.config import Settings

    result = {"benchmark": "failover", "commit": git_commit(), "machine": machine_speed(),
              "sessions": args.sessions, "kills": args.kills,
              "cpus": os.cpu_count(), "server_standby": args.standby}
    with tempfile.TemporaryDirectory(prefix="failover-") as tmp:
        home = Path(tmp)
        load_or_prepare(AvatarStore(Settings(home=home).avatars_dir), "default", Settings(home=home).avatar)
        if args.only in (None, "server"):
            print("server: all pipeline processes at once", flush=True)
            result["server"] = run_server(home, args.kills, args.sessions, args.standby)
        if args.only in (None, "cluster"):
            result["cluster"] = run_cluster(home, args.kills, args.sessions, cases)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for section in ("server", "cluster"):
        cases = result.get(section, {})
        if "kills" in cases:
            cases = {"all pipeline processes": cases}
        for case, figures in cases.items():
            shown = {k: v for k, v in figures.items() if k != "each"}
            print(f"{section:8s} {case:24s} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
