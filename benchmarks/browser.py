"""What the viewer sees: onset, A/V offset and interrupt measured in headless Chromium.

N pages of Debian's chromium (driven by playwright) each open the service's own page, press
Connect and play the WebRTC stream as a person would. In every page a probe measures:

- audio as played: an AudioWorklet taps the remote audio track (the same track the <video>
  element plays) and reports, per 128-sample block, the first and last sample louder than a
  threshold; AudioContext time is mapped to the page's clock with getOutputTimestamp();
- video as shown: requestVideoFrameCallback gives each frame's expected display time; the
  frame is drawn into a canvas and the mean absolute difference of the lower face from the
  idle picture shown when the audio is posted is the "mouth motion" signal.

The service runs in this process (HTTP API over an in-process gateway and LocalPipeline, the
procedural backend, like tests/test_browser.py) and records, for every frame it sends, its
presentation time, the first/last loud sample of its audio and the same mouth signal computed
on the picture before encoding. With both sides on one machine's wall clock:

- onset = first audible sample (mouth: first moving frame) at the viewer - POST of the audio;
- A/V offset = (audio at the viewer - that audio's presentation time at the server)
  - (mouth frame at the viewer - its presentation time at the server): positive = the sound
  is late against the mouth. The renderer's own articulation (which frame first moves) cancels;
- interrupt = POST /interrupt -> last audible sample (mouth: first idle frame) at the viewer.

`--inject-audio-delay-ms 200` puts a WebAudio DelayNode in front of the probe's audio tap: the
reported offsets and audio onsets must grow by ~200 ms (validation of the method).
`--sink-monitor spk.monitor` (PulseAudio running with a null sink `spk`, see
benchmarks/sink_recorder.py) also records what the browser sends to its audio device and
reports the first page's figures with that as the audio reference too ("sink" in
`by_audio_clock`; the other pages' audio elements are muted): when a speaker would play it,
which tells which of the page-side references is right.

    python benchmarks/browser.py --sessions 1 --json benchmarks/results/browser_1.json
    python benchmarks/browser.py --sessions 4 --json benchmarks/results/browser_4.json
    python benchmarks/browser.py --sessions 1 --inject-audio-delay-ms 200 --json ...
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import random
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_lipsync.config import Settings  # noqa: E402
from ray_lipsync.heap import freeze_startup_heap  # noqa: E402
from ray_lipsync.streaming.local import LocalPipeline  # noqa: E402
from sink_recorder import SinkRecorder, loud_blocks  # noqa: E402
from static_site import StaticPage  # noqa: E402
from viewer_analysis import MOUTH_THRESHOLD, analyse, summarise  # noqa: E402

log = logging.getLogger("benchmarks.browser")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
LOUD = 0.02  # |sample| above this is audible (-34 dBFS)
PROBE_SIZE = (64, 32)  # the lower-face box is compared at this size (w, h)
SHORT = "Hi."
LONG = "The quick brown fox jumps over the lazy dog, and then it runs away again."


# -- the service ----------------------------------------------------------------------------


def mouth_box(avatar) -> tuple[float, float, float, float]:
    """Lower half of the face crop of the first avatar frame, as fractions of the frame."""
    h, w = avatar.frames[0].shape[:2]
    x1, y1, x2, y2 = (float(v) for v in avatar.crop_boxes[0])
    return x1 / w, (y1 + 0.55 * (y2 - y1)) / h, x2 / w, y2 / h


def probe(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    h, w = image.shape[:2]
    x1, y1, x2, y2 = int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)
    return cv2.resize(image[y1:y2, x1:x2], PROBE_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)


class RecordingPipeline(LocalPipeline):
    """LocalPipeline that records what each session sends (for the server side of the timing)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.records: dict[str, list[dict]] = {}
        self.boxes: dict[str, tuple[float, ...]] = {}
        self.last_created: str | None = None
        self.pushes: dict[str, list[float]] = {}

    async def create_session(self, *args, **kwargs):
        session = await super().create_session(*args, **kwargs)
        box = mouth_box(session.avatar)
        idle = probe(session.avatar.frames[0], box)
        self.boxes[session.session_id] = box
        rows = self.records[session.session_id] = []
        sent = session.record_sent

        def record_sent(frame) -> None:
            loud = np.flatnonzero(np.abs(frame.audio) > LOUD)
            rows.append({
                "k": frame.frame_index, "pt": frame.presentation_time, "speech": frame.speech,
                "first_loud": int(loud[0]) if len(loud) else -1, "last_loud": int(loud[-1]) if len(loud) else -1,
                "mouth": float(np.abs(probe(frame.image, box) - idle).mean()), "dropped": frame.dropped,
            })
            sent(frame)

        session.record_sent = record_sent  # read by SessionPeer when the offer is answered
        pushes = self.pushes[session.session_id] = []
        push = session.push_audio

        async def push_audio(samples, *args, **kwargs):
            at = time.time()
            utterance = await push(samples, *args, **kwargs)
            pushes.append((at, getattr(utterance, "delay_s", None), list(session.latencies_ms())[-250:]))
            return utterance

        session.push_audio = push_audio
        self.last_created = session.session_id
        return session


def recording_gateway(settings: Settings, pipeline: RecordingPipeline):
    """The in-process Gateway, remembering which pipeline session each public id is."""
    from ray_lipsync.api.gateway import Gateway

    class RecordingGateway(Gateway):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.internal: dict[str, str] = {}

        async def create_session(self, *args, **kwargs) -> dict:
            created = await super().create_session(*args, **kwargs)
            # no await between the pipeline's return and here: last_created is this session
            self.internal[created["session_id"]] = pipeline.last_created
            return created

    return RecordingGateway(settings, pipeline, "local")


class Service:
    """The HTTP API + LocalPipeline served by uvicorn in a thread on 127.0.0.1:port."""

    def __init__(self, settings: Settings, port: int) -> None:
        import uvicorn

        from ray_lipsync.api.routes import build_api

        self.pipeline = RecordingPipeline(settings)
        self.gateway = recording_gateway(settings, self.pipeline)
        self.server = uvicorn.Server(uvicorn.Config(build_api(settings, self.gateway), host="127.0.0.1",
                                                    port=port, log_level="warning"))
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, name="bench-service", daemon=True)

    def __enter__(self) -> Service:
        freeze_startup_heap()  # as the gateway does once it started
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the service did not start within 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        loop = getattr(self.server, "_loop", None)
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self.gateway.shutdown(), loop).result(20)
        self.server.should_exit = True
        self.thread.join(20)


# -- the probe in the page ------------------------------------------------------------------

PROBE_JS = """async ({ delayMs, loud, box, size, wavs, server }) => {
  const b = window.bench = { audio: [], video: [], clock: [], posts: [], interrupts: [],
                             timeOrigin: performance.timeOrigin, ref: null, wavs: {}, server };
  for (const [name, data] of Object.entries(wavs))
    b.wavs[name] = new Blob([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], { type: "audio/wav" });
  const ctx = new AudioContext();
  await ctx.resume();
  const code = `class Tap extends AudioWorkletProcessor {
    constructor() { super(); this.out = []; }
    process(inputs) {
      const ch = inputs[0] && inputs[0][0];
      if (ch) {
        let first = -1, last = -1;
        for (let i = 0; i < ch.length; i++) if (Math.abs(ch[i]) > ${loud}) { if (first < 0) first = i; last = i; }
        if (first >= 0) this.out.push(currentFrame, first, last);
        if (this.out.length >= 48 || (this.out.length && currentFrame % 4096 < 128)) { this.port.postMessage(this.out); this.out = []; }
      }
      return true;
    }
  }
  registerProcessor("tap", Tap);`;
  await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([code], { type: "application/javascript" })));
  const receiver = app.pc.getReceivers().find((r) => r.track && r.track.kind === "audio");
  const src = ctx.createMediaStreamSource(new MediaStream([receiver.track]));
  const tap = new AudioWorkletNode(ctx, "tap");
  let head = src;
  if (delayMs > 0) { const d = ctx.createDelay(2.0); d.delayTime.value = delayMs / 1000; src.connect(d); head = d; }
  head.connect(tap);
  const mute = ctx.createGain(); mute.gain.value = 0; tap.connect(mute).connect(ctx.destination);
  tap.port.onmessage = (e) => { for (const v of e.data) b.audio.push(v); };
  b.rate = ctx.sampleRate;
  b.ssrc = [];  // WebRTC's own view: when the last audio packet was played, and its level
  setInterval(() => { for (const s of receiver.getSynchronizationSources())
                        b.ssrc.push([s.timestamp, s.rtpTimestamp || 0, s.audioLevel || 0, performance.now()]); }, 5);
  setInterval(() => { const t = ctx.getOutputTimestamp();
                      b.clock.push([t.contextTime, t.performanceTime, ctx.currentTime, performance.now()]); }, 200);
  const video = document.getElementById("video");
  const canvas = document.createElement("canvas");
  canvas.width = size[0]; canvas.height = size[1];
  const g = canvas.getContext("2d", { willReadFrequently: true });
  const grab = () => {
    const w = video.videoWidth, h = video.videoHeight;
    g.drawImage(video, box[0] * w, box[1] * h, (box[2] - box[0]) * w, (box[3] - box[1]) * h, 0, 0, size[0], size[1]);
    return g.getImageData(0, 0, size[0], size[1]).data;
  };
  b.setReference = () => { b.ref = grab(); };
  const onFrame = (now, meta) => {
    if (b.ref) {
      const px = grab(); let sum = 0, n = 0;
      for (let i = 0; i < px.length; i += 4) { sum += Math.abs(px[i] - b.ref[i]) + Math.abs(px[i + 1] - b.ref[i + 1]) + Math.abs(px[i + 2] - b.ref[i + 2]); n += 3; }
      b.video.push([meta.expectedDisplayTime, meta.presentationTime, meta.rtpTimestamp || 0, sum / n]);
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
  const auth = () => ({ Authorization: `Bearer ${app.token}` });
  b.say = async (name) => {
    // the idle picture as shown now: the codec leaves it a little different after each
    // utterance (libvpx's static threshold keeps blocks that barely changed), so a reference
    // taken at connect would count that as motion
    b.ref = grab();
    const t = performance.now();
    const r = await fetch(`${server}/v1/sessions/${app.session}/audio`, { method: "POST", body: b.wavs[name],
                          headers: { ...auth(), "Content-Type": "audio/wav" } });
    b.posts.push({ name, t, status: r.status, answered: performance.now() });
  };
  b.interrupt = async (how) => {  // "page": the page's Interrupt button; "api": a bare POST
    const t = performance.now();
    if (how === "page") { document.getElementById("interrupt").click(); b.interrupts.push({ t, how }); return; }
    const r = await fetch(`${server}/v1/sessions/${app.session}/interrupt`, { method: "POST", headers: auth() });
    b.interrupts.push({ t, how, status: r.status, answered: performance.now() });
  };
  return ctx.sampleRate;
}"""

STATS_JS = """async () => {
  window.bench.stats = await (await fetch(`${window.bench.server}/v1/sessions/${app.session}`,
                                          { headers: { Authorization: `Bearer ${app.token}` } })).json();
}"""

COLLECT_JS = """async () => {
  const s = window.bench.stats;
  const b = window.bench;
  const rtc = {};
  (await app.pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp") {
      const n = r.jitterBufferEmittedCount || 1;
      rtc[r.kind] = { jitter_buffer_ms: 1000 * r.jitterBufferDelay / n,
                      jitter_buffer_target_ms: 1000 * (r.jitterBufferTargetDelay || 0) / n,
                      jitter_buffer_minimum_ms: 1000 * (r.jitterBufferMinimumDelay || 0) / n,
                      jitter_ms: 1000 * (r.jitter || 0), emitted: r.jitterBufferEmittedCount };
    }
    if (r.type === "media-playout" && r.totalSamplesCount)
      rtc.playout_ms = 1000 * r.totalPlayoutDelay / r.totalSamplesCount;
  });
  return { rtc, audio: b.audio, video: b.video, ssrc: b.ssrc, clock: b.clock, posts: b.posts, interrupts: b.interrupts,
           timeOrigin: b.timeOrigin, rate: b.rate, session: app.session, stats: s };
}"""


# What a team writes after a WebRTC tutorial: recvonly transceivers, the stream on one <video>.
PLAIN_PAGE = """<!doctype html><meta charset="utf-8"><title>plain client</title>
<video id="video" autoplay playsinline></video>
<script>
"use strict";
const SERVER = "%SERVER%";
window.app = { pc: null, session: null, token: null };
async function start() {
  const post = (path, body, token) => fetch(SERVER + path, { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) } });
  const created = await (await post("/v1/sessions", {})).json();
  app.session = created.session_id; app.token = created.token;
  const pc = app.pc = new RTCPeerConnection({ iceServers: created.ice_servers || [] });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.ontrack = (e) => { const v = document.getElementById("video"); if (v.srcObject !== e.streams[0]) v.srcObject = e.streams[0]; };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => { if (pc.iceGatheringState === "complete") resolve(); });
  });
  const answer = await (await post(`/v1/sessions/${app.session}/offer`, { sdp: pc.localDescription.sdp, type: "offer" }, app.token)).json();
  await pc.setRemoteDescription(answer);
}
</script>"""


class ServeDeployment:
    """`ray-lipsync serve` as users run it (Ray + Serve, its own process tree); the viewer's
    figures only (no server-side frame records: the A/V offset uses `articulation_lead_s`)."""

    def __init__(self, args, settings: dict) -> None:
        from e2e import start_server

        self.url = f"http://127.0.0.1:{args.port}"
        self.process = start_server(args.port, [], None, settings)

    async def __aenter__(self) -> "ServeDeployment":
        import httpx

        from e2e import wait_healthy, warm_up

        async with httpx.AsyncClient(base_url=self.url, timeout=60) as http:
            await wait_healthy(http, 240, self.process)
            await warm_up(http, "default")
        return self

    async def __aexit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(60)


def default_avatar():
    """The default avatar, as the server prepares it (deterministic)."""
    from ray_lipsync.render import load_render_avatar

    return load_render_avatar(Settings(home=Path(tempfile.gettempdir()) / "lipsync-browser-avatar"), None)


async def articulation_lead_s(wav64: str) -> float:
    """When the first loud sample of the phrase comes after the first moving mouth frame, as the
    service itself sends them (a LocalPipeline session of the default avatar, no WebRTC): the
    server-side part of (sound at the viewer - mouth at the viewer), which the A/V offset of a
    run without server records subtracts."""
    with wave.open(io.BytesIO(base64.b64decode(wav64))) as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32767

    async def frames() -> list:
        pipeline = LocalPipeline(Settings(home=Path(tempfile.gettempdir()) / "lipsync-browser-avatar"))
        session = await pipeline.create_session()
        box = mouth_box(session.avatar)
        idle = probe(session.avatar.frames[0], box)
        utterance = await session.push_audio(samples)
        out = []
        async for frame in session.frames():
            if frame.frame_index >= utterance.start_frame:
                out.append((frame.frame_index - utterance.start_frame, frame.audio,
                            float(np.abs(probe(frame.image, box) - idle).mean())))
            if frame.frame_index >= utterance.end_frame:
                break
        await pipeline.shutdown()
        return out

    rows = await frames()
    mouth = next(k for k, _, signal in rows if signal > MOUTH_THRESHOLD)
    sound = next(k * 0.04 + np.flatnonzero(np.abs(a) > LOUD)[0] / 16000 for k, a, _ in rows
                 if a is not None and (np.abs(a) > LOUD).any())
    return float(sound - mouth * 0.04)


def wav_bytes(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def phrases() -> dict[str, str]:
    """The short and long phrase as base64 WAV, leading silence trimmed (onset = system only)."""
    from ray_lipsync.tts import Synthesizer

    synth, out = Synthesizer(), {}
    for name, text in (("short", SHORT), ("long", LONG)):
        audio = synth.synthesize(text)
        first = int(np.flatnonzero(np.abs(audio) > LOUD)[0])
        out[name] = base64.b64encode(wav_bytes(audio[first:])).decode()
    return out


@dataclass
class Target:
    """Where a viewer goes: its page, the service's base URL seen from it ("" = same origin),
    which client it is, and (in-process only) the session's mouth box and internal id."""

    page_url: str
    server: str
    client: str  # "page" (the service's page, built on the client module) or "plain"
    box: Callable[[str], tuple]
    internal: Callable[[str], str | None]


async def run_viewer(browser, target: Target, wavs: dict, args, index: int,
                     done: asyncio.Barrier) -> dict:
    """One page: connect, probe, speak short phrases, then interrupt long ones. Every page
    finishes its script before any reads its figures, and closes only once all have read
    them: the reading and a page's teardown (Chromium and the server's peer close, on the same
    cores) must not count against the sessions still measuring."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(target.page_url)
    if target.client == "page":
        await page.wait_for_selector("#avatar option", state="attached", timeout=20_000)
    await asyncio.sleep(index * 0.37)  # sessions do not move in lockstep
    if target.client == "page":
        await page.click("#connect")
    else:
        await page.evaluate("start()")
    await page.wait_for_function("document.getElementById('video').videoWidth > 0 && app.session", timeout=60_000)
    connected = await page.evaluate("performance.timeOrigin + performance.now()")
    session = await page.evaluate("app.session")
    internal = target.internal(session)
    await page.evaluate(PROBE_JS, {"delayMs": args.inject_audio_delay_ms, "loud": LOUD,
                                   "box": list(target.box(session)), "size": list(PROBE_SIZE),
                                   "wavs": wavs, "server": target.server})
    if args.sink_monitor and index > 0:  # the sink records one mix: only the first page is heard
        await page.evaluate("document.getElementById('audio').muted = true")
    await asyncio.sleep(1.0)  # the idle picture's quality settles (libvpx improves it for ~1 s)
    await page.evaluate("bench.setReference()")
    rng = random.Random(index)
    start = time.time()
    for i in range(args.utterances):  # one short phrase about every interval_s from connect on
        await asyncio.sleep(max(0.0, start + i * args.interval_s + rng.uniform(0, 0.2) - time.time()))
        await page.evaluate("bench.say('short')")
    await asyncio.sleep(args.interval_s)
    for i in range(args.interrupts):
        await page.evaluate("bench.say('long')")
        await asyncio.sleep(args.interrupt_after_s + rng.uniform(0, 0.3))
        how = "page" if i % 2 == 0 and target.client == "page" else "api"  # a plain page has no button
        await page.evaluate(f"bench.interrupt('{how}')")
        await asyncio.sleep(1.0)
    # The session's figures are read while every page still plays; the probe data (large)
    # comes after, as this process (which also hosts the service) parsing it stalls the senders.
    await done.wait()
    await page.evaluate(STATS_JS)
    await done.wait()
    data = await page.evaluate(COLLECT_JS)
    data["connected_ms"] = connected
    data["internal"] = internal
    data["errors"] = errors
    await done.wait()
    await page.close()
    return data


# -- analysis -------------------------------------------------------------------------------


async def benchmark(args) -> dict:
    from contextlib import AsyncExitStack

    from playwright.async_api import async_playwright

    home = Path(args.home or Path(tempfile.gettempdir()) / "lipsync-browser-home")
    pipeline = {"playout_adaptive": False} if args.fixed_playout else {}
    if args.playout_delay_ms is not None:
        pipeline["playout_delay_ms"] = args.playout_delay_ms
    site_port = args.port + 1
    # admission off: the viewers' Chromium runs on the same 2 cores and would count as the
    # service's load; the plain page is on its own origin (another port), allowed by CORS
    sections = {"pipeline": pipeline, "webrtc": {"still_fps": args.still_fps},
                "serve": {"admission": {"enabled": False},
                                                "cors_origins": [f"http://127.0.0.1:{site_port}"]}}
    settings = Settings(home=home, **sections)
    wavs = phrases()
    lead = await articulation_lead_s(wavs["short"])
    recorder = SinkRecorder(args.sink_monitor) if args.sink_monitor else None
    async with AsyncExitStack() as stack:
        service = None
        if args.deployment == "local":
            service = stack.enter_context(Service(settings, args.port))
            url = service.url
            internal = lambda session: service.gateway.internal[session]  # noqa: E731
            box = lambda session: service.pipeline.boxes[internal(session)]  # noqa: E731
        else:
            url = (await stack.enter_async_context(ServeDeployment(args, sections))).url
            avatar_box = mouth_box(default_avatar())
            internal = lambda session: None  # noqa: E731
            box = lambda session: avatar_box  # noqa: E731
        if args.client == "plain":
            site = stack.enter_context(StaticPage(site_port, PLAIN_PAGE.replace("%SERVER%", url)))
            target = Target(site.url + "/", url, "plain", box, internal)
        else:
            target = Target(url + "/", "", "page", box, internal)
        async with async_playwright() as pw:
            # with a sink to record, the browser plays sound (playwright mutes it by default)
            unmuted = {"ignore_default_args": ["--mute-audio"]} if recorder else {}
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                                               **unmuted)
            if recorder:
                recorder.start()
            try:
                done = asyncio.Barrier(args.sessions)
                raw = await asyncio.gather(*(run_viewer(browser, target, wavs, args, i, done)
                                             for i in range(args.sessions)))
            finally:
                await browser.close()
        if recorder:
            samples, t0 = recorder.stop()
            first, last = loud_blocks(samples, t0, LOUD)
            raw[0]["sink_first"], raw[0]["sink_last"] = first.tolist(), last.tolist()

        def analysed(d: dict, clock: str | None = None) -> dict:
            if service is None:
                return analyse(d, None, None, args, clock, lead_s=lead)
            return analyse(d, service.pipeline.records[d["internal"]], service.pipeline.pushes[d["internal"]],
                           args, clock, lead_s=lead)

        sessions = [analysed(d) for d in raw]
        by_clock = {}
        for clock in ("playout", "output", "context", *(("sink",) if recorder else ())):  # how much the audio reference matters
            measured = raw[:1] if clock == "sink" else raw  # the sink plays the first page only
            other = summarise([analysed(d, clock) for d in measured])
            by_clock[clock] = {k: other[k] for k in ("onset_audio_ms_p50", "av_offset_ms_p50_from_2s",
                                                     "av_offset_ms_first_2s", "interrupt_audio_ms_p50")}
        if args.raw:
            records = service.pipeline.records if service is not None else None
            Path(args.raw).write_text(json.dumps({"viewers": raw, "records": records}))
    return {
        "config": {"deployment": args.deployment, "client": args.client, "sessions": args.sessions,
                   "utterances": args.utterances, "interrupts": args.interrupts,
                   "inject_audio_delay_ms": args.inject_audio_delay_ms, "audio_clock": args.audio_clock,
                   "playout_adaptive": getattr(settings.pipeline, "playout_adaptive", False),
                   "playout_delay_ms": settings.pipeline.playout_delay_ms,
                   "playout_min_ms": getattr(settings.pipeline, "playout_min_ms", None),
                   "backend": settings.backend, "articulation_lead_ms": round(1000 * lead, 1),
                   "commit": git_commit()},
        "summary": summarise(sessions),
        "by_audio_clock": by_clock,
        "sessions": sessions,
    }


def git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--deployment", choices=["local", "serve"], default="local",
                        help="local: the HTTP API over LocalPipeline in this process (server-side "
                        "frame records); serve: `ray-lipsync serve` (Ray + Serve) as users run it")
    parser.add_argument("--client", choices=["page", "plain"], default="page",
                        help="page: the service's own page (built on /client/ray-lipsync.js); "
                        "plain: a minimal page with the stream on one <video>, on another origin")
    parser.add_argument("--utterances", type=int, default=10, help="short phrases per session")
    parser.add_argument("--interval-s", type=float, default=1.0, help="between short phrases")
    parser.add_argument("--interrupts", type=int, default=4, help="long phrases cut per session "
                        "(alternately with the page's Interrupt button and a bare API call)")
    parser.add_argument("--interrupt-after-s", type=float, default=0.9)
    parser.add_argument("--inject-audio-delay-ms", type=float, default=0.0)
    parser.add_argument("--audio-clock", choices=["playout", "output", "context"], default="playout",
                        help="when a sample is heard: when the probe got it (context) plus Chromium's "
                        "reported audio playout delay (playout, default), or WebAudio's own output "
                        "time (output, getOutputTimestamp: adds WebAudio's output latency)")
    parser.add_argument("--sink-monitor", default=None, help="PulseAudio source to record what the "
                        "browser plays (e.g. spk.monitor of a null sink; the first page is heard)")
    parser.add_argument("--still-fps", type=float, default=5.0, help="webrtc.still_fps (25: every "
                        "frame of the still idle picture is sent)")
    parser.add_argument("--fixed-playout", action="store_true", help="fixed D (pipeline.playout_delay_ms)")
    parser.add_argument("--playout-delay-ms", type=int, default=None)
    parser.add_argument("--port", type=int, default=19500)
    parser.add_argument("--home", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--raw", default=None, help="also write the raw probe data here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(benchmark(args))
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
