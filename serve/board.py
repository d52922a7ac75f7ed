"""The cluster's MetricsBoard actor, and how a gateway reads every gateway's snapshot from it."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import ray

from actors.runtime import on_head_node
from ray_lipsync.api.metrics import MetricsBoard

if TYPE_CHECKING:
    from ray_lipsync.api.gateway import Gateway

logger = logging.getLogger("ray_lipsync.serve")

METRICS_BOARD = "ray_lipsync_metrics"
BOARD_TIMEOUT_S = 2.0


def metrics_board(namespace: str) -> Any:
    """The cluster's one MetricsBoard actor, in the pipeline's namespace (created by whoever
    asks first; restarted by Ray if it dies, its contents refilled by the gateways' next pushes)."""
    return ray.remote(MetricsBoard).options(
        name=METRICS_BOARD, namespace=namespace, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_restarts=-1, max_task_retries=-1, **on_head_node(),
    ).remote()


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
            self.reconnect()
            return [self._gateway.metrics_snapshot()]

    def reconnect(self) -> None:
        """Look the board up again (after a failed call: it may have been restarted)."""
        self.board = metrics_board(self._gateway.settings.pipeline.namespace)
