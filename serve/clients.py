"""The gateway API's clients in the Serve application, generated from `GatewayAPI`.

Each GatewayAPI method of `ForwardingClient` is made at class creation from the Protocol's own
method: same name, docstring and signature (so a method added to the interface is forwarded
without being written out again, and tests/test_gateway_api.py sees the interface's exact
signatures). A call is bound to that signature (a wrong call raises TypeError here, as a
written-out method would) and handed over as keywords (`forwarded_kwargs`, defaults filled):
coroutine methods to `_call(name, kwargs)`, `events` (an async iterator) to `_stream`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayTaskError

from ray_lipsync.api.client import GatewayAPI, forwarded_kwargs
from ray_lipsync.api.session_ids import home_of, names_gateway

if TYPE_CHECKING:
    from ray_lipsync.api.gateway import Gateway

    from .board import BoardReader

API_METHODS: dict[str, Callable[..., Any]] = {
    name: value for name, value in vars(GatewayAPI).items()
    if inspect.isfunction(value) and not name.startswith("_")
}


def _forwarding_method(owner: type, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """`owner.name` with `method`'s signature, handing its calls to `_call` or `_stream`."""
    if inspect.iscoroutinefunction(method):
        async def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await self._call(name, forwarded_kwargs(method, *args, **kwargs))
    else:  # events: returns an async iterator (an async generator in the implementations)
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._stream(name, forwarded_kwargs(method, *args, **kwargs))
    forward.__name__ = name
    forward.__qualname__ = f"{owner.__qualname__}.{name}"
    forward.__module__ = owner.__module__
    forward.__doc__ = method.__doc__
    forward.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    return forward


def _forwards_gateway_api(cls: type) -> type:
    for name, method in API_METHODS.items():
        setattr(cls, name, _forwarding_method(cls, name, method))
    return cls


@_forwards_gateway_api
class ForwardingClient:
    """A GatewayAPI whose every method forwards its call, all keywords, to `_call`/`_stream`.

    Subclasses say where calls go; a subclass defining a GatewayAPI method itself (with the
    interface's signature) overrides the generated one.
    """

    async def _call(self, name: str, kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _stream(self, name: str, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        raise NotImplementedError


def unwrap(error: BaseException) -> BaseException:
    """The user exception inside a Ray task error (so handlers see UnknownSession etc.)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class ServeClient(ForwardingClient):
    """GatewayAPI of the whole deployment, through a DeploymentHandle routed by SessionRouter
    (which reads the `session_id` keyword of session calls); `events` is a streaming call."""

    def __init__(self, handle: Any, board: BoardReader) -> None:
        self._handle = handle
        self._board = board

    async def _call(self, name: str, kwargs: dict[str, Any]) -> Any:
        try:
            return await getattr(self._handle, name).remote(**kwargs)
        except RayTaskError as error:
            raise unwrap(error) from None

    async def _stream(self, name: str, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        generator = getattr(self._handle.options(stream=True), name).remote(**kwargs)
        try:
            async for item in generator:
                yield item
        except RayTaskError as error:
            raise unwrap(error) from None
        finally:
            generator.cancel()

    async def snapshots(self) -> list[dict]:
        return await self._board.snapshots()

    async def health(self) -> list[str]:
        return []  # each gateway reports the pipeline's health itself (HomeClient)


class HomeClient(ForwardingClient):
    """GatewayAPI inside a gateway replica: this replica's sessions in-process, others forwarded.

    The proxy routes requests with the session in their path to its home replica, so these
    run in-process; a request whose session is named only in its body (LiveTalking's routes)
    may land on another replica and is forwarded through `remote` (a ServeClient). Calls of no
    session (create_session, health) run here; snapshots come from the metrics board.
    """

    def __init__(self, gateway: Gateway, remote: GatewayAPI, board: BoardReader) -> None:
        self._local = gateway
        self._remote = remote
        self._board = board

    def _for(self, kwargs: dict[str, Any]) -> Any:
        session_id = kwargs.get("session_id")
        if (session_id is None or home_of(session_id) == (None, None)
                or names_gateway(session_id, self._local.tag)):
            return self._local  # no session, ids naming no replica (404 here), and our own
        return self._remote

    async def _call(self, name: str, kwargs: dict[str, Any]) -> Any:
        return await getattr(self._for(kwargs), name)(**kwargs)

    def _stream(self, name: str, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        return getattr(self._for(kwargs), name)(**kwargs)

    async def snapshots(self) -> list[dict]:
        return await self._board.snapshots()
