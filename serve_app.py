"""The Ray Serve application: the gateway deployment, which serves the HTTP API (FastAPI).

    serve run serve_app:app            # or: ray-lipsync serve

Shape: the Serve proxy sends each HTTP request to a `Gateway` replica chosen by the
deployment's `SessionRouter`: a request with a session in its path (/v1/sessions/{id}/...)
goes to the replica named in the id (the one holding its aiortc peer), also after gateways
are added; others go to the replica with the fewest sessions. A request whose session is
named only in its body (LiveTalking's routes) is forwarded by the replica it reached, through
a DeploymentHandle with the same router. No separate ingress: an audio push is one hop.
Gateways autoscale on the `sessions` custom metric within serve.min_gateways..max_gateways,
and push a metrics snapshot every second to the named `MetricsBoard` actor; /metrics on any
gateway renders all gateways' snapshots (label `replica`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import threading
from typing import Any

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from actors.runtime import init_ray, serial_opencv
from ray_lipsync.api.client import HomeClient, ServeClient
from ray_lipsync.api.gateway import Gateway
from ray_lipsync.api.metrics import MetricsBoard
from ray_lipsync.api.routes import build_api
from ray_lipsync.config import Settings

logger = logging.getLogger("ray_lipsync.serve")

APP_NAME = "ray-lipsync"
GATEWAY = "Gateway"
METRICS_BOARD = "ray_lipsync_metrics"
METRICS_PUSH_S = 1.0
DEFAULT_PIPELINE = "actors.pipeline:RayPipeline"
# Logical CPUs a gateway reserves. With 1.0, one gateway + the CPU pipeline actors (replica
# 0.5, batcher 0.25, compositor 0.25) + a second gateway would not fit a 2-core laptop, and
# a compositor that cannot be placed hangs the first POST /v1/sessions.
GATEWAY_CPUS = 0.5


async def load_pipeline(spec: str, settings: Settings) -> Any:
    """Import `module:Class`; `await Class.connect(settings)` if it has it, else Class(settings)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"pipeline spec {spec!r} must look like 'package.module:Class'")
    factory = getattr(importlib.import_module(module_name), attr)
    if hasattr(factory, "connect"):
        return await factory.connect(settings)
    return factory(settings)


def metrics_board() -> Any:
    """The cluster's one MetricsBoard actor (created by whoever asks first)."""
    return ray.remote(MetricsBoard).options(
        name=METRICS_BOARD, get_if_exists=True, lifetime="detached", num_cpus=0,
    ).remote()


@serve.deployment(name=GATEWAY, max_ongoing_requests=1000, graceful_shutdown_timeout_s=5)
@serve.ingress()
class GatewayDeployment:
    """One gateway replica: serves the HTTP API and hosts its sessions' peers; its unique_id
    is the prefix of their ids. Its methods are the calls other replicas forward to it."""

    async def __init__(self, settings_json: str, pipeline: str) -> None:
        serial_opencv()
        self._settings = settings = Settings.model_validate_json(settings_json)
        context = serve.get_replica_context()
        self._app_name = context.app_name
        self.gateway = Gateway(settings, await load_pipeline(pipeline, settings), context.replica_id.unique_id)
        self._board = metrics_board()
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        logger.info("gateway replica %s ready", self.gateway.replica)

    def __serve_build_asgi_app__(self) -> Any:
        others = ServeClient(serve.get_deployment_handle(GATEWAY, self._app_name), self._snapshots)
        return build_api(self._settings, HomeClient(self.gateway, others), gateway=self.gateway.replica)

    async def _snapshots(self) -> list[dict]:
        return await self._board.get.remote()

    async def _push_metrics(self) -> None:
        while True:
            try:
                snapshot = self.gateway.metrics_snapshot()
                snapshot["inference"] = await self.gateway.inference_stats()
                self._board.put.remote(snapshot)
            except Exception:  # the board may be restarting; next tick retries
                logger.warning("could not push metrics", exc_info=True)
                self._board = metrics_board()
            await asyncio.sleep(METRICS_PUSH_S)

    def record_routing_stats(self) -> dict[str, float]:
        return {"sessions": self.gateway.session_count}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"sessions": self.gateway.session_count}

    async def create_session(self, avatar: str = "default", backend: str | None = None) -> dict:
        return await self.gateway.create_session(avatar=avatar, backend=backend)

    async def authorize(self, session_id: str, token: str | None) -> None:
        await self.gateway.authorize(session_id, token)

    async def offer(self, session_id: str | int, token: str | None, sdp: str,
                    type: str = "offer", compat: bool = False) -> dict:
        return await self.gateway.offer(session_id, token, sdp, type, compat=compat)

    async def push_audio(self, session_id: str | int, token: str | None, samples: Any,
                         utterance_id: str | None = None, interrupt: bool = False,
                         final: bool = True, compat: bool = False) -> dict:
        return await self.gateway.push_audio(session_id, token, samples, utterance_id,
                                              interrupt, final, compat=compat)

    async def interrupt(self, session_id: str | int, token: str | None = None,
                        compat: bool = False) -> dict:
        return await self.gateway.interrupt(session_id, token, compat=compat)

    async def status(self, session_id: str | int, token: str | None = None,
                     compat: bool = False) -> dict:
        return await self.gateway.status(session_id, token, compat=compat)

    async def close(self, session_id: str | int, token: str | None = None,
                    compat: bool = False) -> None:
        await self.gateway.close(session_id, token, compat=compat)

    async def events(self, session_id: str, token: str | None, keepalive_s: float = 15.0):
        async for item in self.gateway.events(session_id, token, keepalive_s):
            yield item

    async def metrics_snapshot(self) -> dict:
        return self.gateway.metrics_snapshot()

    async def __del__(self) -> None:
        self._pusher.cancel()
        await self.gateway.shutdown()
        await self.gateway.pipeline.shutdown()


def build_app(settings: Settings, pipeline: str = DEFAULT_PIPELINE, *,
              gateway_cpus: float = GATEWAY_CPUS) -> serve.Application:
    """The Serve application: Gateway replicas serving the HTTP API (session-affine routing,
    autoscaled on sessions)."""
    s = settings.serve
    return GatewayDeployment.options(
        ray_actor_options={"num_cpus": gateway_cpus},
        request_router_config=RequestRouterConfig(
            request_router_class="ray_lipsync.api.router:SessionRouter",
            request_routing_stats_period_s=1.0,
        ),
        autoscaling_config=AutoscalingConfig(
            min_replicas=s.min_gateways, max_replicas=s.max_gateways,
            initial_replicas=s.min_gateways,
            upscale_delay_s=5.0, downscale_delay_s=600.0,
            look_back_period_s=15.0,  # sessions are a level, not a rate: react within seconds
            policy=AutoscalingPolicy(
                policy_function="ray_lipsync.api.router:SessionsAutoscalingPolicy",
                policy_kwargs={"target_sessions_per_gateway": s.target_sessions_per_gateway},
            ),
        ),
    ).bind(settings.model_dump_json(context={"secrets": True}), pipeline)  # replicas need turn_secret


def run(settings: Settings, address: str | None = None, dashboard: bool = False) -> None:
    """Start Ray (or join `address`), deploy the app on settings.serve.host:port, block.

    Without an address a new local Ray instance is started (with its dashboard if
    `dashboard`): a bare ray.init() would join whatever local cluster happens to be running
    (another user's, a test's).
    """
    init_ray(address, ignore_reinit_error=True, include_dashboard=None if address else dashboard)
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    logger.info("ray-lipsync is serving: open http://%s:%d/ (API docs at /docs)",
                settings.serve.host, settings.serve.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


app = build_app(Settings())
