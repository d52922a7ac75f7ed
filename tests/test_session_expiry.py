"""When a gateway closes a session by itself (api/session_entry.expiry_reason): a pure rule,
tested on plain entries and a clock the test sets (no loop, no peer, no sleeps)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ray_lipsync.api.session_entry import SessionEntry, expiry_reason
from ray_lipsync.config import Settings

SETTINGS = Settings()
T0 = 1000.0  # the entry's creation time on the test's clock


def entry(**fields) -> SessionEntry:
    return SessionEntry("gw.abc", 1, "token", session=None, last_activity=T0, created=T0, **fields)


def peer(state: str) -> SimpleNamespace:
    return SimpleNamespace(connection_state=state)


def test_a_new_session_is_kept_until_its_offer_timeout():
    offer_s = SETTINGS.serve.offer_timeout_s
    assert expiry_reason(entry(), T0 + offer_s - 0.1, SETTINGS) is None
    assert "no WebRTC offer" in expiry_reason(entry(), T0 + offer_s + 0.1, SETTINGS)


def test_a_session_another_output_used_needs_no_offer():
    assert expiry_reason(entry(used=True), T0 + SETTINGS.serve.offer_timeout_s + 1, SETTINGS) is None


def test_a_connected_session_is_closed_only_when_idle():
    idle_s = SETTINGS.serve.idle_timeout_s
    e = entry(peer=peer("connected"), offered_at=T0)
    assert expiry_reason(e, T0 + idle_s - 1, SETTINGS) is None
    assert e.offered_at is None  # connected: the connect timeout no longer applies
    assert "idle for more than" in expiry_reason(e, T0 + idle_s + 1, SETTINGS)


def test_a_peer_that_never_connects_is_closed_after_the_connect_timeout():
    connect_s = SETTINGS.webrtc.connect_timeout_s
    e = entry(peer=peer("connecting"), offered_at=T0)
    assert expiry_reason(e, T0 + connect_s - 0.1, SETTINGS) is None
    assert "ICE failed" in expiry_reason(e, T0 + connect_s + 0.1, SETTINGS)


def test_a_lost_connection_waits_for_a_new_offer_for_the_grace_period():
    grace_s = SETTINGS.webrtc.reconnect_grace_s
    e = entry(lost_at=T0)
    assert expiry_reason(e, T0 + grace_s - 0.1, SETTINGS) is None
    assert "no new offer" in expiry_reason(e, T0 + grace_s + 0.1, SETTINGS)


@pytest.mark.parametrize("outputs", [
    {"egress": SimpleNamespace(active=True)},
    {"whep": [object()]},  # one WHEP viewer
])
def test_a_running_output_keeps_the_session_and_counts_as_activity(outputs):
    late = T0 + SETTINGS.serve.idle_timeout_s + 1
    e = entry(**outputs)
    assert expiry_reason(e, late, SETTINGS) is None
    assert e.last_activity == late


def test_a_stopped_output_does_not_keep_the_session():
    e = entry(egress=SimpleNamespace(active=False), whep=[])
    assert "idle" in expiry_reason(e, T0 + SETTINGS.serve.idle_timeout_s + 1, SETTINGS)
