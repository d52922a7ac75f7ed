"""SessionRouter's choices without a Serve cluster (the replicas are stand-ins with the two
attributes the router reads; test_serve.py covers it on real Serve), and where it reads a
request's session from."""

from __future__ import annotations

import asyncio
import pickle
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
from serve.routing import SessionRouter, header_session, request_session  # noqa: E402


def replica(unique_id: str, sessions: int) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id), routing_stats={"sessions": sessions})


def router() -> SessionRouter:
    r = SessionRouter.__new__(SessionRouter)  # its Serve-side constructor needs a controller
    r.initialize_state()
    return r


def first_choice(r: SessionRouter, replicas: list, pending=None) -> str:
    return asyncio.run(r.choose_replicas(replicas, pending))[0][0].replica_id.unique_id


def pending(args=(), kwargs=None, session_id: str = "", http: bool = True) -> SimpleNamespace:
    """A PendingRequest's public fields: args, kwargs, metadata (session_id, is_http_request)."""
    metadata = SimpleNamespace(session_id=session_id, is_http_request=http)
    return SimpleNamespace(args=list(args), kwargs=kwargs or {}, metadata=metadata)


def proxy_request(path: str) -> SimpleNamespace:
    """What Serve 2.60's HTTP proxy hands the router: its pickled StreamingHTTPRequest."""
    from ray.serve._private.common import StreamingHTTPRequest

    scope = {"type": "http", "path": path, "method": "GET", "headers": []}
    return pending(args=[pickle.dumps(StreamingHTTPRequest(scope, proxy_actor_name="proxy"))])


def test_a_burst_of_new_sessions_spreads_before_stats_refresh() -> None:
    r, replicas = router(), [replica("a", 0), replica("b", 0)]
    picks = [first_choice(r, replicas) for _ in range(6)]
    assert picks.count("a") == picks.count("b") == 3


def test_fresh_stats_replace_what_was_sent_since() -> None:
    r = router()
    a, b = replica("a", 0), replica("b", 0)
    for _ in range(4):
        first_choice(r, [a, b])
    fresh = [replica("a", 5), replica("b", 1)]  # the stats now count those sessions
    assert first_choice(r, fresh) == "b"
    assert [first_choice(r, fresh) for _ in range(4)].count("b") == 3  # b until it ties with a


def test_the_session_comes_from_the_keyword_or_the_proxy_path() -> None:
    assert request_session(None) is None
    assert request_session(pending(kwargs={"session_id": "b.y"}, http=False)) == "b.y"  # ServeClient
    assert request_session(pending(kwargs={"session_id": 123456789012}, http=False)) == 123456789012
    assert request_session(proxy_request("/v1/sessions/b.z/offer")) == "b.z"
    assert request_session(proxy_request("/v1/sessions/123456789012")) == "123456789012"
    assert request_session(proxy_request("/v1/sessions")) is None
    assert request_session(proxy_request("/healthz")) is None
    assert header_session(pending(session_id="b.x")) == "b.x"  # x-session-id / handle.options(session_id=)
    assert header_session(pending()) is None and header_session(None) is None


@pytest.mark.parametrize("odd", [
    pending(args=[b"not a pickle"]),
    pending(args=[pickle.dumps({"asgi_scope": 1})]),
    pending(args=[pickle.dumps(SimpleNamespace(asgi_scope={"path": 7}))]),
    pending(args=["/v1/sessions/b.x"]),
    pending(args=[pickle.dumps(SimpleNamespace(asgi_scope={"path": "/v1/sessions/b.x"}))], http=False),
    SimpleNamespace(),  # no fields at all
    SimpleNamespace(args=None, kwargs=None, metadata=None),
])
def test_an_unreadable_request_has_no_session_and_never_raises(odd) -> None:
    assert request_session(odd) is None and header_session(odd) is None


def test_sessions_go_home_and_unknown_homes_to_one_replica() -> None:
    r, replicas = router(), [replica("a", 9), replica("b", 0)]
    assert first_choice(r, replicas, proxy_request("/v1/sessions/a.s/audio")) == "a"
    assert first_choice(r, replicas, pending(kwargs={"session_id": "a.t"})) == "a"
    assert asyncio.run(r.choose_replicas(replicas, pending(kwargs={"session_id": "gone.u"}))) == [replicas[:1]]


def test_an_x_session_id_header_routes_only_when_it_names_a_replica() -> None:
    r, replicas = router(), [replica("a", 9), replica("b", 0)]
    assert first_choice(r, replicas, pending(session_id="a.s")) == "a"  # no path needed
    with_path = proxy_request("/v1/sessions/a.s/offer")
    with_path.metadata.session_id = "b.s"
    assert first_choice(r, replicas, with_path) == "b"  # the header first
    with_path.metadata.session_id = "some-tracing-id"  # not ours: the path decides
    assert first_choice(r, replicas, with_path) == "a"
    assert first_choice(r, replicas, pending(session_id="some-tracing-id")) == "b"  # least loaded


def test_a_replica_serve_could_not_reach_is_nobodys_home_for_a_while(monkeypatch) -> None:
    """Until the controller drops a killed gateway, Serve retries on the replica the router
    picks: its sessions' calls go to another replica (which answers 404) instead of hanging."""
    from ray.serve.request_router import RequestRouter

    import serve.routing as routing

    # the base class's own bookkeeping (its queue-length cache) needs a Serve-side router
    monkeypatch.setattr(RequestRouter, "on_replica_actor_unavailable", lambda self, replica_id: None)
    monkeypatch.setattr(RequestRouter, "on_replica_actor_died", lambda self, replica_id: None)
    clock = [100.0]
    monkeypatch.setattr(routing.time, "monotonic", lambda: clock[0])
    r, a, b = router(), replica("a", 0), replica("b", 5)
    session = proxy_request("/v1/sessions/a.s")
    r.on_replica_actor_unavailable(a.replica_id)
    assert first_choice(r, [a, b], session) == "b"
    assert first_choice(r, [a, b]) == "b"  # nor does a new session go there
    clock[0] += routing.UNREACHABLE_S
    assert first_choice(r, [a, b], session) == "a"  # reachable again: home
    r.on_replica_actor_died(a.replica_id)
    clock[0] += routing.UNREACHABLE_S
    assert first_choice(r, [a, b], session) == "b"  # dead: left out for longer
    assert first_choice(r, [a], session) == "a"  # the only replica: Serve's retries decide
