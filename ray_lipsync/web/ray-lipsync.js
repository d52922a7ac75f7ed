// ray-lipsync.js: the browser client of a ray-lipsync service. An ES module with no
// dependencies, served by the service at /client/ray-lipsync.js.
//
//   import { AvatarSession } from "/client/ray-lipsync.js";
//   const avatar = await AvatarSession.create({ avatar: "default" });
//   avatar.addEventListener("utterance.start", (e) => console.log(e.detail));
//   await avatar.connect({ video: document.querySelector("video") });
//   await avatar.speak("Hello!");
//   await avatar.interrupt();
//   await avatar.setState("listening");  // a clip of the avatar, looped while it is silent
//   await avatar.action("wave");         // a clip played once, then back to the state
//   await avatar.close();
//
// Playback rules it applies (why: README, "Client module"): audio plays in its own element
// from the first packet (a <video> would start its audio only with the first picture); the
// video receiver holds each picture as long as the audio is held (jitterBufferTarget = the
// audio's jitter buffer + playout delay, from getStats every 200 ms), so the mouth moves with
// the sound from the first second; an interrupt (this client's or any other's, through the
// `interrupt` event: from the SSE stream or the peer connection's "events" data channel,
// which does not pass the HTTP proxy, whichever comes first) silences the audio already
// buffered here at once.
//
// Events (CustomEvent, data in `detail`): the server's "utterance.start", "utterance.end",
// "interrupt", "avatar.state", "session.state", "session.connection", "session.closed"; and this module's
// "connectionstatechange" ({state}), "reconnecting" ({attempt}), "reconnected" and "error"
// ({message}). A connection that fails (or stays disconnected for DISCONNECTED_MS) is
// re-offered on the same session (the server keeps it `webrtc.reconnect_grace_s`).

const SERVER_EVENTS = ["utterance.start", "utterance.end", "interrupt", "avatar.state",
                       "session.state", "session.connection", "session.closed"];
const ALIGN_EVERY_MS = 200;
const FIRST_VIDEO_HOLD_MS = 60;  // the video's hold until the audio's delay is measured
const DISCONNECTED_MS = 4000;  // "disconnected" this long counts as lost
const RECONNECT_DELAYS_MS = [250, 1000, 2000, 4000, 8000];
const ICE_GATHER_MS = 3000;

/** An error answer of the service: `status` (HTTP), `error` (its code) and `detail`. */
export class ApiError extends Error {
  constructor(status, error, detail) {
    super(`${status} ${error}${detail ? `: ${detail}` : ""}`);
    this.status = status;
    this.error = error;
    this.detail = detail;
  }
}

async function request(server, method, path, { token = null, json, body, type } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
    headers["Content-Type"] = type || body.type || "application/octet-stream";
  }
  const response = await fetch(server + path, init);
  if (response.status === 204) return null;
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, payload.error || "error", payload.detail || "");
  return payload;
}

// The offer asks for Opus DTX (usedtx=1, RFC 7587): in the avatar's silence the server then
// sends one packet every 400 ms instead of 50 a second (webrtc.opus_dtx "auto").
function askOpusDtx(sdp) {
  const opus = /a=rtpmap:(\d+) opus\/48000/i.exec(sdp);
  if (!opus) return sdp;
  return sdp.replace(new RegExp(`(a=fmtp:${opus[1]} [^\r\n]*)`), (line) =>
    /usedtx=/.test(line) ? line : `${line};usedtx=1`);
}

function iceGathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ICE_GATHER_MS);  // send what there is: the answer has the server's candidates
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** One avatar session: create it, connect its media, make it speak, close it. */
export class AvatarSession extends EventTarget {
  /** A new session on the service at `server` ("" = this page's origin). */
  static async create({ server = "", avatar = "default", backend = null, apiKey = null } = {}) {
    const created = await request(server, "POST", "/v1/sessions", { token: apiKey, json: { avatar, backend } });
    return new AvatarSession(server, created);
  }

  /** The names of the avatars the service has. */
  static async avatars({ server = "" } = {}) {
    return (await request(server, "GET", "/v1/avatars")).avatars;
  }

  constructor(server, created) {
    super();
    this.server = server;
    this.id = created.session_id;
    this.token = created.token;
    this.iceServers = created.ice_servers || [];
    this.pc = null;
    this.audioDelayMs = null;  // how long the audio is held here (what the video is held)
    this.closed = false;
    this._options = null;
    this._elements = { video: null, audio: null };
    this._mic = { sender: null, track: null };
    this._events = null;
    this._alignTimer = null;
    this._unmuteTimer = null;
    this._lastStats = { audio: null, playout: null };
    this._syncPaused = false;
    this._interruptEpoch = null;  // the epoch of the last interrupt event acted on
    this._reconnecting = null;
    this._disconnectTimer = null;
  }

  _call(method, path, options = {}) {
    return request(this.server, method, `/v1/sessions/${this.id}${path}`, { token: this.token, ...options });
  }

  _emit(name, detail = {}) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }

  /** Connect the media: `video` (a <video>, muted here), `audio` (an <audio>; one is made
   * when absent), `microphone` (a MediaStreamTrack sent as speech input, or null),
   * `relayOnly` (TURN candidates only), `reconnect` (re-offer on a lost connection). */
  async connect({ video = null, audio = null, microphone = null, relayOnly = false, reconnect = true } = {}) {
    if (this.closed) throw new Error("this session is closed");
    if (video) { video.muted = true; video.playsInline = true; video.autoplay = true; }
    this._elements = { video, audio: audio || Object.assign(document.createElement("audio"), { autoplay: true }) };
    this._options = { relayOnly, reconnect };
    this._mic.track = microphone;
    this._openEvents();
    await this._negotiate();
    this._alignTimer = this._alignTimer || setInterval(() => this._alignVideo(), ALIGN_EVERY_MS);
  }

  async _negotiate() {
    // The old connection closes only once the new offer is answered: a connection closed by
    // the client is a hang-up, which ends the session on the server.
    const old = this.pc;
    const pc = new RTCPeerConnection({ iceServers: this.iceServers,
                                       iceTransportPolicy: this._options.relayOnly ? "relay" : "all" });
    this.pc = pc;
    this._lastStats = { audio: null, playout: null };
    pc.addEventListener("connectionstatechange", () => this._onConnectionState(pc));
    pc.addEventListener("track", (event) => this._attach(event));
    // the session's events on the peer connection too: an interrupt mutes without the HTTP path
    pc.createDataChannel("events").addEventListener("message", (event) => {
      const { event: name, data } = JSON.parse(event.data);
      if (name === "interrupt") this._interrupted(data);
    });
    pc.addTransceiver("video", { direction: "recvonly" });
    // audio is sendrecv from the start: the microphone comes and goes with replaceTrack
    this._mic.sender = pc.addTransceiver("audio", { direction: "sendrecv" }).sender;
    let answer;
    try {
      if (this._mic.track) await this._mic.sender.replaceTrack(this._mic.track);
      const offer = await pc.createOffer();
      await pc.setLocalDescription({ type: "offer", sdp: askOpusDtx(offer.sdp) });
      await iceGathered(pc);
      // video_hold_ms 0: this module holds the pictures for lip sync itself (jitterBufferTarget,
      // below), so the server's hold for plain <video> clients (webrtc.video_hold_ms) would only add delay.
      answer = await this._call("POST", "/offer",
        { json: { sdp: pc.localDescription.sdp, type: "offer", video_hold_ms: 0 } });
    } catch (error) {  // no new connection: the old one (if any) stays the session's
      pc.close();
      if (this.pc === pc) this.pc = old;
      throw error;
    }
    if (old) old.close();
    if (pc !== this.pc) return;  // closed or replaced meanwhile
    await pc.setRemoteDescription(answer);
  }

  _attach(event) {
    const { video, audio } = this._elements;
    const element = event.track.kind === "audio" ? audio : video;
    if (!element) return;
    if (event.track.kind === "video" && "jitterBufferTarget" in event.receiver) {
      event.receiver.jitterBufferTarget = this.audioDelayMs ?? FIRST_VIDEO_HOLD_MS;
    }
    element.srcObject = new MediaStream([event.track]);
    element.play().catch(() => {});  // autoplay rules: muted video always plays; audio may wait for a click
  }

  _onConnectionState(pc) {
    if (pc !== this.pc) return;
    const state = pc.connectionState;
    this._emit("connectionstatechange", { state });
    clearTimeout(this._disconnectTimer);
    if (!this._options.reconnect || this.closed) return;
    if (state === "failed") this.reconnect();
    if (state === "disconnected") {
      this._disconnectTimer = setTimeout(() => {
        if (pc === this.pc && pc.connectionState === "disconnected") this.reconnect();
      }, DISCONNECTED_MS);
    }
  }

  /** A new connection for this session (the server replaces the old one). Retried with
   * backoff; gives up when the session is gone (404/410) or after the last retry. */
  reconnect() {
    this._reconnecting = this._reconnecting || this._reconnectLoop().finally(() => { this._reconnecting = null; });
    return this._reconnecting;
  }

  async _reconnectLoop() {
    for (const [attempt, delay] of RECONNECT_DELAYS_MS.entries()) {
      if (this.closed) return false;
      this._emit("reconnecting", { attempt: attempt + 1 });
      try {
        await this._negotiate();
        this._emit("reconnected");
        return true;
      } catch (error) {
        if (error instanceof ApiError && (error.status === 404 || error.status === 410)) {
          this._emit("session.closed", { session_id: this.id, reason: `reconnect refused: ${error.message}` });
          await this.close();
          return false;
        }
        this._emit("error", { message: `reconnect: ${error.message}` });
      }
      await sleep(delay);
    }
    return false;
  }

  _openEvents() {
    if (this._events) return;
    const url = `${this.server}/v1/sessions/${this.id}/events?token=${encodeURIComponent(this.token)}`;
    this._events = new EventSource(url);  // EventSource sends no headers: the token is in the query
    for (const name of SERVER_EVENTS) {
      this._events.addEventListener(name, (event) => {
        if (name === "interrupt") this._interrupted(JSON.parse(event.data));  // cut by any client
        if (name === "session.closed") this._events.close();  // else EventSource retries
        this._emit(name, JSON.parse(event.data));
      });
    }
  }

  /** Say `text` (the service's offline TTS); `interrupt` replaces what is playing. */
  speak(text, { interrupt = false } = {}) {
    if (interrupt) this._silenceBuffered();
    return this._call("POST", "/speak", { json: { text, interrupt } });
  }

  /** Play an audio file or Blob (WAV, MP3, OGG, FLAC, raw L16 with its `type`). */
  sendAudio(blob, { interrupt = false, type = null } = {}) {
    if (interrupt) this._silenceBuffered();
    return this._call("POST", `/audio${interrupt ? "?interrupt=true" : ""}`, { body: blob, type });
  }

  /** Stop the speech now, also what this page has buffered; the cut utterance's report. */
  interrupt() {
    this._silenceBuffered();
    return this._call("POST", "/interrupt");
  }

  /** Make clip `state` of the avatar its silent state ("idle": its own cycle); the answer
   * says from which frame ({state, clip, action, from_frame, action_end_frame}). */
  setState(state) {
    return this._call("POST", "/state", { json: { state } });
  }

  /** Play clip `clip` of the avatar once, then return to the state (same answer). */
  action(clip) {
    return this._call("POST", "/state", { json: { action: clip } });
  }

  /** Stream speech as it is produced (a voice agent's TTS): see `SpeechStream`. */
  stream({ rate = 16000 } = {}) {
    const base = new URL(this.server || location.origin, location.href);
    base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
    base.pathname = `/v1/sessions/${this.id}/stream`;
    base.search = `?rate=${rate}&token=${encodeURIComponent(this.token)}`;
    return new SpeechStream(base.toString(), this);
  }

  /** Send `track` (a microphone MediaStreamTrack) as speech input, or stop with null. */
  async setMicrophone(track) {
    if (this._mic.track && this._mic.track !== track) this._mic.track.stop();
    this._mic.track = track;
    if (this._mic.sender) await this._mic.sender.replaceTrack(track);
  }

  /** The session's state (GET /v1/sessions/{id}). */
  status() {
    return this._call("GET", "");
  }

  /** End the session: media, events and the session on the server. */
  async close() {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this._alignTimer);
    clearTimeout(this._unmuteTimer);
    clearTimeout(this._disconnectTimer);
    if (this._events) this._events.close();
    if (this._mic.track) this._mic.track.stop();
    if (this.pc) this.pc.close();
    for (const element of Object.values(this._elements)) if (element) element.srcObject = null;
    try { await this._call("DELETE", ""); } catch (error) { /* gone already */ }
  }

  _receiver(kind) {
    return this.pc ? this.pc.getReceivers().find((r) => r.track && r.track.kind === kind) : undefined;
  }

  // Lip sync from the first second: Chromium's own A/V sync corrects only slowly (after two
  // RTCP sender reports per stream, in steps every second), so the video receiver is asked to
  // hold pictures as long as the audio is held (jitter buffer + playout delay, from getStats).
  async _alignVideo() {
    const receiver = this._receiver("video");
    if (!receiver || !("jitterBufferTarget" in receiver) || this._syncPaused) return;
    let audio = null, playout = null;
    (await this.pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "audio") audio = r;
      if (r.type === "media-playout") playout = r;
    });
    if (!audio || !audio.jitterBufferEmittedCount) return;
    const last = this._lastStats;
    const rate = (now, before, value, count) => (before && now[count] > before[count]
      ? (now[value] - before[value]) / (now[count] - before[count]) : null);
    const buffered = rate(audio, last.audio, "jitterBufferDelay", "jitterBufferEmittedCount");
    const played = playout ? rate(playout, last.playout, "totalPlayoutDelay", "totalSamplesCount") : 0;
    this._lastStats = { audio, playout };
    if (buffered === null) return;
    const delayMs = 1000 * (buffered + (played || 0));
    this.audioDelayMs = this.audioDelayMs === null ? delayMs : 0.7 * this.audioDelayMs + 0.3 * delayMs;
    const target = Math.round(this.audioDelayMs);
    if (Math.abs((receiver.jitterBufferTarget || 0) - target) >= 5) receiver.jitterBufferTarget = target;
  }

  // An interrupt's event (by any client), from the SSE stream or the data channel: once each.
  _interrupted(detail) {
    if (detail.epoch === this._interruptEpoch) return;
    this._interruptEpoch = detail.epoch;
    this._silenceBuffered();
  }

  // The server cuts from its next frame, but what this page buffered would play on: silence
  // the audio until it drained, and let the held pictures through (the mouth closes sooner).
  _silenceBuffered() {
    const audio = this._receiver("audio");
    const video = this._receiver("video");
    if (audio) audio.track.enabled = false;  // a disabled track plays silence
    if (video && "jitterBufferTarget" in video) { this._syncPaused = true; video.jitterBufferTarget = 0; }
    clearTimeout(this._unmuteTimer);
    this._unmuteTimer = setTimeout(() => {
      if (audio) audio.track.enabled = true;
      this._syncPaused = false;
      this._alignVideo();
    }, (this.audioDelayMs || 100) + 40);
  }
}

/** Speech streamed over the session's WebSocket: `send` PCM (Int16Array, or Float32Array in
 * -1..1) at the rate given to `stream()`, `flush()` ends an utterance, `clear()` cuts.
 * Events: "open", "playback.started", "playback.finished", "error", "close". */
export class SpeechStream extends EventTarget {
  constructor(url, session) {
    super();
    this._session = session;
    this.socket = new WebSocket(url);
    this.socket.binaryType = "arraybuffer";
    this.opened = new Promise((resolve, reject) => {
      this.socket.addEventListener("open", () => { this.dispatchEvent(new CustomEvent("open")); resolve(); });
      this.socket.addEventListener("error", () => reject(new Error("the speech stream did not open")));
    });
    this.socket.addEventListener("message", (event) => {
      if (typeof event.data !== "string") return;
      const message = JSON.parse(event.data);
      this.dispatchEvent(new CustomEvent(message.type, { detail: message }));
    });
    this.socket.addEventListener("close", (event) => {
      this.dispatchEvent(new CustomEvent("close", { detail: { code: event.code, reason: event.reason } }));
    });
  }

  send(samples) {
    let pcm = samples;
    if (samples instanceof Float32Array) {
      pcm = new Int16Array(samples.length);
      for (let i = 0; i < samples.length; i++) pcm[i] = Math.max(-1, Math.min(1, samples[i])) * 32767;
    }
    if (!(pcm instanceof Int16Array)) throw new TypeError("send() takes an Int16Array or a Float32Array");
    this.socket.send(pcm.buffer.slice(pcm.byteOffset, pcm.byteOffset + pcm.byteLength));
  }

  flush() { this.socket.send(JSON.stringify({ type: "flush" })); }

  clear() {
    this._session._silenceBuffered();
    this.socket.send(JSON.stringify({ type: "clear" }));
  }

  close() { this.socket.close(); }
}
