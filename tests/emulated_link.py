"""A client host behind an emulated network link, on this machine (root, Linux).

`EmulatedLink` makes a network namespace (the client host) and joins it to this namespace by a
point-to-point wire of two TUN devices, one on each side, that a relay thread in this process
bridges. What the server sends to the client is shaped on the way:

- rate: the kernel's token bucket filter (`tc qdisc ... tbf`) on the server side's device, as a
  slow access link with a bounded queue would (packets beyond its `latency` are dropped);
- loss and delay with jitter: the relay, which drops each packet with the given probability and
  holds each for `delay_ms` +- `jitter_ms` (uniform), keeping the order (a queue, not reordering).
  `tc netem` would do both, but this machine's kernel has no netem (`tc qdisc add ... netem`:
  "Specified qdisc kind is unknown"; tbf and htb are there).

The client's packets to the server pass unshaped. Programs run in the client host with
`link.command(...)` (`ip netns exec NAME ...`); they reach the server at `link.server_ip`.

    with EmulatedLink() as link:
        link.shape(rate_kbit=300)
        subprocess.run(link.command(["curl", f"http://{link.server_ip}:8000/healthz"]))
        link.shape(rate_kbit=1000, loss=0.02)
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import logging
import os
import random
import select
import shutil
import struct
import subprocess
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Shape:
    """One link condition, server -> client."""

    rate_kbit: int | None = None
    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    queue_ms: int = 300  # tbf: packets that would wait longer than this are dropped


def unavailable() -> str | None:
    """Why an emulated link cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's `{tool}` (apt-get install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    probe = f"rlsprobe{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot make a network namespace here: {exc.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class EmulatedLink:
    """A client network namespace behind a shaped wire (see the module docstring)."""

    def __init__(self, seed: int = 1) -> None:
        tag = os.getpid() % 100000
        self.netns = f"rls{tag}"
        self._server_dev, self._client_dev = f"rls{tag}s", f"rls{tag}c"
        subnet = 10 + tag % 200
        self.server_ip, self.client_ip = f"10.77.{subnet}.1", f"10.77.{subnet}.2"
        self._shape = Shape()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fds: list[int] = []
        self.relayed = self.lost = 0

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as run inside the client host."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def shape(self, rate_kbit: int | None = None, loss: float = 0.0, delay_ms: float = 0.0,
              jitter_ms: float = 0.0, queue_ms: int = 300) -> None:
        """Set the server -> client condition (takes effect at once)."""
        if not 0.0 <= loss < 1.0 or delay_ms < 0 or jitter_ms < 0 or jitter_ms > delay_ms:
            raise ValueError("loss in [0, 1), 0 <= jitter_ms <= delay_ms")
        self._shape = Shape(rate_kbit, loss, delay_ms, jitter_ms, queue_ms)
        if rate_kbit is None:
            subprocess.run(["tc", "qdisc", "del", "dev", self._server_dev, "root"], capture_output=True)
        else:
            burst = max(4_000, rate_kbit * 1000 // 8 // 50)  # 20 ms at the rate, at least 4 KB
            _run("tc", "qdisc", "replace", "dev", self._server_dev, "root", "tbf", "rate", f"{rate_kbit}kbit",
                 "burst", str(burst), "latency", f"{queue_ms}ms")

    def __enter__(self) -> EmulatedLink:
        try:
            _run("ip", "netns", "add", self.netns)
            _run("ip", "-n", self.netns, "link", "set", "lo", "up")
            _run("ip", "tuntap", "add", "dev", self._server_dev, "mode", "tun")
            _run("ip", "-n", self.netns, "tuntap", "add", "dev", self._client_dev, "mode", "tun")
            server_fd = _attach(self._server_dev, None)
            client_fd = _attach(self._client_dev, self.netns)
            self._fds = [server_fd, client_fd]
            _run("ip", "addr", "add", self.server_ip, "peer", self.client_ip, "dev", self._server_dev)
            _run("ip", "link", "set", self._server_dev, "up")
            _run("ip", "-n", self.netns, "addr", "add", self.client_ip, "peer", self.server_ip, "dev", self._client_dev)
            _run("ip", "-n", self.netns, "link", "set", self._client_dev, "up")
        except BaseException:
            self._teardown()
            raise
        self._threads = [
            threading.Thread(target=self._relay, args=(server_fd, client_fd, True), name="link-down", daemon=True),
            threading.Thread(target=self._relay, args=(client_fd, server_fd, False), name="link-up", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self._teardown()

    def _teardown(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        subprocess.run(["ip", "link", "del", self._server_dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)

    def _relay(self, src: int, dst: int, shaped: bool) -> None:
        """Move packets src -> dst; on the shaped direction drop and delay them as `shape` says."""
        held: list[tuple[float, int, bytes]] = []  # (due, order, packet)
        order = 0
        last_due = 0.0
        while not self._stop.is_set():
            timeout = 0.05 if not held else max(0.0, held[0][0] - time.monotonic())
            readable, _, _ = select.select([src], [], [], timeout)
            now = time.monotonic()
            if readable:
                packet = os.read(src, 65_535)
                shape = self._shape
                if shaped and shape.loss and self._rng.random() < shape.loss:
                    self.lost += 1
                elif shaped and shape.delay_ms:
                    delay = shape.delay_ms + self._rng.uniform(-shape.jitter_ms, shape.jitter_ms)
                    last_due = max(last_due, now + delay / 1000)  # jitter without reordering
                    heapq.heappush(held, (last_due, order, packet))
                    order += 1
                else:
                    self._write(dst, packet)
            while held and held[0][0] <= time.monotonic():
                self._write(dst, heapq.heappop(held)[2])

    def _write(self, fd: int, packet: bytes) -> None:
        try:
            os.write(fd, packet)
            self.relayed += 1
        except OSError as exc:  # the device went down while tearing down
            log.debug("link: write failed: %s", exc)


def _attach(device: str, netns: str | None) -> int:
    """Open the TUN device `device` (in network namespace `netns`, None: this one)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY) if netns else -1
    try:
        if netns:
            target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(target, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
            finally:
                os.close(target)
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", device.encode(), _IFF_TUN | _IFF_NO_PI))
        return fd
    finally:
        if netns:
            libc.setns(own, _CLONE_NEWNET)
            os.close(own)
