"""What the viewer benchmark (browser.py) runs in the browser: the probe a page gets (audio
as played, video as shown), the reads of its figures, and the plain client page."""

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
  // the client module's page: when the SSE `interrupt` event reached it (a plain page has none)
  b.interruptEvents = [];
  if (app.avatar) app.avatar.addEventListener("interrupt", () => b.interruptEvents.push(performance.now()));
  // the server's utterance marks (the module page): which frame (pts) an utterance starts and
  // ends at and how much of it played, to find a given frame among those shown
  // (rtpTimestamp = a fixed origin + pts)
  b.marks = [];
  if (app.avatar) for (const name of ["utterance.start", "utterance.end"])
    app.avatar.addEventListener(name, (e) => b.marks.push([performance.now(), name, e.detail.pts,
                                                          e.detail.interrupted ?? null, e.detail.played_ms ?? null]));
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
    const answered = performance.now();
    const answer = r.ok ? await r.json() : {};  // starts_in_ms: the playout delay the server gave it
    b.posts.push({ name, t, status: r.status, answered, starts_in_ms: answer.starts_in_ms ?? null });
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
  return { rtc, audio: b.audio, video: b.video, clock: b.clock, posts: b.posts, interrupts: b.interrupts, interrupt_events: b.interruptEvents,
           marks: b.marks, timeOrigin: b.timeOrigin, rate: b.rate, session: app.session, stats: s };
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
