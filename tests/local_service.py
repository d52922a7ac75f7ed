"""The service's real HTTP API (routes.build_api) over an in-process gateway and
LocalPipeline, served by uvicorn on a given loopback port in a thread (no Ray needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def serve_app(settings, port: int, replica: str = "local", host: str = "127.0.0.1",
              pages: dict[str, str] | None = None) -> Iterator[str]:
    """Serve `settings`' API on `host`:`port`; yields its loopback URL; shuts the gateway down.

    `pages`: extra HTML pages by path, served from the same origin (an integrator's page)."""
    import uvicorn
    from fastapi.responses import HTMLResponse

    from ray_lipsync.api.gateway import Gateway
    from ray_lipsync.api.routes import build_api
    from ray_lipsync.streaming.local import LocalPipeline

    gateway = Gateway(settings, LocalPipeline(settings), replica)
    app = build_api(settings, gateway)
    for path, html in (pages or {}).items():
        app.add_api_route(path, lambda html=html: HTMLResponse(html), methods=["GET"], include_in_schema=False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-service", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test service did not start within 20 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop = getattr(server, "_loop", None)
        if loop is not None:
            asyncio.run_coroutine_threadsafe(gateway.shutdown(), loop).result(10)
        server.should_exit = True
        thread.join(10)
