"""WHEP in headless Chromium: a page that speaks the draft with fetch + RTCPeerConnection
(no client library) watches a session twice, while the session speaks.

The service is the real HTTP API over an in-process gateway and LocalPipeline
(tests/local_service.py), the page is served on its origin. Skips without Debian's chromium.
"""

from __future__ import annotations

import base64

import pytest

from helpers import CHROMIUM, chromium, free_port
from speech import speech, to_wav_bytes

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium)"),
]

PAGE = """<!doctype html><meta charset="utf-8"><title>whep</title><body></body>"""

# Runs in the page: two WHEP viewers of one session, speech, one viewer leaves, PATCH.
SCENARIO = """async (wav64) => {
  const created = await (await fetch("/v1/sessions", {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"})).json();
  const sid = created.session_id, auth = {Authorization: `Bearer ${created.token}`};
  const watch = async () => {
    const pc = new RTCPeerConnection();
    pc.addTransceiver("video", {direction: "recvonly"});
    pc.addTransceiver("audio", {direction: "recvonly"});
    const video = document.createElement("video");
    video.autoplay = true; document.body.appendChild(video);  // not muted: audio is played (and measured)
    pc.ontrack = (e) => { video.srcObject = e.streams[0] || new MediaStream([e.track]); };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
      setTimeout(resolve, 3000);
    });
    const r = await fetch(`/v1/sessions/${sid}/whep`, {method: "POST", body: pc.localDescription.sdp,
                                                       headers: {...auth, "Content-Type": "application/sdp"}});
    const answer = await r.text();
    if (r.status !== 201) throw new Error(`WHEP answered ${r.status}: ${answer}`);
    await pc.setRemoteDescription({type: "answer", sdp: answer});
    return {pc, video, location: r.headers.get("Location"), type: r.headers.get("Content-Type")};
  };
  const stats = async (pc) => {
    const out = {frames: 0, energy: 0};
    (await pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") out.frames = s.framesDecoded;
      if (s.type === "inbound-rtp" && s.kind === "audio") out.energy = s.totalAudioEnergy || 0;
    });
    return out;
  };
  const until = async (check, ms = 15000) => {
    const end = performance.now() + ms;
    while (!(await check())) {
      if (performance.now() > end) throw new Error(`timed out: ${check}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const viewers = [await watch(), await watch()];
  await until(async () => (await Promise.all(viewers.map((v) => stats(v.pc)))).every((s) => s.frames > 0));
  const before = await Promise.all(viewers.map((v) => stats(v.pc)));
  const wav = Uint8Array.from(atob(wav64), (c) => c.charCodeAt(0));
  const spoken = await fetch(`/v1/sessions/${sid}/audio`, {method: "POST", body: wav, headers: {...auth, "Content-Type": "audio/wav"}});
  const { duration_ms } = await spoken.json();
  const t0 = performance.now();
  await sleep(duration_ms + 600);
  const after = await Promise.all(viewers.map((v) => stats(v.pc)));
  const seconds = (performance.now() - t0) / 1000;
  const out = {
    types: viewers.map((v) => v.type), locations: viewers.map((v) => v.location),
    fps: after.map((a, i) => (a.frames - before[i].frames) / seconds),
    energy: after.map((a, i) => a.energy - before[i].energy),
    size: viewers.map((v) => [v.video.videoWidth, v.video.videoHeight]),
  };
  const patch = await fetch(viewers[0].location, {method: "PATCH", headers: {...auth, "Content-Type": "application/trickle-ice-sdpfrag"}, body: "a=end-of-candidates"});
  out.patch = [patch.status, (await patch.json()).error];
  out.deleted = (await fetch(viewers[0].location, {method: "DELETE", headers: auth})).status;
  await sleep(200);  // packets in flight
  const left = await Promise.all(viewers.map((v) => stats(v.pc)));
  await sleep(600);
  const later = await Promise.all(viewers.map((v) => stats(v.pc)));
  out.gone = later[0].frames - left[0].frames;
  out.still = later[1].frames - left[1].frames;
  viewers.forEach((v) => v.pc.close());
  await fetch(`/v1/sessions/${sid}`, {method: "DELETE", headers: auth});
  return out;
}"""


@pytest.mark.slow
def test_chromium_watches_a_session_through_whep(lipsync_settings):
    from local_service import serve_app

    wav = to_wav_bytes(speech())
    with serve_app(lipsync_settings, free_port(), pages={"/whep.html": PAGE}) as url, chromium() as browser:
        page = browser.new_page()
        page.goto(f"{url}/whep.html")
        out = page.evaluate(SCENARIO, base64.b64encode(wav).decode())
    assert out["types"] == ["application/sdp", "application/sdp"]
    assert all(loc.startswith("/v1/sessions/") and "/whep/" for loc in out["locations"])
    assert out["locations"][0] != out["locations"][1]
    assert all(size == [512, 512] for size in out["size"])
    assert all(fps >= 20 for fps in out["fps"]), out  # both viewers get the speech at 25 fps
    assert all(energy > 0.01 for energy in out["energy"]), out  # ... and hear it
    assert out["patch"] == [405, "method_not_allowed"]
    assert out["deleted"] == 200
    assert out["gone"] == 0 and out["still"] >= 8, out  # the deleted viewer gets nothing, the other goes on
