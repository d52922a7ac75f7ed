"""LipsyncVideoService in a real pipecat pipeline against a real ray-lipsync server (uvicorn on
loopback, LocalPipeline, aiortc over WebRTC): TTS audio in, avatar video + audio out."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai is not installed (pip install -e '.[test,pipecat]'; ./dev test runs these in .venv-pipecat)")

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from ray_lipsync.audio import resample  # noqa: E402
from ray_lipsync.integrations.pipecat import LipsyncVideoService  # noqa: E402
from helpers import CLIPPED, free_port, loud_ms, variant  # noqa: E402
from servers import running_server  # noqa: E402
from speech import speech  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.pipecat]
PORT = 19031
TTS_RATE = 24000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Sink(FrameProcessor):
    """Records what the avatar service pushes downstream: (arrival, frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[float, OutputImageRawFrame]] = []
        self.audio: list[tuple[float, SpeechOutputAudioRawFrame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        now = time.monotonic()
        if isinstance(frame, OutputImageRawFrame):
            self.images.append((now, frame))
        elif isinstance(frame, SpeechOutputAudioRawFrame):
            self.audio.append((now, frame))
        await self.push_frame(frame, direction)

    def signal(self, since: float = 0.0) -> tuple[np.ndarray, int]:
        frames = [f for t, f in self.audio if t >= since]
        pcm = np.concatenate([np.frombuffer(f.audio, "<i2") for f in frames]) if frames else np.zeros(0)
        return pcm.astype(np.float32) / 32768, frames[0].sample_rate if frames else 48000


def tts_frames(samples: np.ndarray) -> list[Frame]:
    """A TTS answer as a TTS service emits it: started, 20 ms audio frames at 24 kHz, stopped."""
    pcm = (resample(samples, 16000, TTS_RATE) * 32767).astype("<i2").tobytes()
    step = TTS_RATE // 50 * 2
    return [TTSStartedFrame(), *[TTSAudioRawFrame(pcm[i:i + step], TTS_RATE, 1)
                                 for i in range(0, len(pcm), step)], TTSStoppedFrame()]


async def wait_until(condition, timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(step)


async def stop_pipeline(runner: WorkerRunner, running: asyncio.Task) -> None:
    """Cancel a pipeline still running (a failed assertion), while the server is still up.

    Left running, the loop's teardown cancels every task at once, pipecat's processor tasks
    with it, so the worker's CancelFrame never reaches the pipeline's end and the worker
    waits for it forever.
    """
    if not running.done():
        await runner.cancel(reason="test finished")
        await asyncio.wait_for(running, 15)


async def test_pipecat_pipeline_plays_the_avatar_in_sync_and_interrupts(lipsync_settings):
    first = speech("The quick brown fox jumps over the lazy dog.")
    long = speech("Streaming avatars need steady latency, and a voice agent needs to know how "
                  "much of its answer the user heard.")
    # every frame on the 40 ms grid, also the silent ones around the answer: a still idle
    # picture is otherwise sent at webrtc.still_fps (tested in test_webrtc / test_client_module)
    settings = variant(lipsync_settings, webrtc={"still_fps": 25})
    async with running_server(settings, PORT) as (gateway, base):
        avatar = LipsyncVideoService(base)
        sink = Sink()
        finished: list[dict] = []

        @avatar.event_handler("on_playback_finished")
        async def on_finished(service, event):
            finished.append(event)

        worker = PipelineWorker(Pipeline([avatar, sink]), idle_timeout_secs=None,
                                enable_rtvi=False)
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        running = asyncio.create_task(runner.run())
        try:
            await wait_until(lambda: len(sink.images) >= 25, 15)  # connected: idle frames flow
            assert gateway.session_count == 1

            # one answer: it plays whole, video at 25 fps, audio as long as the speech
            window = time.monotonic()
            await worker.queue_frames(tts_frames(first))
            await wait_until(lambda: finished, 15)
            await asyncio.sleep(0.4)  # the tail of the audio in flight
            assert finished[0]["interrupted"] is False
            assert abs(finished[0]["played_ms"] - len(first) / 16) <= 2
            heard, rate = sink.signal(since=window)
            assert abs(loud_ms(heard, rate) - loud_ms(first, 16000)) <= 80
            times = [t for t, _ in sink.images if t >= window]
            fps = (len(times) - 1) / (times[-1] - times[0])
            print(f"fps {fps:.2f}; loud ms out {loud_ms(heard, rate)} vs in {loud_ms(first, 16000)}; "
                  f"played_ms {finished[0]['played_ms']}")
            assert 23.5 <= fps <= 26.5, fps
            pts = [f.pts for t, f in sink.images if t >= window]
            steps = [b - a for a, b in zip(pts, pts[1:])]
            # on the 40 ms frame grid; a frame the sender dropped under load leaves an 80 ms step
            assert all(d > 0 and d % 40_000_000 == 0 for d in steps), steps
            assert sum(d != 40_000_000 for d in steps) <= 2, steps
            # audio and images are one timeline: pushed audio covers each image's time
            audio_end = max(f.pts + len(f.audio) // 2 * 10**9 // f.sample_rate for _, f in sink.audio)
            assert pts[-1] <= audio_end + 80_000_000

            # a long answer, interrupted after 1.5 s: no speech comes out 2 frames after it
            await worker.queue_frames(tts_frames(long))
            await asyncio.sleep(1.5 + lipsync_settings.pipeline.playout_delay_ms / 1000)
            await worker.queue_frame(InterruptionFrame())
            cut_at = time.monotonic()
            await wait_until(lambda: len(finished) == 2, 5)
            await asyncio.sleep(0.6)
            assert finished[1]["interrupted"] is True and 1000 <= finished[1]["played_ms"] < len(long) / 16
            after, rate = sink.signal(since=cut_at + 0.08)
            print(f"cut: played_ms {finished[1]['played_ms']}; loud ms after cut+80ms {loud_ms(after, rate)}; "
                  f"loud ms after cut {loud_ms(sink.signal(since=cut_at)[0], rate)}")
            assert loud_ms(after, rate) == 0, loud_ms(after, rate)
            frames_after = sum(1 for t, _ in sink.images if t >= cut_at)
            assert frames_after >= 12  # the video goes on (idle) after the cut

            await worker.queue_frame(EndFrame())
            await asyncio.wait_for(running, 15)
        finally:
            await stop_pipeline(runner, running)
        assert gateway.session_count == 0  # EndFrame closed the session on the server


async def test_user_speaking_frames_set_the_listening_state_when_asked(clip_settings):
    """listening_state=True: UserStartedSpeakingFrame -> the avatar's `listening` clip,
    UserStoppedSpeakingFrame -> idle (POST /v1/sessions/{id}/state on the real server)."""
    settings, _ = clip_settings
    async with running_server(settings, free_port()) as (gateway, base):
        avatar = LipsyncVideoService(base, avatar=CLIPPED, listening_state=True)
        sink = Sink()
        worker = PipelineWorker(Pipeline([avatar, sink]), idle_timeout_secs=None, enable_rtvi=False)
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        running = asyncio.create_task(runner.run())
        try:
            await wait_until(lambda: len(sink.images) >= 5, 15)
            (session,) = gateway.pipeline.sessions()
            assert session.avatar_state()["state"] == "idle"
            await worker.queue_frame(UserStartedSpeakingFrame())
            await wait_until(lambda: session.avatar_state()["state"] == "listening", 5)
            await worker.queue_frame(UserStoppedSpeakingFrame())
            await wait_until(lambda: session.avatar_state()["state"] == "idle", 5)
            await avatar.play_action("wave")
            assert session.avatar_state()["action"] == "wave"
            await worker.queue_frame(EndFrame())
            await asyncio.wait_for(running, 15)
        finally:
            await stop_pipeline(runner, running)
