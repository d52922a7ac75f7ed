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
    python benchmarks/browser.py --deployment serve --client plain --sessions 1 --json ...

The service side (in-process recording service, `ray-lipsync serve`, the mouth signal) is in
viewer_service.py, what runs in the page (probe, plain client) in viewer_page.py, the
analysis in viewer_analysis.py.
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
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from output import git_commit  # noqa: E402
from ray_lipsync.config import Settings  # noqa: E402
from sink_recorder import SinkRecorder, loud_blocks  # noqa: E402
from static_site import StaticPage  # noqa: E402
from viewer_analysis import analyse, summarise  # noqa: E402
from viewer_page import COLLECT_JS, PLAIN_PAGE, PROBE_JS, STATS_JS  # noqa: E402
from viewer_service import (LOUD, PROBE_SIZE, ServeDeployment, Service, articulation_lead_s,  # noqa: E402
                            default_avatar, mouth_box)

log = logging.getLogger("benchmarks.browser")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
SHORT = "Hi."
LONG = "The quick brown fox jumps over the lazy dog, and then it runs away again."


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


def chromium_executable(nice: int, home: Path) -> str:
    """Chromium, or a wrapper that starts it at niceness `nice` (its processes inherit it):
    the viewers then share this machine's cores with the server as guests would, where in a
    deployment they run on the users' machines."""
    if not nice:
        return CHROMIUM
    wrapper = home / f"chromium-nice{nice}"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nexec nice -n {int(nice)} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


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
        await page.evaluate("(document.getElementById('audio') || document.getElementById('video')).muted = true")
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


async def talkers(url: str, count: int, seconds: float) -> list[dict]:
    """`count` more sessions that talk all along (aiortc clients streaming TTS over the
    session WebSocket, as e2e.py's): the service's load of `count` more sessions, at far less
    client CPU than as many Chromium pages. Their frames sent / dropped and received fps."""
    import httpx

    from e2e import DEFAULT_TEXT, run_client, speech

    samples = await asyncio.to_thread(speech, DEFAULT_TEXT)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        results = await asyncio.gather(*(run_client(http, samples, seconds, "default", "stream")
                                         for _ in range(count)))
    return [{"frames_sent": r.frames_sent, "frames_dropped": r.frames_dropped, "received_fps": r.received_fps,
             "latency_ms_p50": r.latency_ms_p50, "errors": r.errors} for r in results]


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
    webrtc = {"still_fps": args.still_fps, "opus_dtx": args.opus_dtx}
    if args.video_hold_ms is not None:
        webrtc["video_hold_ms"] = args.video_hold_ms
    sections = {"pipeline": pipeline, "webrtc": webrtc,
                "serve": {"admission": {"enabled": False},
                                                "cors_origins": [f"http://127.0.0.1:{site_port}"]}}
    settings = Settings(home=home, **sections)
    wavs = phrases()
    lead, mouth_frame = await articulation_lead_s(wavs["short"])
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
            browser = await pw.chromium.launch(executable_path=chromium_executable(args.chromium_nice, home),
                                               headless=True, args=CHROMIUM_FLAGS, **unmuted)
            if recorder:
                recorder.start()
            talking = None
            if args.talkers:  # talking before the pages connect, until after they are done
                script_s = args.utterances * args.interval_s + args.interrupts * (args.interrupt_after_s + 1.3)
                talking = asyncio.ensure_future(talkers(url, args.talkers, script_s + 25))
                await asyncio.sleep(5)
            try:
                done = asyncio.Barrier(args.sessions)
                raw = await asyncio.gather(*(run_viewer(browser, target, wavs, args, i, done)
                                             for i in range(args.sessions)))
            finally:
                await browser.close()
            talked = await talking if talking is not None else []
        if recorder:
            samples, t0 = recorder.stop()
            first, last = loud_blocks(samples, t0, LOUD)
            raw[0]["sink_first"], raw[0]["sink_last"] = first.tolist(), last.tolist()

        def analysed(d: dict, clock: str | None = None) -> dict:
            if service is None:
                return analyse(d, None, None, args, clock, lead_s=lead, mouth_frame=mouth_frame)
            return analyse(d, service.pipeline.records[d["internal"]], service.pipeline.pushes[d["internal"]],
                           args, clock, lead_s=lead, mouth_frame=mouth_frame)

        sessions = [analysed(d) for d in raw]
        by_clock = {}
        for clock in ("playout", "output", "context", *(("sink",) if recorder else ())):  # how much the audio reference matters
            measured = raw[:1] if clock == "sink" else raw  # the sink plays the first page only
            other = summarise([analysed(d, clock) for d in measured])
            by_clock[clock] = {k: other[k] for k in ("onset_audio_ms_p50", "av_offset_ms_p50_from_2s",
                                                     "av_offset_ms_first_2s", "interrupt_audio_ms_p50",
                                                     "interrupt_api_audio_ms_p50")}
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
                   "opus_dtx": settings.webrtc.opus_dtx, "video_hold_ms": settings.webrtc.video_hold_ms,
                   "chromium_nice": args.chromium_nice,
                   "talkers": args.talkers,
                   "backend": settings.backend, "articulation_lead_ms": round(1000 * lead, 1),
                   "commit": git_commit()},
        "summary": summarise(sessions),
        "by_audio_clock": by_clock,
        "sessions": sessions,
        "talkers": talked,
    }


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
    parser.add_argument("--opus-dtx", choices=["auto", "on", "off"], default="auto",
                        help="webrtc.opus_dtx (auto: as the client asks; the module page does)")
    parser.add_argument("--video-hold-ms", type=int, default=None,
                        help="webrtc.video_hold_ms (what the plain page gets; the module page asks for 0)")
    parser.add_argument("--fixed-playout", action="store_true", help="fixed D (pipeline.playout_delay_ms)")
    parser.add_argument("--playout-delay-ms", type=int, default=None)
    parser.add_argument("--chromium-nice", type=int, default=0,
                        help="run Chromium at this niceness (10: the viewers yield the cores to the server)")
    parser.add_argument("--talkers", type=int, default=0,
                        help="with --deployment serve: this many more sessions talk all along "
                        "(aiortc clients streaming TTS, as in e2e.py) while the pages are measured")
    parser.add_argument("--port", type=int, default=19500)
    parser.add_argument("--home", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--raw", default=None, help="also write the raw probe data here")
    args = parser.parse_args(argv)
    if args.talkers and args.deployment != "serve":
        parser.error("--talkers needs --deployment serve (the talkers' clients would share this process with the service)")
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(benchmark(args))
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
