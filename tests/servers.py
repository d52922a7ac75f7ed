"""A real HTTP server for tests: the API on uvicorn, on a loopback port, in the test's loop.

WebSockets need a real server (httpx's ASGI transport has none); the tests of the streaming
socket and the pipecat service talk to it over TCP like any client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn

from ray_lipsync.api.gateway import Gateway
from ray_lipsync.api.routes import build_api
from ray_lipsync.config import Settings
from ray_lipsync.streaming.local import LocalPipeline


@contextlib.asynccontextmanager
async def running_server(settings: Settings, port: int, stream_read_ahead_s: float | None = None
                         ) -> AsyncIterator[tuple[Gateway, str]]:
    """(gateway, base URL) of the API served on 127.0.0.1:`port` (LocalPipeline);
    `stream_read_ahead_s` as behind Serve's proxy (see build_api)."""
    gateway = Gateway(settings, LocalPipeline(settings), "gw1")
    app = build_api(settings, gateway, stream_read_ahead_s=stream_read_ahead_s)
    config = uvicorn.Config(app, host="127.0.0.1", port=port,
                            log_level="warning", lifespan="off", ws="websockets-sansio")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start (port taken)
            await asyncio.sleep(0.02)
        yield gateway, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await gateway.shutdown()
        await asyncio.wait_for(task, 10)
