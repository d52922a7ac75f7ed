"""SessionRouter's choice for new sessions, without a Serve cluster (the replicas are stand-ins
with the two attributes the router reads; test_serve.py covers it on real Serve)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
from serve_app import SessionRouter  # noqa: E402


def replica(unique_id: str, sessions: int) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id), routing_stats={"sessions": sessions})


def router() -> SessionRouter:
    r = SessionRouter.__new__(SessionRouter)  # its Serve-side constructor needs a controller
    r.initialize_state()
    return r


def first_choice(r: SessionRouter, replicas: list) -> str:
    return asyncio.run(r.choose_replicas(replicas))[0][0].replica_id.unique_id


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
