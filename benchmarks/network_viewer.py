"""One viewer on an emulated link: headless Chromium opens the service's page, connects, speaks
a WAV file through the API and samples WebRTC's own statistics until `--seconds` have passed.

Run inside the client host of an `EmulatedLink` by benchmarks/network.py (and the network
test); prints one JSON object on stdout:

- `frames`: when each video frame was presented (requestVideoFrameCallback, ms on the page clock);
- `samples`: every 250 ms, the video and audio inbound-rtp figures (frames decoded, freezes,
  concealed samples, estimatedPlayoutTimestamp, NACK/PLI counts, bytes) and, every 500 ms, the
  server's view of the session (`GET /v1/sessions/{id}`: the encoder's bitrate and the link
  feedback, field `network`);
- `speech_at`: when the speech was posted (ms on the page clock); "speaking" goes to stderr then.

    ip netns exec NS python benchmarks/network_viewer.py --url http://10.77.1.1:8000 --wav speech.wav
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

START_JS = """async ({ wav }) => {
  const out = window.probe = { frames: [], samples: [], speech_at: null, errors: [], time_origin: performance.timeOrigin };
  const video = document.getElementById("video");
  const onFrame = (now) => { out.frames.push(now); video.requestVideoFrameCallback(onFrame); };
  video.requestVideoFrameCallback(onFrame);
  const auth = { Authorization: `Bearer ${app.token}` };
  const body = new Blob([Uint8Array.from(atob(wav), (c) => c.charCodeAt(0))], { type: "audio/wav" });
  let server = null, tick = 0;
  const sample = async () => {
    const s = { t: performance.now(), video: null, audio: null, server };
    (await app.pc.getStats()).forEach((r) => {
      if (r.type !== "inbound-rtp") return;
      const keep = ["framesDecoded", "framesDropped", "framesReceived", "freezeCount", "totalFreezesDuration",
                    "estimatedPlayoutTimestamp", "nackCount", "pliCount", "firCount", "keyFramesDecoded",
                    "bytesReceived", "packetsLost", "packetsReceived", "frameWidth", "frameHeight",
                    "concealedSamples", "concealmentEvents", "totalSamplesReceived", "fecPacketsReceived",
                    "jitterBufferDelay", "jitterBufferEmittedCount", "silentConcealedSamples"];
      const v = {};
      for (const k of keep) if (r[k] !== undefined) v[k] = r[k];
      s[r.kind] = v;
    });
    out.samples.push(s);
    if (tick++ % 2 === 0) {
      fetch(`/v1/sessions/${app.session}`, { headers: auth }).then((r) => r.json())
        .then((j) => { server = j.network || null; }).catch((e) => out.errors.push(String(e)));
    }
  };
  await sample();
  out.speech_at = performance.now();
  fetch(`/v1/sessions/${app.session}/audio`, { method: "POST", body, headers: { ...auth, "Content-Type": "audio/wav" } })
    .then((r) => { if (!r.ok) out.errors.push(`audio: HTTP ${r.status}`); })
    .catch((e) => out.errors.push(String(e)));
  out.timer = setInterval(sample, 250);
  return out.speech_at;
}"""

COLLECT_JS = """async (seconds) => {
  const out = window.probe;
  await new Promise((r) => setTimeout(r, out.speech_at + seconds * 1000 - performance.now()));
  clearInterval(out.timer);
  delete out.timer;
  // end the session now: the next run on the same link must not share it with this one's media
  await fetch(`/v1/sessions/${app.session}`, { method: "DELETE", headers: { Authorization: `Bearer ${app.token}` } })
    .catch((e) => out.errors.push(String(e)));
  return out;
}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--wav", required=True, type=Path, help="speech to post once connected")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to sample after the speech is posted")
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    wav = base64.b64encode(args.wav.read_bytes()).decode()
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(args.url + "/", timeout=args.connect_timeout * 1000)
            page.wait_for_selector("#avatar option", state="attached", timeout=args.connect_timeout * 1000)
            page.click("#connect")
            page.wait_for_function("document.getElementById('video').videoWidth > 0 && app.session",
                                   timeout=args.connect_timeout * 1000)
            page.evaluate(START_JS, {"wav": wav})
            print("speaking", file=sys.stderr, flush=True)  # the parent times a link step from here
            result = page.evaluate(COLLECT_JS, args.seconds)
            result["errors"] += errors
        finally:
            browser.close()
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
