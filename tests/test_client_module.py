"""The JavaScript client module (/client/ray-lipsync.js) in headless Chromium, from a page that
only imports it: create, connect, avatar state, speak, upload, stream, interrupt, events,
reconnect, close.

The page is served on the service's own origin, as an integrator's page would be; the service is the real HTTP API over an in-process gateway and
LocalPipeline (tests/local_service.py). Skips without Debian's chromium.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import pytest

from helpers import CHROMIUM, chromium, free_port
from speech import to_wav_bytes

from benchmarks.static_site import StaticPage

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium)"),
]

PAGE = """<!doctype html><meta charset="utf-8"><title>integrator</title>
<video id="v"></video>
<script type="module">
import { AvatarSession, ApiError } from "/client/ray-lipsync.js";
window.lipsync = { AvatarSession, ApiError };
</script>"""

# Runs in the page: every step the module offers, with the events each one brings.
SCENARIO = """async (wav64) => {
  const { AvatarSession, ApiError } = window.lipsync;
  const seen = [];
  const waitFor = (name, pred = () => true, ms = 30000) => new Promise((resolve, reject) => {
    const hit = seen.find((e) => e.name === name && pred(e.detail));
    if (hit) return resolve(hit.detail);
    const t = setTimeout(() => reject(new Error(`no ${name} event within ${ms} ms`)), ms);
    avatar.addEventListener(name, (e) => { if (pred(e.detail)) { clearTimeout(t); resolve(e.detail); } });
  });
  const decoded = async (pc) => {
    let n = 0;
    (await pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "video") n = r.framesDecoded; });
    return n;
  };
  const until = async (check, ms = 20000) => {
    const end = performance.now() + ms;
    while (!(await check())) {
      if (performance.now() > end) throw new Error(`timed out: ${check}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const out = {};
  out.avatars = await AvatarSession.avatars();
  try { await AvatarSession.create({ avatar: "nobody" }); } catch (e) { out.unknown = [e instanceof ApiError, e.status, e.error]; }
  const avatar = await AvatarSession.create({ avatar: "default" });
  for (const name of ["utterance.start", "utterance.end", "interrupt", "avatar.state", "connectionstatechange", "reconnecting", "reconnected"]) {
    avatar.addEventListener(name, (e) => seen.push({ name, detail: e.detail }));
  }
  const video = document.getElementById("v");
  await avatar.connect({ video });
  await until(() => video.videoWidth > 0);
  out.audioElement = avatar._elements.audio.srcObject.getAudioTracks().length;

  out.state = await avatar.setState("idle");
  out.stateEvent = await waitFor("avatar.state");
  try { await avatar.action("wave"); } catch (e) { out.badAction = [e instanceof ApiError, e.status, e.error]; }

  const spoken = await avatar.speak("Hello there.");
  await waitFor("utterance.start", (d) => d.utterance_id === spoken.utterance_id);
  await waitFor("utterance.end", (d) => d.utterance_id === spoken.utterance_id);

  const bytes = Uint8Array.from(atob(wav64), (c) => c.charCodeAt(0));
  const sent = await avatar.sendAudio(new Blob([bytes], { type: "audio/wav" }));
  await waitFor("utterance.end", (d) => d.utterance_id === sent.utterance_id);

  const stream = avatar.stream({ rate: 16000 });
  await stream.opened;
  const played = new Promise((resolve) => stream.addEventListener("playback.finished", (e) => resolve(e.detail)));
  const tone = new Float32Array(8000).map((_, i) => 0.3 * Math.sin(2 * Math.PI * 220 * i / 16000));
  stream.send(tone);
  stream.flush();
  out.streamed = await played;
  stream.close();

  await avatar.speak("Streaming avatars need steady latency, even when they are interrupted.");
  await waitFor("utterance.start", (d) => d.utterance_id !== spoken.utterance_id && d.utterance_id !== sent.utterance_id
                && d.utterance_id !== out.streamed.utterance_id);
  const cut = await avatar.interrupt();
  const audioTrack = () => avatar.pc.getReceivers().find((r) => r.track.kind === "audio").track;
  out.silencedAtOnce = !audioTrack().enabled;
  out.cut = cut;
  await waitFor("interrupt");
  await until(() => audioTrack().enabled, 5000);

  const oldPc = avatar.pc;
  await avatar.reconnect();
  out.newPc = avatar.pc !== oldPc && oldPc.connectionState === "closed";
  await until(() => avatar.pc.connectionState === "connected");
  const before = await decoded(avatar.pc);
  await until(async () => (await decoded(avatar.pc)) > before + 3);
  out.statusAfterReconnect = await avatar.status();
  // the module's offer asks for Opus DTX: the silence now goes out as DTX
  await until(async () => ((await avatar.status()).network || {}).audio_chunks_left_out > 0, 5000);
  out.dtxLeftOut = (await avatar.status()).network.audio_chunks_left_out;
  out.reconnectEvents = seen.filter((e) => e.name.startsWith("reconnect")).map((e) => e.name);

  const id = avatar.id, token = avatar.token;
  await avatar.close();
  out.afterClose = (await fetch(`/v1/sessions/${id}`, { headers: { Authorization: `Bearer ${token}` } })).status;
  return out;
}"""


ELSEWHERE = free_port()  # an integrator's site: another origin, allowed by serve.cors_origins


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[str]:
    pytest.importorskip("uvicorn")
    from local_service import serve_app

    from ray_lipsync.config import Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"), serve={
        "admission": {"enabled": False}, "cors_origins": [f"http://127.0.0.1:{ELSEWHERE}"]})
    with serve_app(settings, free_port(), pages={"/integrator.html": PAGE}) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


def test_cors_allows_only_the_configured_origins(service):
    import httpx

    allowed = {"Origin": f"http://127.0.0.1:{ELSEWHERE}", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{service}/v1/sessions", headers=allowed)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed["Origin"]
    r = httpx.get(f"{service}/client/ray-lipsync.js", headers={"Origin": allowed["Origin"]})
    assert r.headers["content-type"].startswith("text/javascript")
    assert r.headers["access-control-allow-origin"] == allowed["Origin"]
    r = httpx.options(f"{service}/v1/sessions", headers={**allowed, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


def test_a_page_on_another_site_uses_the_module_with_its_server_option(service, browser):
    page_html = f"""<!doctype html><video id="v"></video><script type="module">
import {{ AvatarSession }} from "{service}/client/ray-lipsync.js";
const avatar = await AvatarSession.create({{ server: "{service}" }});
avatar.addEventListener("utterance.end", () => {{ window.done = true; }});
await avatar.connect({{ video: document.getElementById("v") }});
await avatar.speak("Hi.");
window.avatar = avatar;
</script>"""
    with StaticPage(ELSEWHERE, page_html) as site:
        origin = site.url
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(origin + "/")
        page.wait_for_function("window.done === true && document.getElementById('v').videoWidth > 0",
                               timeout=60_000)
        # silence: the still picture is thinned to webrtc.still_fps after 1 s, gradually enough
        # that Chromium counts no freeze
        page.wait_for_timeout(4000)
        video = page.evaluate("""async () => { let v = null;
            (await window.avatar.pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "video") v = r; });
            return { freezes: v.freezeCount, decoded: v.framesDecoded }; }""")
        page.evaluate("window.avatar.close()")
        page.close()
    assert errors == []
    assert video["freezes"] == 0 and video["decoded"] > 0, video


def test_the_client_module_drives_a_session_from_a_page_that_only_imports_it(service, browser):
    rate = 16000
    t = np.arange(int(0.6 * rate)) / rate
    wav = to_wav_bytes((0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), rate)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{service}/integrator.html")
    page.wait_for_function("window.lipsync !== undefined", timeout=10_000)
    out = page.evaluate(SCENARIO, base64.b64encode(wav).decode())
    page.close()
    assert errors == []
    assert "default" in out["avatars"]
    assert out["unknown"] == [True, 404, "unknown_avatar"]
    assert out["audioElement"] == 1  # audio in its own element (made by the module)
    assert out["state"]["state"] == "idle" and out["stateEvent"]["state"] == "idle"
    assert out["badAction"] == [True, 400, "unknown_clip"]  # the default avatar has no clips
    assert out["streamed"]["interrupted"] is False and out["streamed"]["played_ms"] > 400
    assert out["silencedAtOnce"] is True and out["cut"]["interrupted"] is True
    assert out["newPc"] is True and out["reconnectEvents"] == ["reconnecting", "reconnected"]
    assert out["statusAfterReconnect"]["connection_state"] == "connected"
    assert out["dtxLeftOut"] > 0
    assert out["afterClose"] == 404
