"""The Ray Serve application: gateway replicas serving the HTTP API and hosting the peers.

    serve run serve_app:app                                   # default settings
    serve run serve_app:build backend=musetalk pipeline.max_replicas=4
    serve run serve_app:build settings_file=s3://bucket/lipsync.json
    ray-lipsync serve                                         # local Ray + this app

This module is the entry point only; the application lives in the `serve/` package (one job
per module, see serve/__init__.py). `build` is the application builder: Serve passes it the
`args` of `serve run ... key=value`, of a Serve config file or of a KubeRay RayService's
serveConfigV2 (see ray_lipsync.settings_args.settings_from_args). Shape: the Serve proxy sends each
HTTP request to a `Gateway` replica chosen by `SessionRouter` (serve.routing): a request with
a session in its path (/v1/sessions/{id}/...) or an `x-session-id` header goes to the replica
named in the id (the one holding its aiortc peer), also after gateways are added; others go to
the replica with the fewest sessions. A request whose session is named only in its body
(LiveTalking's routes) is forwarded by the replica it reached (`HomeClient`), through a
DeploymentHandle with the same router. Gateways autoscale on the `sessions` custom metric
within serve.min_gateways..max_gateways, and push a metrics snapshot every second to the named
`MetricsBoard` actor; /metrics on any gateway renders all gateways' snapshots (label `replica`).
"""

from __future__ import annotations

import sys
from typing import Any

from ray_lipsync import cli
from ray_lipsync.config import Settings
from serve.deployment import APP_NAME, GATEWAY_CPUS, GatewayDeployment, build, build_app
from serve.run import run

__all__ = ["APP_NAME", "GATEWAY_CPUS", "GatewayDeployment", "app", "build", "build_app", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    """The `ray-lipsync` command: the core CLI with `serve` provided by this application."""
    return cli.main(argv, serve=run)


def __getattr__(name: str) -> Any:
    """`app` (`serve run serve_app:app`): the application with default settings, built on
    first access rather than at import (the `ray-lipsync` command never needs it)."""
    if name == "app":
        application = globals()["app"] = build_app(Settings())
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
