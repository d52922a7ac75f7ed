"""A real multi-node Ray cluster on this machine: `ray start` processes, every port explicit.

Each node is its own `ray start` (a head, then workers joining it); all nodes and the driver
share one `RAY_AUTH_MODE` (Ray 2.60's `ray start --head` turns token auth on when
`~/.ray/auth_token` exists, `ray start --address` does not, and the join would fail). A node
is stopped by killing its raylet and every process below it (SIGKILL, by PID), as a machine
that dies would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from actors.runtime import PIPELINE_RAY_ENV

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Node:
    name: str
    node_manager_port: int
    args: list[str] = field(default_factory=list)

    def raylet(self) -> psutil.Process | None:
        flag = f"--node_manager_port={self.node_manager_port}"
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if cmd and cmd[0].endswith("raylet") and flag in cmd:
                return proc
        return None

    def node_id(self) -> str | None:
        """The Ray node id of this node (None once its raylet is gone)."""
        raylet = self.raylet()
        if raylet is None:
            return None
        for arg in raylet.cmdline():
            if arg.startswith("--node_id="):
                return arg.split("=", 1)[1]
        return None

    def processes(self) -> list[psutil.Process]:
        raylet = self.raylet()
        return [] if raylet is None else [raylet, *raylet.children(recursive=True)]

    def kill(self) -> int:
        """SIGKILL the node's raylet and everything under it; the number of processes killed."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return len(procs)


class LocalCluster:
    """Head + workers started with `ray start`, ports from `base` upwards (30 per node)."""

    def __init__(self, base_port: int, temp_dir: Path, env: dict[str, str]) -> None:
        self.base = base_port
        self.temp_dir = temp_dir
        self.env = {**os.environ, **PIPELINE_RAY_ENV, "RAY_AUTH_MODE": "disabled", **env}
        self.nodes: list[Node] = []
        self.address = f"127.0.0.1:{base_port}"

    def _ports(self, index: int) -> list[str]:
        p = self.base + 30 * index
        return [
            f"--node-manager-port={p + 1}", f"--object-manager-port={p + 2}",
            f"--runtime-env-agent-port={p + 3}", f"--dashboard-agent-grpc-port={p + 4}",
            f"--dashboard-agent-listen-port={p + 5}", f"--metrics-export-port={p + 6}",
            f"--min-worker-port={p + 10}", f"--max-worker-port={p + 29}",
        ]

    def _start(self, name: str, args: list[str]) -> Node:
        index = len(self.nodes)
        cmd = [RAY, "start", *args, *self._ports(index), "--disable-usage-stats"]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{out.stdout}\n{out.stderr}")
        node = Node(name, self.base + 30 * index + 1, args)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: float, resources: dict[str, float] | None = None) -> Node:
        return self._start("head", [
            "--head", f"--port={self.base}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(resources or {})}",
            f"--ray-client-server-port={self.base + 7}", f"--dashboard-port={self.base + 8}",
            "--include-dashboard=false", f"--temp-dir={self.temp_dir}",
        ])

    def add_worker(self, name: str, num_cpus: float, num_gpus: int) -> Node:
        return self._start(name, [
            f"--address={self.address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
            f"--resources={json.dumps({name: 1})}",
        ])

    def shutdown(self) -> None:
        """Kill every node (workers first), then anything left of this cluster's processes,
        and wait (together) until they are gone."""
        for node in reversed(self.nodes):
            node.kill()
        gcs = f":{self.base}"  # the head's Ray client server names it by the node's IP
        left = []
        for proc in psutil.process_iter(["cmdline"]):
            args = proc.info["cmdline"] or []
            if any(str(self.temp_dir) in arg or arg.endswith(gcs) for arg in args):
                try:
                    proc.send_signal(signal.SIGKILL)
                    left.append(proc)
                except psutil.NoSuchProcess:
                    pass
        psutil.wait_procs(left, timeout=10)


@contextmanager
def serving_cluster(base_port: int, temp_dir: Path, env: dict[str, str], *, head_resources: dict[str, float],
                    workers: list[str], http_port: int, args: dict[str, str]) -> Iterator[LocalCluster]:
    """A `ray start` head (1 CPU) + `workers` (2 CPUs and one declared GPU each, named), this
    process connected as the driver, Serve on `http_port` running the app built from the
    Serve `args` (as `serve run serve_app:build k=v` would); everything stopped afterwards."""
    import ray
    from ray import serve

    import serve_app

    cluster = LocalCluster(base_port, temp_dir, env)
    saved = {k: os.environ.get(k) for k in cluster.env if k.startswith("RAY_")}
    os.environ.update({k: v for k, v in cluster.env.items() if k.startswith("RAY_")})  # the driver agrees
    try:
        cluster.start_head(num_cpus=1, resources=head_resources)
        for name in workers:
            cluster.add_worker(name, num_cpus=2, num_gpus=1)
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(serve_app.build(args), name="ray-lipsync", route_prefix="/")
        yield cluster
    finally:
        # no serve.shutdown(): it drains every replica gracefully (seconds per gateway, more
        # with a dead node) only for the processes to be killed next
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
