"""The service side of the viewer benchmark (browser.py): the in-process service that records
every frame it sends (`Service`), `ray-lipsync serve` (`ServeDeployment`), and what the
analysis needs of the avatar (the mouth box and signal, the renderer's own sound-after-mouth
lead of a phrase)."""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
import threading
import time
import wave
from pathlib import Path

import cv2
import numpy as np

from ray_lipsync.config import Settings
from ray_lipsync.heap import freeze_startup_heap
from ray_lipsync.streaming.local import LocalPipeline
from viewer_analysis import MOUTH_THRESHOLD

LOUD = 0.02  # |sample| above this is audible (-34 dBFS)
PROBE_SIZE = (64, 32)  # the lower-face box is compared at this size (w, h)


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


async def articulation_lead_s(wav64: str) -> tuple[float, int]:
    """When the first loud sample of the phrase comes after the first moving mouth frame, as the
    service itself sends them (a LocalPipeline session of the default avatar, no WebRTC): the
    server-side part of (sound at the viewer - mouth at the viewer), which the A/V offset of a
    run without server records subtracts; and that frame's place in the utterance (0 = its
    first frame)."""
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
    return float(sound - mouth * 0.04), mouth
