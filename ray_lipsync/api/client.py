"""How the HTTP ingress reaches gateways: in-process (`LocalClient`) or via Ray Serve (`ServeClient`).

Both expose `call(method, **kwargs)`, `stream(method, **kwargs)` and `snapshots()`. Session
calls pass `session_id` as a keyword: the Serve request router reads it to pick the session's
home replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from ray_lipsync.api.gateway import Gateway


class GatewayClient(Protocol):
    async def call(self, method: str, **kwargs: Any) -> Any: ...
    def stream(self, method: str, **kwargs: Any) -> AsyncIterator[Any]: ...
    async def snapshots(self) -> list[dict]: ...


class LocalClient:
    """Calls one in-process Gateway directly (laptop mode and fast tests)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def call(self, method: str, **kwargs: Any) -> Any:
        result = getattr(self.gateway, method)(**kwargs)
        return await result if isinstance(result, Awaitable) else result

    def stream(self, method: str, **kwargs: Any) -> AsyncIterator[Any]:
        return getattr(self.gateway, method)(**kwargs)

    async def snapshots(self) -> list[dict]:
        return [self.gateway.metrics_snapshot()]


def _unwrap(error: BaseException) -> BaseException:
    """The user exception inside a Ray task error (so handlers see UnknownSession etc.)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class ServeClient:
    """Calls gateway replicas through a DeploymentHandle routed by SessionRouter."""

    def __init__(self, handle: Any, snapshots: Callable[[], Awaitable[list[dict]]]) -> None:
        self._handle = handle
        self._snapshots = snapshots

    async def call(self, method: str, **kwargs: Any) -> Any:
        from ray.exceptions import RayTaskError

        try:
            return await getattr(self._handle, method).remote(**kwargs)
        except RayTaskError as error:
            raise _unwrap(error) from None

    async def stream(self, method: str, **kwargs: Any) -> AsyncIterator[Any]:
        from ray.exceptions import RayTaskError

        generator = getattr(self._handle.options(stream=True), method).remote(**kwargs)
        try:
            async for item in generator:
                yield item
        except RayTaskError as error:
            raise _unwrap(error) from None
        finally:
            generator.cancel()

    async def snapshots(self) -> list[dict]:
        return await self._snapshots()
