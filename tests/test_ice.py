"""ICE settings and per-session TURN REST credentials (coturn's use-auth-secret scheme).

The credentials are checked by a real coturn in test_turn.py; here: their shape, the
validation of `webrtc` settings, and that the secret stays out of dumps and session answers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from ray_lipsync.config import Settings
from ray_lipsync.ice import session_ice_servers, turn_credentials

SECRET = "not-a-real-secret-5d1e"
TURN = {"webrtc": {"ice_servers": [{"urls": "stun:stun.example.org:3478"},
                                   {"urls": ["turn:turn.example.org:3478?transport=udp",
                                             "turns:turn.example.org:5349?transport=tcp"]}],
                   "turn_secret": SECRET, "turn_ttl_s": 600}}


def test_turn_credentials_follow_the_rest_api_scheme():
    username, credential = turn_credentials(SECRET, "gw1.abc-_9", 600, now=1_000_000.7)
    assert username == "1000600:gw1.abc-_9"
    expected = hmac.new(SECRET.encode(), username.encode(), hashlib.sha1).digest()
    assert base64.b64decode(credential) == expected and len(expected) == 20
    with pytest.raises(ValueError, match=":"):
        turn_credentials(SECRET, "a:b", 600)


def test_every_turn_server_gets_the_sessions_credentials():
    webrtc = Settings.model_validate(TURN).webrtc
    stun, turn = session_ice_servers(webrtc, "gw1.s1", now=2_000_000)
    assert stun == {"urls": ["stun:stun.example.org:3478"]}
    assert turn["username"] == "2000600:gw1.s1" and turn["urls"][1].startswith("turns:")
    other = session_ice_servers(webrtc, "gw1.s2", now=2_000_000)[1]
    assert other["credential"] != turn["credential"]  # per session


def test_static_credentials_are_passed_through_without_a_secret():
    settings = Settings.model_validate({"webrtc": {"ice_servers": [
        {"urls": "turn:t.example.org", "username": "u", "credential": "p"}]}})
    assert session_ice_servers(settings.webrtc, "x") == [
        {"urls": ["turn:t.example.org"], "username": "u", "credential": "p"}]
    assert session_ice_servers(Settings().webrtc, "x") == []  # default: host candidates only


@pytest.mark.parametrize("webrtc, message", [
    ({"ice_servers": [{"urls": "http://example.org"}]}, "must start with"),
    ({"ice_servers": [{"urls": []}]}, "at least 1"),
    ({"ice_servers": [{"urls": "turn:t"}]}, "username and credential"),
    ({"ice_servers": [{"urls": "turn:t", "username": "u", "credential": "p"}], "turn_secret": SECRET},
     "one or the other"),
    ({"turn_secret": "**********"}, "masked"),
    ({"turn_secret": SECRET, "turn_ttl_s": 0}, "greater than 0"),
    ({"ice_servers": [{"urls": "stun:s", "password": "x"}]}, "Extra inputs"),
])
def test_bad_webrtc_settings_are_rejected_without_quoting_the_secret(webrtc, message):
    with pytest.raises(ValidationError, match=message) as err:
        Settings.model_validate({"webrtc": webrtc})
    assert SECRET not in str(err.value)


def test_the_secret_is_masked_in_dumps_and_travels_only_on_request():
    settings = Settings.model_validate(TURN)
    assert SECRET not in settings.model_dump_json() and SECRET not in repr(settings)
    assert "**********" in settings.model_dump_json()
    inner = settings.model_dump_json(context={"secrets": True})  # how serve_app hands it to replicas
    assert Settings.model_validate_json(inner).webrtc.turn_secret.get_secret_value() == SECRET
    assert settings.with_overrides(backend="procedural").webrtc.turn_secret.get_secret_value() == SECRET


def test_cli_config_does_not_print_the_secret(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({**TURN, "home": str(tmp_path)}))
    out = subprocess.run([sys.executable, "-m", "ray_lipsync.cli", "--config", str(path), "config"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert SECRET not in out and json.loads(out)["webrtc"]["turn_ttl_s"] == 600


def test_session_answer_carries_its_own_credentials_never_the_secret(lipsync_settings):
    from ray_lipsync.api.gateway import Gateway
    from ray_lipsync.streaming.local import LocalPipeline

    settings = lipsync_settings.model_validate({**lipsync_settings.model_dump(), **TURN})

    async def main():
        gateway = Gateway(settings, LocalPipeline(settings), "gw1")
        try:
            return [await gateway.create_session() for _ in range(2)]
        finally:
            await gateway.shutdown()

    first, second = asyncio.run(main())
    for created in (first, second):
        turn = created["ice_servers"][1]
        assert turn["username"].endswith(":" + created["session_id"])
        assert SECRET not in json.dumps(created)
    assert first["ice_servers"][1]["credential"] != second["ice_servers"][1]["credential"]
