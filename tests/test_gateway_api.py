"""Every implementation of GatewayAPI has the interface's exact signatures, and the Serve
application's clients, generated from the interface, forward each call as the interface says:
a method added to the Protocol but not forwarded (or forwarded with other defaults) fails here,
not in a cluster."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import pytest

from ray_lipsync.api.client import SESSION_METHODS, GatewayAPI
from ray_lipsync.api.gateway import Gateway

pytest.importorskip("ray")
from serve.clients import API_METHODS, HomeClient, ServeClient  # noqa: E402
from serve.deployment import GatewayDeployment  # noqa: E402

@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


METHODS = [name for name, value in vars(GatewayAPI).items()
           if inspect.isfunction(value) and not name.startswith("_")]


@pytest.mark.parametrize("implementation", [Gateway, HomeClient, ServeClient, GatewayDeployment.func_or_class])
def test_signatures_agree_with_the_interface(implementation):
    for name in METHODS:
        expected = inspect.signature(getattr(GatewayAPI, name))
        actual = inspect.signature(getattr(implementation, name))
        assert actual == expected, f"{implementation.__name__}.{name}{actual} != GatewayAPI.{name}{expected}"


def test_session_methods_take_session_id_as_a_keyword():
    assert set(SESSION_METHODS) <= set(METHODS)
    for name in SESSION_METHODS:
        assert "session_id" in inspect.signature(getattr(GatewayAPI, name)).parameters


@pytest.mark.parametrize("client", [HomeClient, ServeClient])
def test_the_clients_implement_every_method_as_the_interface_does(client):
    assert list(API_METHODS) == METHODS
    for name in METHODS:
        method = getattr(client, name)
        # a coroutine where the interface has one; events is an async iterator (not awaited)
        assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(getattr(GatewayAPI, name)), name


class Call:
    def __init__(self, log: list, method: str, stream: bool) -> None:
        self.log, self.method, self.stream = log, method, stream

    def remote(self, **kwargs):
        self.log.append((self.method, kwargs, self.stream))
        if self.stream:
            return Stream([("event", kwargs)], self.log)
        future = asyncio.get_running_loop().create_future()
        future.set_result(kwargs)
        return future


class Stream:
    """A DeploymentResponseGenerator stand-in: async iteration, then cancel()."""

    def __init__(self, items: list, log: list) -> None:
        self.items, self.log = iter(items), log

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self.items)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        self.log.append("cancel")


class FakeHandle:
    """A DeploymentHandle stand-in recording `handle.<method>.remote(**kwargs)` calls."""

    def __init__(self, stream: bool = False, log: list | None = None) -> None:
        self.stream, self.log = stream, [] if log is None else log

    def options(self, stream: bool = False):
        return FakeHandle(stream, self.log)

    def __getattr__(self, method: str) -> Call:
        return Call(self.log, method, self.stream)


@pytest.mark.anyio
async def test_serve_client_forwards_every_argument_as_a_keyword_with_defaults():
    handle = FakeHandle()
    client = ServeClient(handle, board=None)
    await client.offer("r.1", "tok", "v=0")
    await client.push_audio("r.1", None, b"pcm", interrupt=True, compat=True)
    await client.create_session()
    assert handle.log == [
        ("offer", {"session_id": "r.1", "token": "tok", "sdp": "v=0", "type": "offer", "compat": False,
                       "video_hold_ms": None}, False),
        ("push_audio", {"session_id": "r.1", "token": None, "samples": b"pcm", "utterance_id": None,
                        "interrupt": True, "final": True, "compat": True}, False),
        ("create_session", {"avatar": "default", "backend": None}, False),
    ]
    with pytest.raises(TypeError):
        await client.offer("r.1", "tok")  # bound to the interface's signature: sdp is missing
    items = [item async for item in client.events("r.1", "tok")]
    assert items == [("event", {"session_id": "r.1", "token": "tok", "keepalive_s": 15.0})]
    assert handle.log[-2][0] == "events" and handle.log[-2][2] is True  # a streaming call
    assert handle.log[-1] == "cancel"


@pytest.mark.anyio
async def test_serve_client_raises_the_user_exception_inside_a_ray_task_error():
    from ray.exceptions import RayTaskError

    class Unknown(KeyError):
        pass

    class Failing:
        def __getattr__(self, method):
            async def fail(**kwargs):
                raise RayTaskError(method, "traceback", Unknown("r.1"))
            return SimpleNamespace(remote=fail)

    with pytest.raises(Unknown):
        await ServeClient(Failing(), board=None).status("r.1", "tok")
