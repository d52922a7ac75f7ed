"""Admission from measured headroom (ray_lipsync/admission.py) and its gateway wiring."""

from __future__ import annotations

import time

import httpx
import pytest

from helpers import free_port

from ray_lipsync.admission import AdmissionPolicy, LoadSample
from ray_lipsync.config import AdmissionConfig, Settings

CONFIG = AdmissionConfig(cpu_target=0.85, talk_cores_prior=0.25, window_s=5.0, shed_after_s=3.0)


def sample(t: float, sessions: int, talking: int, busy: float, sent: int = 25, late: int = 0,
           lag: float = 5.0) -> LoadSample:
    return LoadSample(t, sessions, talking, sent * sessions, late, lag, busy, 2)


def test_admits_until_the_measured_cost_of_everyone_talking_fills_the_budget():
    policy = AdmissionPolicy(CONFIG.model_copy(update={"talk_cores_prior": 0.1}))
    assert policy.decide(0).admit and policy.decide(1).admit  # nothing measured: only the bounds decide
    policy.observe(sample(0, 1, 1, 1.9))  # a host already full: the second session must wait
    assert policy.decide(0).admit and not policy.decide(1).admit
    policy = AdmissionPolicy(CONFIG.model_copy(update={"talk_cores_prior": 0.1}))
    for t in range(5):  # no session: the host is 0.2 cores busy
        policy.observe(sample(t, 0, 0, 0.2))
    for t in range(5, 10):  # two silent sessions: 0.05 each
        policy.observe(sample(t, 2, 0, 0.3))
    policy.observe(sample(10, 2, 2, 1.6))  # one sample of a connection burst: not a trend
    for t in range(11, 30):  # both talk: 0.2 each
        policy.observe(sample(t, 2, 2, 0.6))
    assert policy.base_cores == pytest.approx(0.2)
    assert policy.idle_cores == pytest.approx(0.05)
    assert policy.talk_cores == pytest.approx(0.2)
    # budget 0.85 x 2 = 1.7 cores: busy now (0.6) + 0.2 for each session that would start talking
    assert policy.decide(6).admit  # 7 sessions, 5 more talking: 1.6 cores
    refused = policy.decide(7)  # 8 sessions, 6 more talking: 1.8 cores
    assert not refused.admit and refused.retry_after_s == CONFIG.window_s
    assert "cores" in refused.reason


def test_a_gateways_first_session_is_checked_while_other_gateways_hold_sessions():
    """Serve adds a gateway on a host whose other gateway already fills it: the new gateway's
    first session must not bypass the budget (it is not the service's only session)."""
    policy = AdmissionPolicy(CONFIG)
    for t in range(5):  # none of its own; the other gateway's 7 talkers keep the host busy
        policy.observe(sample(t, 0, 0, 1.55))
    assert policy.decide(0).admit  # the service's first session
    refused = policy.decide(0, sessions_elsewhere=7)  # 1.55 + 0.25 > 1.7
    assert not refused.admit and "1 sessions would need 1.80 of 1.70 cores" in refused.reason
    policy.observe(sample(5, 0, 0, 0.9))
    policy.observe(sample(6, 0, 0, 0.9))
    assert policy.decide(0, sessions_elsewhere=7).admit  # room again (median of the last 3)


def test_a_gateway_that_never_saw_its_host_without_sessions_charges_them_the_priors():
    """Serve adds a gateway on a host that other gateways keep busy, and the router gives it a
    session before it has sampled the host without one: that session must not be charged the
    whole host (which refused every later session while the host had room)."""
    policy = AdmissionPolicy(CONFIG.model_copy(update={"talking_share": 0.25}))
    for t in range(5):  # its one silent session, on a host 1.3 cores busy with the others'
        policy.observe(sample(t, 1, 0, 1.3))
    assert policy.idle_cores == pytest.approx(0.05) and policy.talk_cores == pytest.approx(0.25)
    # 2 sessions, 1 of them would talk: 1.3 + 0.25 + 0.05 = 1.6 <= 1.7
    assert policy.decide(1, sessions_elsewhere=10).admit
    policy.observe(sample(5, 1, 0, 1.55))  # the host fills up: the budget still decides
    policy.observe(sample(6, 1, 0, 1.55))
    assert not policy.decide(1, sessions_elsewhere=10).admit
    policy.observe(sample(7, 0, 0, 1.3))  # once it has seen the host without its sessions,
    policy.observe(sample(8, 1, 0, 1.4))  # it measures what they cost
    assert policy.idle_cores == pytest.approx(0.1)


def test_sessions_elsewhere_counts_the_other_gateways_fresh_snapshots():
    pytest.importorskip("ray")
    from serve.deployment import SNAPSHOT_FRESH_S, sessions_elsewhere

    now = time.time()
    snapshots = [{"replica": "me", "time": now, "sessions": 3}, {"replica": "b", "time": now, "sessions": 2},
                 {"replica": "c", "time": now - SNAPSHOT_FRESH_S - 1, "sessions": 5}]  # c: gone
    assert sessions_elsewhere(snapshots, "me") == 2
    assert sessions_elsewhere([], "me") == 0


def test_talking_share_admits_more_when_not_everyone_talks_at_once():
    policy = AdmissionPolicy(CONFIG.model_copy(update={"talking_share": 0.25}))
    for t in range(30):
        policy.observe(sample(t, 0 if t < 5 else 1, 0 if t < 10 else 1, 0.2 if t < 5 else 0.25 if t < 10 else 0.45))
    # busy now 0.45 with one talker; a quarter talking: 0.25 per extra talker, 0.05 for a silent newcomer
    assert policy.decide(16).admit  # 17 sessions, 5 talking: 0.45 + 4 x 0.25 + 0.05 = 1.5
    assert not policy.decide(20).admit  # 21 sessions, 6 talking: 1.75


def test_refuses_while_sessions_lose_frames_or_the_loop_lags():
    policy = AdmissionPolicy(CONFIG)
    policy.observe(sample(0, 2, 0, 0.2, late=2))  # 2 of 50 frames late: 4 % > 0.5 %
    decision = policy.decide(2)
    assert not decision.admit and "lateness" in decision.reason
    policy = AdmissionPolicy(CONFIG)
    policy.observe(sample(0, 2, 0, 0.2, lag=150.0))
    assert "event loop" in policy.decide(2).reason
    for t in range(1, 7):  # the window moves on: healthy again
        policy.observe(sample(t, 2, 0, 0.2))
    assert policy.decide(2).admit


def test_sheds_the_newest_only_after_a_sustained_overload_and_once_per_period():
    policy = AdmissionPolicy(CONFIG)
    policy.observe(sample(0.0, 5, 5, 1.9, late=20))  # 20 of 125: 16 % > 5 %
    assert not policy.should_shed(0.0)
    policy.observe(sample(1.0, 5, 5, 1.9, late=20))
    policy.observe(sample(2.0, 5, 5, 1.9, late=20))
    assert not policy.should_shed(2.0)  # 2 s of overload: not yet
    policy.observe(sample(3.0, 5, 5, 1.9, late=20))
    assert policy.should_shed(3.0)
    policy.observe(sample(4.0, 4, 4, 1.9, late=20))
    assert not policy.should_shed(4.0)  # measure the effect before shedding again
    policy.observe(sample(5.0, 4, 4, 1.5))  # recovered: the overload clock resets
    policy.observe(sample(6.0, 4, 4, 1.5))
    assert not policy.should_shed(9.0)


def test_a_single_session_is_never_shed_and_off_means_off():
    policy = AdmissionPolicy(CONFIG)
    for t in range(10):
        policy.observe(sample(t, 1, 1, 2.0, late=20))
    assert not policy.should_shed(10.0)
    off = AdmissionPolicy(CONFIG.model_copy(update={"enabled": False}))
    for t in range(10):
        off.observe(sample(t, 5, 5, 2.0, late=50))
    assert off.decide(100).admit and not off.should_shed(10.0)


def test_the_api_answers_503_with_retry_after_once_measured_headroom_is_gone(tmp_path):
    """A real HTTP API whose admission has measured the host and finds no room: the first
    session is admitted (always), later ones get 503 + Retry-After and the refusal is
    counted; the admitted session is unharmed."""
    from local_service import serve_app

    # a talking session is assumed to need 64 cores until one has been measured
    settings = Settings(home=tmp_path, serve={"admission": {"talk_cores_prior": 64.0}})
    with serve_app(settings, free_port()) as url, httpx.Client(base_url=url, timeout=30) as http:
        first = http.post("/v1/sessions", json={"avatar": "default"})
        assert first.status_code == 201, first.text

        deadline = time.monotonic() + 30  # the gateway samples its load once a second
        while "lipsync_host_busy_cores{" not in http.get("/metrics").text and time.monotonic() < deadline:
            time.sleep(0.2)
        refused = http.post("/v1/sessions", json={"avatar": "default"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "at_capacity" and "retry later" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        body = first.json()
        state = http.get(f"/v1/sessions/{body['session_id']}", headers={"Authorization": f"Bearer {body['token']}"})
        assert state.status_code == 200
        metrics = http.get("/metrics").text
        assert "lipsync_sessions_refused_total" in metrics and "lipsync_host_busy_cores" in metrics


def test_gateways_scale_on_their_measured_cpu_as_well_as_sessions():
    from types import SimpleNamespace

    from serve.autoscaling import GatewayLoadAutoscalingPolicy

    policy = GatewayLoadAutoscalingPolicy(target_sessions_per_gateway=8, target_gateway_cores=0.6)

    def ctx(sessions: dict, cores: dict):
        return SimpleNamespace(aggregated_metrics={"sessions": sessions, "gateway_cores": cores},
                               capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4)

    assert policy(ctx({"a": 3}, {"a": 0.2}))[0] == 1
    assert policy(ctx({"a": 4}, {"a": 0.9}))[0] == 2  # few sessions, but a busy process
    assert policy(ctx({"a": 9, "b": 8}, {"a": 0.3, "b": 0.3}))[0] == 3  # sessions bound it too
    assert policy(ctx({"a": 16}, {"a": 5.0}))[0] == 4  # within max
    assert policy(ctx({}, {}))[0] == 1
