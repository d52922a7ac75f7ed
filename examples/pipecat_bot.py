"""An offline pipecat voice bot with a ray-lipsync face, for a browser (no cloud keys).

    ./dev serve --port 8000                             # the avatar server (.venv)
    .venv-pipecat/bin/python examples/pipecat_bot.py --lipsync http://127.0.0.1:8000 --port 7860
    # open http://127.0.0.1:7860/ and allow the microphone

The bot needs `pip install "ray-lipsync[pipecat]"` (`.venv-pipecat`, which `./dev test`
builds); the server's venv keeps the `prepare` extra (the two cannot share one).

The browser talks to the bot over pipecat's SmallWebRTC transport (its microphone in, the
avatar's video and voice out). The bot has no speech recognition or LLM (those need models
or cloud keys): it greets you, and each time you stop speaking (Silero VAD, shipped with
pipecat) it answers how long you spoke, with the project's espeak-ng voice. Speaking while
it talks interrupts it: the avatar stops within two frames. The pipeline:

    transport.input() -> VADProcessor -> TurnTaker -> EspeakTTS -> LipsyncVideoService
        -> transport.output()
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import (
    Frame,
    TTSSpeakFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from ray_lipsync.integrations.pipecat import EspeakTTS, LipsyncVideoService

log = logging.getLogger("pipecat_bot")

GREETING = "Hello! I am an avatar on ray-lipsync. Say something, and I will tell you how long you spoke."

PAGE = """<!doctype html><meta charset="utf-8"><title>ray-lipsync pipecat bot</title>
<style>body{font-family:sans-serif;margin:2em}video{width:512px;background:#222}</style>
<h1>ray-lipsync + pipecat</h1><button id="go">Connect</button> <span id="state"></span>
<p><video id="avatar" autoplay playsinline></video></p>
<script>
document.getElementById("go").onclick = async () => {
  const pc = window.pc = new RTCPeerConnection();
  const media = new MediaStream();
  pc.ontrack = (e) => { media.addTrack(e.track); document.getElementById("avatar").srcObject = media; };
  pc.onconnectionstatechange = () => document.getElementById("state").textContent = pc.connectionState;
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  pc.addTransceiver(mic.getAudioTracks()[0], {direction: "sendrecv"});
  pc.addTransceiver("video", {direction: "recvonly"});
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((ok) => { if (pc.iceGatheringState === "complete") ok();
    else pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && ok(); });
  const r = await fetch("/api/offer", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
  await pc.setRemoteDescription(await r.json());
};
</script>
"""


class TurnTaker(FrameProcessor):
    """The bot's 'brain' without STT/LLM: greet once, then answer each user turn's length;
    the user starting to speak interrupts the bot."""

    def __init__(self, greeting: str = GREETING) -> None:
        super().__init__()
        self._greeting = greeting
        self._greeted = False
        self._started: float | None = None

    async def greet(self) -> None:
        if not self._greeted:
            self._greeted = True
            await self.push_frame(TTSSpeakFrame(self._greeting))

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._started = time.monotonic()
            await self.broadcast_interruption()
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and self._started is not None:
            seconds = time.monotonic() - self._started
            self._started = None
            await self.push_frame(TTSSpeakFrame(f"You spoke for {seconds:.1f} seconds."))


async def run_bot(connection, lipsync_url: str, avatar: str = "default",
                  api_key: str | None = None) -> None:
    """One bot for one browser connection, until it hangs up."""
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(audio_in_enabled=True, audio_out_enabled=True,
                               video_out_enabled=True, video_out_is_live=False,
                               video_out_width=512, video_out_height=512, video_out_framerate=25),
    )
    brain = TurnTaker()
    face = LipsyncVideoService(lipsync_url, avatar=avatar, api_key=api_key)
    worker = PipelineWorker(Pipeline([
        transport.input(), VADProcessor(vad_analyzer=SileroVADAnalyzer()), brain, EspeakTTS(),
        face, transport.output(),
    ]), idle_timeout_secs=None, enable_rtvi=False)

    @transport.event_handler("on_client_connected")
    async def on_connected(transport, client):
        await brain.greet()

    @transport.event_handler("on_client_disconnected")
    async def on_disconnected(transport, client):
        await worker.cancel()

    @face.event_handler("on_playback_finished")
    async def on_finished(service, event):
        log.info("utterance %s: %d ms heard%s", event["utterance_id"], event["played_ms"],
                 " (interrupted)" if event["interrupted"] else "")

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def build_app(lipsync_url: str, avatar: str = "default", api_key: str | None = None) -> FastAPI:
    """The bot's web app: the page at / and the SmallWebRTC offer at POST /api/offer."""
    app = FastAPI(title="ray-lipsync pipecat bot")
    handler = SmallWebRTCRequestHandler()
    app.state.bots = set()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.post("/api/offer")
    async def offer(request: Request) -> dict:
        body = await request.json()

        async def start(connection) -> None:
            task = asyncio.create_task(run_bot(connection, lipsync_url, avatar, api_key))
            app.state.bots.add(task)
            task.add_done_callback(app.state.bots.discard)

        return await handler.handle_web_request(
            SmallWebRTCRequest(sdp=body["sdp"], type=body["type"], pc_id=body.get("pc_id")), start)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lipsync", default="http://127.0.0.1:8000", help="ray-lipsync server URL")
    parser.add_argument("--avatar", default="default")
    parser.add_argument("--api-key", help="API key, when the server sets serve.api_keys")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(build_app(args.lipsync, args.avatar, args.api_key), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
