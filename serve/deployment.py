"""The gateway deployment and the Serve application built from settings.

`GatewayDeployment` is one gateway replica: a `Gateway` (whose GatewayAPI methods are what
other replicas' ServeClients call) serving the HTTP API through a HomeClient. `build_app`
gives it session-affine routing (SessionRouter) and autoscaling on open sessions
(GatewayLoadAutoscalingPolicy: measured gateway CPU and open sessions); `build` is the application builder of `serve run serve_app:build`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from actors.runtime import serial_opencv
from ray_lipsync.api.gateway import Gateway
from ray_lipsync.api.routes import build_api
from ray_lipsync.config import Settings
from ray_lipsync.settings_args import settings_from_args
from ray_lipsync.heap import freeze_startup_heap

from .autoscaling import GatewayLoadAutoscalingPolicy
from .board import BoardReader
from .clients import HomeClient, ServeClient
from .routing import SessionRouter

logger = logging.getLogger("ray_lipsync.serve")

APP_NAME = "ray-lipsync"
GATEWAY = "Gateway"
METRICS_PUSH_S = 1.0
SNAPSHOT_FRESH_S = 5.0  # another gateway's snapshot counts for admission while this recent
DEFAULT_PIPELINE = "actors.pipeline:RayPipeline"
# Logical CPUs a gateway reserves. With 1.0, one gateway + the CPU pipeline actors (replica
# 0.5, batcher 0, compositor 0) + a second gateway would not fit a 2-core laptop.
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


def log_through_serve(level: int = logging.INFO) -> None:
    """Send this project's log records (session create/close, peers, failover of the Ray
    pipeline) at `level` and above through the replica's `ray.serve` handlers: its log file
    and stderr, which Ray streams to the driver (`ray-lipsync serve`). Without this they stop
    at Python's WARNING default, on the worker's stderr only."""
    handlers = logging.getLogger("ray.serve").handlers
    for name in ("ray_lipsync", "actors"):
        package = logging.getLogger(name)
        package.setLevel(level)
        if handlers:
            for handler in handlers:
                if handler not in package.handlers:
                    package.addHandler(handler)
            package.propagate = False


@serve.deployment(name=GATEWAY, max_ongoing_requests=1000, graceful_shutdown_timeout_s=5,
                  health_check_period_s=5, health_check_timeout_s=10)
@serve.ingress()
class GatewayDeployment(Gateway):
    """One gateway replica: a `Gateway` (whose GatewayAPI methods are the calls other replicas
    forward to it) that serves the HTTP API; its unique_id prefixes its sessions' ids."""

    async def __init__(self, settings_json: str, pipeline: str) -> None:
        serial_opencv()
        log_through_serve()
        settings = Settings.model_validate_json(settings_json)
        context = serve.get_replica_context()
        self._app_name = context.app_name
        super().__init__(settings, await load_pipeline(pipeline, settings), context.replica_id.unique_id)
        from ray_lipsync.webrtc.peer import warm_up

        await warm_up()  # the first session's offer then costs what later ones do
        await self.warm_playout()  # and its first utterance starts as soon as later ones
        self.start_housekeeping()  # load sampling from the start: admission learns the idle host
        self._reader = BoardReader(self)
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        freeze_startup_heap()
        logger.info("gateway %s ready", self.tag)

    def __serve_build_asgi_app__(self) -> Any:
        others = ServeClient(serve.get_deployment_handle(GATEWAY, self._app_name), self._reader)
        # Serve's proxy reads WebSockets without backpressure: stream sockets bound their read-ahead.
        return build_api(self.settings, HomeClient(self, others, self._reader), gateway=self.tag,
                         stream_read_ahead_s=self.settings.serve.stream_read_ahead_s)

    async def _push_metrics(self) -> None:
        """Every METRICS_PUSH_S: this gateway's snapshot to the board, and what the others'
        snapshots say about their sessions to admission (`sessions_elsewhere`)."""
        while True:
            try:
                snapshot = self.metrics_snapshot()
                snapshot["inference"] = await self.inference_stats()
                self._reader.board.put.remote(snapshot)
                self.sessions_elsewhere = sessions_elsewhere(await self._reader.snapshots(), self.tag)
            except Exception:  # noqa: BLE001 - the board or directory may be restarting
                logger.warning("could not push metrics", exc_info=True)
                self._reader.reconnect()
            await asyncio.sleep(METRICS_PUSH_S)

    def record_routing_stats(self) -> dict[str, float]:
        return {"sessions": self.session_count}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"sessions": self.session_count, "gateway_cores": self.load.get("gateway_cores", 0.0)}

    async def __del__(self) -> None:
        pusher = getattr(self, "_pusher", None)  # absent when __init__ failed
        if pusher is None:
            return
        pusher.cancel()
        await self.shutdown()
        await self.pipeline.shutdown()


def sessions_elsewhere(snapshots: list[dict], tag: str) -> int:
    """Open sessions of the gateways other than `tag`, from the board's fresh snapshots."""
    now = time.time()
    return sum(int(s.get("sessions", 0)) for s in snapshots
               if s.get("replica") != tag and now - s.get("time", 0.0) <= SNAPSHOT_FRESH_S)


def build_app(settings: Settings, pipeline: str = DEFAULT_PIPELINE, *,
              gateway_cpus: float = GATEWAY_CPUS) -> serve.Application:
    """The Serve application: Gateway replicas serving the HTTP API (session-affine routing,
    autoscaled on measured load and sessions)."""
    s = settings.serve
    actor_options: dict[str, Any] = {"num_cpus": gateway_cpus}
    if s.gateway_resources:
        actor_options["resources"] = dict(s.gateway_resources)
    return GatewayDeployment.options(
        ray_actor_options=actor_options,
        request_router_config=RequestRouterConfig(
            request_router_class=SessionRouter,
            request_routing_stats_period_s=1.0,
        ),
        autoscaling_config=AutoscalingConfig(
            min_replicas=s.min_gateways, max_replicas=s.max_gateways,
            initial_replicas=s.min_gateways,
            upscale_delay_s=5.0, downscale_delay_s=600.0,
            # sessions are a level, not a rate: report each second, react within seconds
            metrics_interval_s=1.0, look_back_period_s=5.0,
            policy=AutoscalingPolicy(
                policy_function=GatewayLoadAutoscalingPolicy,
                policy_kwargs={"target_sessions_per_gateway": s.target_sessions_per_gateway,
                               "target_gateway_cores": s.target_gateway_cores},
            ),
        ),
    ).bind(settings.model_dump_json(context={"secrets": True}), pipeline)  # replicas need turn_secret


def build(args: dict[str, Any]) -> serve.Application:
    """Application builder: settings from Serve `args` (see ray_lipsync.settings_args)."""
    return build_app(settings_from_args(args))
