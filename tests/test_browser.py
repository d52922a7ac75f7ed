"""The web page in headless Chromium: connect, play the WebRTC stream, speak, see events.

Needs Debian's chromium (`apt-get install -y chromium`) and playwright (python); skips when
/usr/bin/chromium is absent. The service is the real HTTP API (`routes.build_api`) over an
in-process gateway and `LocalPipeline`, served by uvicorn on a free port (no Ray needed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from helpers import CHROMIUM, chromium, free_port

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[str]:
    """The real HTTP API over an in-process gateway and LocalPipeline, on a free port."""
    pytest.importorskip("uvicorn")
    from local_service import serve_app

    from ray_lipsync.config import Settings

    # Chromium, the client, runs on the same 2 cores: admission (tested in test_admission.py)
    # would count its decoding as the service's load and refuse the later tests' sessions
    settings = Settings(home=tmp_path_factory.mktemp("home"), serve={"admission": {"enabled": False}})
    with serve_app(settings, free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


DECODED = """async () => {
  const frames = async () => {
    let n = 0;
    (await app.pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") n = r.framesDecoded;
    });
    return n;
  };
  // videoWidth is known from the first frame, which getStats may not count yet
  // (seen: 0 then 25 a second later): read the first figure once it counts one
  const until = Date.now() + 10000;
  let first = await frames();
  while (first === 0 && Date.now() < until) {
    await new Promise((r) => setTimeout(r, 100));
    first = await frames();
  }
  await new Promise((r) => setTimeout(r, 1000));
  return [first, await frames()];
}"""


def test_page_connects_plays_video_speaks_and_shows_events(service, browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(service + "/")
    page.wait_for_selector("#avatar option", state="attached", timeout=10_000)

    page.click("#connect")
    page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=60_000)
    assert page.text_content("#error") == ""
    first, second = page.evaluate(DECODED)
    assert second > first > 0, (first, second)  # the <video> plays: frames keep being decoded
    page.wait_for_function("document.body.dataset.state === 'connected'", timeout=10_000)

    page.fill("#text", "Hello there.")
    page.click("#speak")
    page.wait_for_selector('#events li[data-event="utterance.start"]', state="attached", timeout=30_000)
    page.wait_for_selector('#events li[data-event="utterance.end"]', state="attached", timeout=30_000)
    page.wait_for_function("document.getElementById('s-frames').textContent !== '-'", timeout=5_000)

    page.click("#interrupt")
    page.wait_for_selector('#events li[data-event="interrupt"]', state="attached", timeout=5_000)

    page.click("#mic")  # Chromium's fake microphone (a beep) now reaches the session as speech
    page.wait_for_function("""[...document.querySelectorAll('#events li[data-event="utterance.start"]')]
                               .some((li) => li.textContent.includes('mic-'))""", timeout=15_000)
    assert page.text_content("#mic") == "Microphone on"
    page.click("#disconnect")
    page.wait_for_function("document.body.dataset.state === 'not connected'", timeout=5_000)
    assert errors == []
    page.close()


SESSION_BUTTONS = ["speak", "interrupt", "mic", "upload"]


def test_session_buttons_wait_for_the_session(service, browser):
    """While `POST /v1/sessions` is in flight (held here), Speak & co. cannot be clicked."""
    page = browser.new_page()
    held = []
    page.route("**/v1/sessions", lambda route: held.append(route) if route.request.method == "POST"
               else route.continue_())
    page.goto(service + "/")
    page.wait_for_selector("#avatar option", state="attached", timeout=10_000)
    page.click("#connect")
    page.wait_for_function("document.body.dataset.state === 'creating'", timeout=5_000)
    deadline = time.monotonic() + 5
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(20)
    assert held, "the page did not create a session"
    disabled = page.evaluate(f"{SESSION_BUTTONS}.map((id) => document.getElementById(id).disabled)")
    assert disabled == [True] * len(SESSION_BUTTONS)
    assert page.is_disabled("#connect") and page.is_enabled("#disconnect")
    held[0].continue_()
    page.wait_for_function("!document.getElementById('speak').disabled", timeout=10_000)
    assert all(page.is_enabled(f"#{b}") for b in SESSION_BUTTONS)
    assert page.text_content("#sessionId") != ""
    page.click("#disconnect")
    page.wait_for_function("document.body.dataset.state === 'not connected'", timeout=5_000)
    assert all(page.is_disabled(f"#{b}") for b in SESSION_BUTTONS)
    page.close()


def test_page_holds_video_as_long_as_audio(service, browser):
    """Lip sync from the start: audio plays in its own element, video waits for it."""
    page = browser.new_page()
    page.goto(service + "/")
    page.wait_for_selector("#avatar option", state="attached", timeout=10_000)
    page.click("#connect")
    page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=60_000)
    assert page.evaluate("document.getElementById('audio').srcObject.getAudioTracks().length") == 1
    assert page.evaluate("document.getElementById('video').muted")
    # the video receiver is asked to hold pictures as long as audio is buffered + played out
    page.wait_for_function("""app.audioDelayMs > 0 && app.pc.getReceivers().some((r) => r.track
                               && r.track.kind === 'video'
                               && Math.abs(r.jitterBufferTarget - app.audioDelayMs) < 6)""", timeout=10_000)
    page.click("#disconnect")
    page.close()


AUDIO_ENABLED = "app.pc.getReceivers().find((r) => r.track && r.track.kind === 'audio').track.enabled"
AUDIO_ENERGY = """app.pc.getStats().then((stats) => {
  let energy = 0;  // grows while sound is received
  stats.forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "audio") energy = r.totalAudioEnergy || 0; });
  return energy;
})"""


def settled_energy(page, timeout_s: float = 30.0) -> float:
    """The page's received audio energy once it stopped growing (nothing audible arriving)."""
    deadline, last = time.monotonic() + timeout_s, page.evaluate(AUDIO_ENERGY)
    while True:
        page.wait_for_timeout(200)
        now = page.evaluate(AUDIO_ENERGY)
        if now - last < 1e-5:
            return now
        assert time.monotonic() < deadline, "the received audio never went quiet"
        last = now


def test_an_api_interrupt_silences_what_the_page_buffered(service, browser):
    """Another client (a voice agent) cuts the speech: the `interrupt` event makes the page
    silence the audio it already holds at once, and sound comes back after it drained; the
    event comes over the SSE stream and the "events" data channel, each enough alone."""
    import httpx

    page = browser.new_page()
    page.goto(service + "/")
    page.wait_for_selector("#avatar option", state="attached", timeout=10_000)
    page.click("#connect")
    page.wait_for_function("document.body.dataset.state === 'connected'", timeout=60_000)
    page.fill("#text", "Streaming avatars need steady latency, even when they are interrupted.")
    page.click("#speak")
    page.wait_for_selector('#events li[data-event="utterance.start"]', state="attached", timeout=30_000)
    assert page.evaluate(AUDIO_ENABLED) is True
    session, token = page.evaluate("[app.session, app.token]")
    r = httpx.post(f"{service}/v1/sessions/{session}/interrupt", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["interrupted"] is True, r.text
    page.wait_for_function(f"!({AUDIO_ENABLED})", timeout=2_000)  # silenced by the event
    page.wait_for_function(AUDIO_ENABLED, timeout=5_000)  # and back once the buffer drained
    # without the SSE stream: the data channel alone
    page.evaluate("app.avatar._events.close()")
    before = settled_energy(page)
    page.click("#speak")  # its events come over the data channel only now: wait for its sound
    deadline = time.monotonic() + 30
    while page.evaluate(AUDIO_ENERGY) < before + 1e-3:
        assert time.monotonic() < deadline, "the second phrase was never heard"
        page.wait_for_timeout(50)
    r = httpx.post(f"{service}/v1/sessions/{session}/interrupt", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["interrupted"] is True, r.text
    page.wait_for_function(f"!({AUDIO_ENABLED})", timeout=2_000)
    page.close()
