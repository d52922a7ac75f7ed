"""The Ray Serve application: gateway replicas serving the HTTP API and hosting the peers.

    serve run serve_app:app                                   # default settings
    serve run serve_app:build backend=musetalk pipeline.max_replicas=4
    serve run serve_app:build settings_file=s3://bucket/lipsync.json
    ray-lipsync serve                                         # local Ray + this app

`build` is the application builder: Serve passes it the `args` of `serve run ... key=value`,
of a Serve config file or of a KubeRay RayService's serveConfigV2 (see
ray_lipsync.config.settings_from_args). Shape: the Serve proxy sends each HTTP request to a
`Gateway` replica chosen by `SessionRouter`: a request with a session in its path
(/v1/sessions/{id}/...) goes to the replica named in the id (the one holding its aiortc
peer), also after gateways are added; others go to the replica with the fewest sessions. A
request whose session is named only in its body (LiveTalking's routes) is forwarded by the
replica it reached (`HomeClient`), through a DeploymentHandle with the same router. Gateways
autoscale on the `sessions` custom metric within serve.min_gateways..max_gateways, and push a
metrics snapshot every second to the named `MetricsBoard` actor; /metrics on any gateway
renders all gateways' snapshots (label `replica`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import pickle
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from actors.runtime import init_ray, on_head_node, serial_opencv
from ray_lipsync import cli
from ray_lipsync.api.client import GatewayAPI, forwarded_kwargs
from ray_lipsync.api.gateway import Gateway, home_of, names_replica
from ray_lipsync.api.metrics import MetricsBoard
from ray_lipsync.api.routes import build_api
from ray_lipsync.config import Settings, settings_from_args
from ray_lipsync.heap import freeze_startup_heap

logger = logging.getLogger("ray_lipsync.serve")

APP_NAME = "ray-lipsync"
GATEWAY = "Gateway"
METRICS_BOARD = "ray_lipsync_metrics"
METRICS_PUSH_S = 1.0
BOARD_TIMEOUT_S = 2.0
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


def metrics_board(namespace: str) -> Any:
    """The cluster's one MetricsBoard actor, in the pipeline's namespace (created by whoever
    asks first; restarted by Ray if it dies, its contents refilled by the gateways' next pushes)."""
    return ray.remote(MetricsBoard).options(
        name=METRICS_BOARD, namespace=namespace, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_restarts=-1, max_task_retries=-1, **on_head_node(),
    ).remote()


# -- clients of the gateway API ----------------------------------------------------------


class ServeClient:
    """GatewayAPI of the whole deployment, through a DeploymentHandle routed by SessionRouter."""

    def __init__(self, handle: Any, board: "BoardReader") -> None:
        self._handle = handle
        self._board = board

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self._handle, method.__name__).remote(**forwarded_kwargs(method, *args, **kwargs))
        except RayTaskError as error:
            raise _unwrap(error) from None

    async def create_session(self, avatar: str = "default", backend: str | None = None) -> dict:
        return await self._call(GatewayAPI.create_session, avatar, backend)

    async def authorize(self, session_id: str, token: str | None) -> None:
        await self._call(GatewayAPI.authorize, session_id, token)

    async def offer(self, session_id: str | int, token: str | None, sdp: str, type: str = "offer",
                    *, compat: bool = False) -> dict:
        return await self._call(GatewayAPI.offer, session_id, token, sdp, type, compat=compat)

    async def push_audio(self, session_id: str | int, token: str | None, samples: np.ndarray,
                         utterance_id: str | None = None, interrupt: bool = False,
                         final: bool = True, *, compat: bool = False) -> dict:
        return await self._call(GatewayAPI.push_audio, session_id, token, samples, utterance_id,
                                interrupt, final, compat=compat)

    async def interrupt(self, session_id: str | int, token: str | None = None, *,
                        compat: bool = False) -> dict:
        return await self._call(GatewayAPI.interrupt, session_id, token, compat=compat)

    async def status(self, session_id: str | int, token: str | None = None, *,
                     compat: bool = False) -> dict:
        return await self._call(GatewayAPI.status, session_id, token, compat=compat)

    async def close(self, session_id: str | int, token: str | None = None, *,
                    compat: bool = False) -> None:
        await self._call(GatewayAPI.close, session_id, token, compat=compat)

    async def events(self, session_id: str, token: str | None,
                     keepalive_s: float = 15.0) -> AsyncIterator[tuple[str, dict]]:
        kwargs = forwarded_kwargs(GatewayAPI.events, session_id, token, keepalive_s)
        generator = getattr(self._handle.options(stream=True), GatewayAPI.events.__name__).remote(**kwargs)
        try:
            async for item in generator:
                yield item
        except RayTaskError as error:
            raise _unwrap(error) from None
        finally:
            generator.cancel()

    async def snapshots(self) -> list[dict]:
        return await self._board.snapshots()

    async def health(self) -> list[str]:
        return []  # each gateway reports the pipeline's health itself (HomeClient)


def _unwrap(error: BaseException) -> BaseException:
    """The user exception inside a Ray task error (so handlers see UnknownSession etc.)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class HomeClient:
    """GatewayAPI inside a gateway replica: this replica's sessions in-process, others forwarded.

    The proxy routes requests with the session in their path to its home replica, so these
    run in-process; a request whose session is named only in its body (LiveTalking's routes)
    may land on another replica and is forwarded through `remote` (a ServeClient).
    """

    def __init__(self, gateway: Gateway, remote: GatewayAPI, board: "BoardReader") -> None:
        self._local = gateway
        self._remote = remote
        self._board = board

    def _for(self, session_id: str | int) -> GatewayAPI:
        if home_of(session_id) == (None, None) or names_replica(session_id, self._local.replica):
            return self._local  # ids naming no replica (404 here), and our own
        return self._remote

    async def create_session(self, avatar: str = "default", backend: str | None = None) -> dict:
        return await self._local.create_session(avatar, backend)

    async def authorize(self, session_id: str, token: str | None) -> None:
        await self._for(session_id).authorize(session_id, token)

    async def offer(self, session_id: str | int, token: str | None, sdp: str, type: str = "offer",
                    *, compat: bool = False) -> dict:
        return await self._for(session_id).offer(session_id, token, sdp, type, compat=compat)

    async def push_audio(self, session_id: str | int, token: str | None, samples: np.ndarray,
                         utterance_id: str | None = None, interrupt: bool = False,
                         final: bool = True, *, compat: bool = False) -> dict:
        return await self._for(session_id).push_audio(session_id, token, samples, utterance_id,
                                                       interrupt, final, compat=compat)

    async def interrupt(self, session_id: str | int, token: str | None = None, *,
                        compat: bool = False) -> dict:
        return await self._for(session_id).interrupt(session_id, token, compat=compat)

    async def status(self, session_id: str | int, token: str | None = None, *,
                     compat: bool = False) -> dict:
        return await self._for(session_id).status(session_id, token, compat=compat)

    async def close(self, session_id: str | int, token: str | None = None, *,
                    compat: bool = False) -> None:
        await self._for(session_id).close(session_id, token, compat=compat)

    def events(self, session_id: str, token: str | None,
               keepalive_s: float = 15.0) -> AsyncIterator[tuple[str, dict]]:
        return self._for(session_id).events(session_id, token, keepalive_s)

    async def snapshots(self) -> list[dict]:
        return await self._board.snapshots()

    async def health(self) -> list[str]:
        return await self._local.health()


class BoardReader:
    """Reads every gateway's snapshot from the MetricsBoard; while the board is unavailable
    (restarting, its node gone) /metrics still answers, with this gateway's own snapshot."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self.board = metrics_board(gateway.settings.pipeline.namespace)

    async def snapshots(self) -> list[dict]:
        try:
            return await asyncio.wait_for(self.board.get.remote(), BOARD_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - board restarting: serve what this replica knows
            logger.warning("metrics board unavailable; /metrics shows this gateway only")
            self.board = metrics_board(self._gateway.settings.pipeline.namespace)
            return [self._gateway.metrics_snapshot()]


# -- request routing and autoscaling (Serve glue) ------------------------------------------

_SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)")
RECENT_TTL_S = 5.0  # a replica's stats not refreshed for this long: forget what was sent since


def _session_arg(pending: PendingRequest | None) -> Any:
    """The session a request is for: the `session_id` of a handle call, or the id in the path
    of an HTTP request from the Serve proxy; None for requests of no session (or unknown)."""
    if pending is None:
        return None
    session_id = pending.kwargs.get("session_id")
    return session_id if session_id is not None else _http_session(pending.args)


def _http_session(args: Any) -> str | None:
    # The proxy passes an HTTP request as one argument: the pickled request with its ASGI
    # scope (Ray Serve's StreamingHTTPRequest, as the replica itself unpickles it).
    if not args or not isinstance(args[0], bytes):
        return None
    try:
        scope = getattr(pickle.loads(args[0]), "asgi_scope", None)
    except Exception:  # noqa: BLE001 - not an HTTP request from the proxy
        return None
    match = _SESSION_PATH.match(scope.get("path", "")) if isinstance(scope, dict) else None
    return match.group(1) if match else None


@dataclass
class _Recent:
    """Requests of no session sent to one replica since its routing stats `stats` arrived."""

    stats: Any
    since: float
    sent: int = 0


class SessionRouter(RequestRouter):
    """Pins each session's calls to the replica its id names; new sessions to the least loaded.

    Session ids name their home replica ("<replica unique_id>.<random>", or for LiveTalking's
    integer ids a 6-digit replica code in the leading digits). Calls without a session go to
    the replica with the fewest sessions (from `record_routing_stats`, refreshed about once a
    second, plus what this router sent each replica since its last refresh, so a burst of new
    sessions spreads). Consistent hashing is not used: it remaps sessions on scale-up.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._recent: dict[str, _Recent] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        session_id = _session_arg(pending_request)
        if session_id is not None:
            home = [r for r in candidate_replicas if names_replica(session_id, r.replica_id.unique_id)]
            if home:
                return [home]
            # Home replica gone: any replica answers "unknown session" (404).
            return [candidate_replicas[:1]] if candidate_replicas else []
        ranked = sorted(candidate_replicas, key=self._load)
        if ranked:
            self._recent_of(ranked[0]).sent += 1
        return [[r] for r in ranked]

    def _load(self, replica: RunningReplica) -> float:
        stats = replica.routing_stats or {}
        return float(stats.get("sessions", 0)) + self._recent_of(replica).sent

    def _recent_of(self, replica: RunningReplica) -> _Recent:
        key, now = replica.replica_id.unique_id, time.monotonic()
        recent = self._recent.get(key)
        if recent is None or recent.stats is not replica.routing_stats or now - recent.since > RECENT_TTL_S:
            recent = self._recent[key] = _Recent(replica.routing_stats, now)
        return recent


class SessionsAutoscalingPolicy:
    """Gateways needed for the open sessions: ceil(sessions / target), within min..max.

    Serve instantiates it once with `policy_kwargs`; it reads the `sessions` custom metric
    each gateway reports from `record_autoscaling_stats`.
    """

    def __init__(self, target_sessions_per_gateway: int = 8) -> None:
        if target_sessions_per_gateway <= 0:
            raise ValueError("target_sessions_per_gateway must be positive")
        self.target = target_sessions_per_gateway

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        per_replica = (ctx.aggregated_metrics or {}).get("sessions", {})
        sessions = float(sum(per_replica.values()))
        desired = math.ceil(sessions / self.target)
        desired = min(max(desired, ctx.capacity_adjusted_min_replicas, 1),
                      ctx.capacity_adjusted_max_replicas)
        return desired, {}


# -- the deployment --------------------------------------------------------------------------


def log_through_serve(level: int = logging.INFO) -> None:
    """Send this package's log records (session create/close, peers) at `level` and above
    through the replica's `ray.serve` handlers: its log file and stderr, which Ray streams to
    the driver (`ray-lipsync serve`). Without this they stop at Python's WARNING default."""
    package = logging.getLogger("ray_lipsync")
    package.setLevel(level)
    handlers = logging.getLogger("ray.serve").handlers
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
        self._reader = BoardReader(self)
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        freeze_startup_heap()
        logger.info("gateway replica %s ready", self.replica)

    def __serve_build_asgi_app__(self) -> Any:
        others = ServeClient(serve.get_deployment_handle(GATEWAY, self._app_name), self._reader)
        # Serve's proxy reads WebSockets without backpressure: stream sockets bound their read-ahead.
        return build_api(self.settings, HomeClient(self, others, self._reader), gateway=self.replica,
                         stream_read_ahead_s=self.settings.serve.stream_read_ahead_s)

    async def _push_metrics(self) -> None:
        while True:
            try:
                snapshot = self.metrics_snapshot()
                snapshot["inference"] = await self.inference_stats()
                self._reader.board.put.remote(snapshot)
            except Exception:  # noqa: BLE001 - the board or directory may be restarting
                logger.warning("could not push metrics", exc_info=True)
                self._reader.board = metrics_board(self.settings.pipeline.namespace)
            await asyncio.sleep(METRICS_PUSH_S)

    def record_routing_stats(self) -> dict[str, float]:
        return {"sessions": self.session_count}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"sessions": self.session_count}

    async def __del__(self) -> None:
        pusher = getattr(self, "_pusher", None)  # absent when __init__ failed
        if pusher is None:
            return
        pusher.cancel()
        await self.shutdown()
        await self.pipeline.shutdown()


def build_app(settings: Settings, pipeline: str = DEFAULT_PIPELINE, *,
              gateway_cpus: float = GATEWAY_CPUS) -> serve.Application:
    """The Serve application: Gateway replicas serving the HTTP API (session-affine routing,
    autoscaled on sessions)."""
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
            look_back_period_s=15.0,  # sessions are a level, not a rate: react within seconds
            policy=AutoscalingPolicy(
                policy_function=SessionsAutoscalingPolicy,
                policy_kwargs={"target_sessions_per_gateway": s.target_sessions_per_gateway},
            ),
        ),
    ).bind(settings.model_dump_json(context={"secrets": True}), pipeline)  # replicas need turn_secret


def build(args: dict[str, Any]) -> serve.Application:
    """Application builder: settings from Serve `args` (see config.settings_from_args)."""
    return build_app(settings_from_args(args))


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


def main(argv: list[str] | None = None) -> int:
    """The `ray-lipsync` command: the core CLI with `serve` provided by this application."""
    return cli.main(argv, serve=run)


app = build_app(Settings())

if __name__ == "__main__":
    sys.exit(main())
