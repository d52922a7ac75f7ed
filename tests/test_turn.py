"""Through a real TURN server: Debian's coturn with `use-auth-secret` on loopback, headless
Chromium with iceTransportPolicy "relay" and the ice_servers of POST /v1/sessions.

The server's aiortc peers get the same TURN server (aioice never offers 127.0.0.1 host
candidates, and coturn cannot relay from 127.0.0.1 to the machine's other address), so media
flows browser -> relay -> relay -> server, all on this coturn. Skips when turnserver or
chromium is absent (`apt-get install -y coturn chromium`; `./dev test` installs both as root).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import httpx
import pytest

from helpers import CHROMIUM, chromium
from local_service import serve_app
from turn_server import CoturnServer, have_turnserver

SECRET = "test-static-auth-secret-8c1f"
TURN_PORT = 18478  # this helper's port range: 18000-18999
RELAY_PORTS = (18500, 18599)
HTTP_PORT = 18080
CONNECT_TIMEOUT_S = 5.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not have_turnserver(), reason="needs coturn's turnserver (apt-get install -y coturn)"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
]


@pytest.fixture(scope="module")
def turn(tmp_path_factory) -> Iterator[CoturnServer]:
    with CoturnServer(tmp_path_factory.mktemp("coturn"), secret=SECRET, port=TURN_PORT,
                      relay_ports=RELAY_PORTS) as server:
        yield server


@pytest.fixture(scope="module")
def service(turn, lipsync_settings) -> Iterator[str]:
    settings = lipsync_settings.model_validate({
        **lipsync_settings.model_dump(),
        "webrtc": {"ice_servers": [{"urls": [turn.url]}], "turn_secret": SECRET,
                   "connect_timeout_s": CONNECT_TIMEOUT_S},
    })
    with serve_app(settings, HTTP_PORT) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


MEDIA = """async () => {
  const snapshot = async () => {
    const out = {video: 0, samples: 0, energy: 0, relay: false};
    const stats = await app.pc.getStats();
    stats.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") out.video = r.framesDecoded;
      if (r.type === "inbound-rtp" && r.kind === "audio") {
        out.samples = r.totalSamplesReceived; out.energy = r.totalAudioEnergy;
      }
      if (r.type === "transport" && r.selectedCandidatePairId) {
        const pair = stats.get(r.selectedCandidatePairId);
        out.relay = stats.get(pair.localCandidateId).candidateType === "relay";
      }
    });
    return out;
  };
  const first = await snapshot();
  await new Promise((r) => setTimeout(r, 1000));
  return [first, await snapshot()];
}"""


def capture_session(page) -> dict:
    """Record the POST /v1/sessions answer the page receives."""
    created: dict = {}

    def on_response(response):
        if response.request.method == "POST" and response.url.endswith("/v1/sessions"):
            created.update(response.json())
    page.on("response", on_response)
    return created


def test_browser_plays_video_and_audio_through_turn_only(service, browser, turn, caplog):
    caplog.set_level(logging.DEBUG)  # the service runs in this process: its logs land here
    page = browser.new_page()
    created = capture_session(page)
    page.goto(service + "/?ice=relay")
    page.wait_for_selector("#avatar option", state="attached", timeout=10_000)
    page.click("#connect")
    page.wait_for_function("document.body.dataset.state === 'connected'", timeout=30_000)

    [server] = created["ice_servers"]
    expiry, _, session = server["username"].partition(":")
    assert session == created["session_id"] and abs(int(expiry) - time.time() - 3600) < 60
    assert SECRET not in json.dumps(created)

    page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=30_000)
    before, after = page.evaluate(MEDIA)
    assert after["relay"], "the browser's selected candidate must be a TURN relay candidate"
    assert after["video"] > before["video"] > 0, (before, after)  # video keeps being decoded
    assert after["samples"] > before["samples"] > 0, (before, after)  # audio plays

    page.fill("#text", "Hello there, this is speech.")
    page.click("#speak")
    page.wait_for_selector('#events li[data-event="utterance.start"]', state="attached", timeout=30_000)
    speaking_before, speaking_after = page.evaluate(MEDIA)
    assert speaking_after["energy"] > speaking_before["energy"], "speech is heard (audio energy rises)"
    page.click("#disconnect")
    page.close()
    assert "ALLOCATE processed, success" in turn.log_text()  # coturn itself saw the allocations
    assert SECRET not in caplog.text  # the secret is never logged ...
    assert SECRET not in httpx.get(service + "/metrics", timeout=5).text  # ... nor in metrics


@pytest.mark.parametrize("tamper", ["wrong", "expired"])
def test_bad_credentials_fail_and_the_session_is_freed(service, browser, tamper, caplog):
    from ray_lipsync.ice import turn_credentials

    caplog.set_level(logging.INFO, logger="ray_lipsync.api.gateway")
    page = browser.new_page()
    sessions: list[dict] = []

    def tampered(route):
        response = route.fetch()
        body = response.json()
        for server in body["ice_servers"]:
            if tamper == "wrong":
                server["credential"] = server["credential"][::-1]
            else:  # signed with the right secret, but an hour out of date
                server["username"], server["credential"] = turn_credentials(
                    SECRET, body["session_id"], 60, now=time.time() - 3600)
        sessions.append(body)
        route.fulfill(response=response, json=body)

    page.route("**/v1/sessions", lambda route: tampered(route) if route.request.method == "POST"
               else route.continue_())
    page.goto(service + "/?ice=relay")
    page.wait_for_selector("#avatar option", state="attached", timeout=10_000)
    with page.expect_request(lambda r: r.url.endswith("/offer")):
        page.click("#connect")
    offered = time.monotonic()
    [body] = sessions
    headers = {"Authorization": f"Bearer {body['token']}"}
    url = f"{service}/v1/sessions/{body['session_id']}"
    while True:
        status = httpx.get(url, headers=headers, timeout=5)
        if status.status_code == 404:
            break
        assert status.json()["connection_state"] != "connected"
        assert time.monotonic() - offered < 60, "the session must be freed within 60 s of its offer"
        time.sleep(0.5)
    freed_after = time.monotonic() - offered
    assert freed_after < CONNECT_TIMEOUT_S + 5, freed_after
    # aiortc's side stays "connecting" (no remote candidate ever arrives): the gateway's
    # connect timeout frees it, not the idle timeout (logged once the close completed: the
    # session leaves the API first, then its peer and pipeline parts close)
    closed = f"{body['session_id']} closed: peer not connected"
    deadline = time.monotonic() + 10
    while closed not in caplog.text:
        assert time.monotonic() < deadline and " closed: " not in caplog.text, caplog.text
        time.sleep(0.1)
    assert page.evaluate("document.body.dataset.state") != "connected"
    page.close()
