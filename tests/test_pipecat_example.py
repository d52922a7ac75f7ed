"""The example bot (examples/pipecat_bot.py) end to end: an aiortc 'browser' connects to the
bot over pipecat's SmallWebRTC transport and receives the avatar (video + the greeting) that
the bot gets from a real ray-lipsync server; its speech makes the bot answer."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai is not installed (pip install -e '.[test,pipecat]'; ./dev test runs these in .venv-pipecat)")

import uvicorn  # noqa: E402
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402

from ray_lipsync.webrtc.client import PlaybackTrack, track_frames  # noqa: E402
from helpers import CHROMIUM, loud_ms  # noqa: E402
from servers import running_server  # noqa: E402
from speech import silence, speech  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.pipecat]
LIPSYNC_PORT, BOT_PORT = 19041, 19042


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def load_example():
    path = Path(__file__).resolve().parent.parent / "examples" / "pipecat_bot.py"
    spec = importlib.util.spec_from_file_location("pipecat_bot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.asynccontextmanager
async def bot_server(app, port: int):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        bots = list(app.state.bots)
        for bot in bots:  # a failed test must not leave a bot pipeline running
            bot.cancel()
        await asyncio.wait(bots, timeout=10) if bots else None
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_example_bot_serves_the_avatar_over_small_webrtc(lipsync_settings):
    """Functional, not a timing benchmark: on the loaded 2-core machine the transport's extra
    VP8/Opus encode runs at whatever rate the CPU allows (25 fps is checked in test_pipecat)."""
    bot = load_example()
    phrase = speech("Hello there, how are you today?")
    quiet_s = 9.0  # the greeting plays in full before the user speaks
    mic = PlaybackTrack(np.concatenate([silence(quiet_s), phrase, silence(60.0)]))
    async with running_server(lipsync_settings, LIPSYNC_PORT) as (gateway, lipsync):
        async with bot_server(bot.build_app(lipsync), BOT_PORT) as base:
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            video: list[tuple[float, tuple[int, int]]] = []
            audio: list[tuple[float, np.ndarray]] = []
            rate = 48000
            tasks = []

            @pc.on("track")
            def on_track(track):
                async def read():
                    nonlocal rate
                    async for frame in track_frames(track):
                        if track.kind == "video":
                            video.append((time.monotonic(), (frame.width, frame.height)))
                        else:
                            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
                            audio.append((time.monotonic(), pcm.mean(axis=1).astype(np.float32) / 32768))
                            rate = frame.sample_rate
                tasks.append(asyncio.ensure_future(read()))

            def loud_since(t0: float) -> int:
                pieces = [a for t, a in audio if t >= t0]
                return loud_ms(np.concatenate(pieces), rate) if pieces else 0

            pc.addTransceiver(mic, direction="sendrecv")  # SmallWebRTC: audio first, then video
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                assert "RTCPeerConnection" in (await http.get("/")).text
                r = await http.post("/api/offer", json={"sdp": pc.localDescription.sdp,
                                                        "type": pc.localDescription.type})
                assert r.status_code == 200, r.text
            answer = r.json()
            connected_at = time.monotonic()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
            await wait_for(lambda: len(video) >= 25, 20)
            assert {size for _, size in video} == {(512, 512)}
            assert gateway.session_count == 1  # the bot opened one avatar session
            await wait_for(lambda: loud_since(connected_at) > 1500, 20)  # the greeting
            user_done = connected_at + quiet_s + len(phrase) / 16000
            await wait_for(lambda: time.monotonic() > user_done + 0.5 and loud_since(user_done + 0.5) > 500,
                           30)  # the answer to the user's turn
            await pc.close()
            for task in tasks:
                task.cancel()
            await wait_for(lambda: gateway.session_count == 0, 15)  # hang-up closed the session


async def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium")
def test_example_bot_page_plays_the_avatar_in_chromium(lipsync_settings):
    """The bot's own page in headless Chromium (fake microphone): the avatar's video plays."""
    import threading

    sync_api = pytest.importorskip("playwright.sync_api")
    from helpers import CHROMIUM_FLAGS

    bot = load_example()
    loop = asyncio.new_event_loop()
    ready, stop = threading.Event(), None

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        async with running_server(lipsync_settings, LIPSYNC_PORT + 2) as (gateway, lipsync):
            async with bot_server(bot.build_app(lipsync), BOT_PORT + 2):
                ready.set()
                await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        with sync_api.sync_playwright() as pw:
            chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                          args=CHROMIUM_FLAGS)
            page = chromium.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{BOT_PORT + 2}/")
            page.click("#go")
            page.wait_for_function("document.getElementById('avatar').videoWidth === 512",
                                   timeout=60_000)
            decoded = page.evaluate("""async () => {
              const n = async () => { let f = 0; (await window.pc.getStats()).forEach((r) => {
                if (r.type === "inbound-rtp" && r.kind === "video") f = r.framesDecoded; }); return f; };
              const a = await n(); await new Promise((r) => setTimeout(r, 2000)); return [a, await n()];
            }""")
            assert decoded[1] > decoded[0] > 0, decoded  # frames keep being decoded
            audio = page.evaluate("""async () => { let b = 0; (await window.pc.getStats()).forEach((r) => {
                if (r.type === "inbound-rtp" && r.kind === "audio") b = r.bytesReceived; }); return b; }""")
            assert audio > 0
            assert errors == []
            chromium.close()
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
