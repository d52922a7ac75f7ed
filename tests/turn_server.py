"""A real coturn TURN server for tests: `use-auth-secret` on loopback, explicit ports.

    with CoturnServer(tmp_path, secret="...", port=18478, relay_ports=(18500, 18599)) as turn:
        turn.url  # "turn:127.0.0.1:18478?transport=udp"

Needs Debian's coturn (`apt-get install -y coturn`; `./dev test` installs it when root).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
REALM = "ray-lipsync.test"


def have_turnserver() -> bool:
    return Path(TURNSERVER).is_file()


class CoturnServer:
    """coturn started with its own log, pid file and user db under `workdir`; stopped by PID."""

    def __init__(self, workdir: Path, *, secret: str, port: int, relay_ports: tuple[int, int]) -> None:
        self.workdir = Path(workdir)
        self.secret = secret
        self.port = port
        self.relay_ports = relay_ports
        self.log = self.workdir / "turnserver.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def command(self) -> list[str]:
        low, high = self.relay_ports
        return [
            TURNSERVER, "-n",  # no config file: everything is on this line
            "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
            f"--listening-port={self.port}", f"--alt-listening-port={self.port + 1}",
            f"--min-port={low}", f"--max-port={high}",
            "--use-auth-secret", f"--static-auth-secret={self.secret}", f"--realm={REALM}",
            "--fingerprint", "--no-tls", "--no-dtls", "--no-cli", "--no-tcp-relay",
            # Both ends relay through this server on 127.0.0.1, so the peers of each
            # allocation are loopback addresses, which coturn refuses unless allowed.
            "--allow-loopback-peers",
            f"--userdb={self.workdir / 'turndb'}", f"--pidfile={self.workdir / 'turnserver.pid'}",
            f"--log-file={self.log}", "--simple-log", "--no-stdout-log", "--verbose",
        ]

    def start(self, timeout_s: float = 10.0) -> "CoturnServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"turnserver exited with {self._proc.returncode}: {self.log_text()[-2000:]}")
            if self._listening():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"turnserver did not listen on 127.0.0.1:{self.port} within {timeout_s} s")

    def _listening(self) -> bool:
        with socket.socket() as s:  # coturn listens on TCP and UDP alike: TCP tells when it is up
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # our own child, by its PID
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def __enter__(self) -> "CoturnServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
