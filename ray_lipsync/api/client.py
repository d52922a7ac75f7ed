"""How the HTTP API reaches gateways: in-process (`LocalClient`), via Ray Serve (`ServeClient`)
or, inside a gateway replica, in-process for its own sessions and via Serve for others
(`HomeClient`).

Both expose `call(method, **kwargs)`, `stream(method, **kwargs)` and `snapshots()`. Session
calls pass `session_id` as a keyword: the Serve request router reads it to pick the session's
home replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from ray_lipsync.api.gateway import Gateway, home_of, names_replica


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


class HomeClient:
    """The API's client inside a gateway replica (the Serve app has no separate ingress).

    The proxy routes requests with the session in their path to its home replica, so these
    run in-process; a request whose session is named only in its body (LiveTalking's routes)
    may land on another replica and is forwarded through `remote` (a `ServeClient`).
    """

    def __init__(self, gateway: Gateway, remote: GatewayClient) -> None:
        self._local = LocalClient(gateway)
        self._remote = remote
        self._replica = gateway.replica

    def _client(self, kwargs: dict[str, Any]) -> GatewayClient:
        session_id = kwargs.get("session_id")
        if session_id is None or home_of(session_id) == (None, None) or names_replica(session_id, self._replica):
            return self._local  # new sessions, ids naming no replica (404 here), our own
        return self._remote

    async def call(self, method: str, **kwargs: Any) -> Any:
        return await self._client(kwargs).call(method, **kwargs)

    def stream(self, method: str, **kwargs: Any) -> AsyncIterator[Any]:
        return self._client(kwargs).stream(method, **kwargs)

    async def snapshots(self) -> list[dict]:
        return await self._remote.snapshots()
