"""A real RTMP server for tests: Debian's nginx with libnginx-mod-rtmp on a loopback port.

`rtmp_server(port)` starts nginx (no daemon, one process, its own prefix in a temp folder)
that records every stream it receives to `<folder>/<key>.flv`; `stop()`/`start()` take it
down and bring it back on the same port (a target that drops). Tests skip when nginx or
the module is missing (`./dev test` installs them).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MODULE_PATHS = (Path("/usr/lib/nginx/modules/ngx_rtmp_module.so"),
                Path("/usr/share/nginx/modules/ngx_rtmp_module.so"))

CONFIG = """load_module {module};
daemon off;
master_process off;
worker_processes 1;
error_log {root}/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 64; }}
rtmp {{
  server {{
    listen 127.0.0.1:{port};
    application live {{
      live on;
      record all;
      record_path {root}/rec;
      record_unique off;
    }}
  }}
}}
"""


class RtmpServer:
    """nginx-rtmp on 127.0.0.1:`port`; what it receives is recorded under `recordings`."""

    def __init__(self, nginx: str, module: Path, port: int, root: Path) -> None:
        self.port = port
        self.root = root
        self.recordings = root / "rec"
        self.recordings.mkdir(parents=True, exist_ok=True)
        self._nginx = nginx
        self._config = root / "nginx.conf"
        self._config.write_text(CONFIG.format(module=module, root=root, port=port))
        self._process: subprocess.Popen | None = None

    def url(self, key: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    def recording(self, key: str) -> Path:
        return self.recordings / f"{key}.flv"

    def start(self, timeout: float = 10.0) -> None:
        self._process = subprocess.Popen([self._nginx, "-c", str(self._config), "-p", str(self.root)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self._process.stderr.read().decode()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx-rtmp did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._process = None


@contextmanager
def rtmp_server(port: int) -> Iterator[RtmpServer]:
    """A running nginx-rtmp on `port` (skips the test if nginx or the RTMP module is missing)."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    module = next((p for p in MODULE_PATHS if p.exists()), None)
    if nginx is None or module is None:
        pytest.skip("nginx with libnginx-mod-rtmp is not installed (apt-get install nginx libnginx-mod-rtmp)")
    with tempfile.TemporaryDirectory(prefix="rtmp-") as folder:
        server = RtmpServer(nginx, module, port, Path(folder))
        server.start()
        try:
            yield server
        finally:
            server.stop()
