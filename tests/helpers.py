"""Helpers shared by several test modules (import them from here, not from a test module).

- an HTTP API over an in-process gateway on the real pipeline, and loudness of received audio;
- LocalPipeline sessions run in real time: receiving their frames and checking the media clock,
  the audio, speech frames and interrupts;
- synthetic avatars for storage tests;
- headless Debian Chromium through playwright.

Speech and other test signals live in speech.py, real servers in servers.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ray_lipsync.api.gateway import Gateway
from ray_lipsync.api.routes import build_api
from ray_lipsync.avatar import Avatar
from ray_lipsync.clock import PTS_PER_FRAME, SAMPLES_PER_FRAME, video_pts
from ray_lipsync.config import Settings
from ray_lipsync.streaming.local import LocalPipeline
from ray_lipsync.streaming.session import Session
from ray_lipsync.streaming.sources import cross_fade
from ray_lipsync.types import OutputFrame
from ray_lipsync.webrtc.client import ReceiverClient


# -- the HTTP API over an in-process gateway -----------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make(settings: Settings, **gateway_kwargs: Any) -> tuple[Gateway, httpx.AsyncClient]:
    gateway = Gateway(settings, LocalPipeline(settings), "gw1", **gateway_kwargs)
    app = build_api(settings, gateway)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                               timeout=30)
    return gateway, client


def variant(settings: Settings, **sections: dict) -> Settings:
    """`settings` with some fields of its sections replaced."""
    return Settings.model_validate({**settings.model_dump(), **{
        name: {**getattr(settings, name).model_dump(), **values}
        for name, values in sections.items()}})


async def new_session(client: httpx.AsyncClient) -> tuple[str, dict]:
    r = await client.post("/v1/sessions", json={"avatar": "default"})
    assert r.status_code == 201, r.text
    body = r.json()
    return body["session_id"], {"Authorization": f"Bearer {body['token']}"}


async def connect(client: httpx.AsyncClient, sid: str, auth: dict, events: bool = False) -> ReceiverClient:
    receiver = ReceiverClient(ice_servers=[], events=events)
    r = await client.post(f"/v1/sessions/{sid}/offer", json=await receiver.offer(), headers=auth)
    assert r.status_code == 200, r.text
    await receiver.accept(r.json())
    await receiver.wait_first_video(timeout=5)
    return receiver


def loud_ms(signal: np.ndarray, rate: int, relative_db: float = -26.0,
            floor_db: float = -60.0) -> int:
    """Milliseconds of `signal` whose 10 ms RMS is within `relative_db` of its loudest 10 ms
    and above `floor_db` (dB full scale).

    An energy VAD that ignores the overall level (the WebRTC path upmixes mono to stereo at
    -3 dB, and the client averages the channels). The floor keeps a silent signal silent:
    Opus decodes digital silence to +-1 LSB (about -90 dBFS), which relative to itself would
    all count as loud; speech is far above it.
    """
    win = rate // 100
    n = signal.size // win
    rms = np.sqrt((signal[: n * win].reshape(n, win).astype(np.float64) ** 2).mean(axis=1))
    if not n:
        return 0
    threshold = max(rms.max() * 10 ** (relative_db / 20), 10 ** (floor_db / 20))
    return int((rms > threshold).sum() * 10)


async def pieces(data: bytes, size: int = 4096):
    for i in range(0, len(data), size):
        yield data[i:i + size]
        await asyncio.sleep(0)


# -- LocalPipeline sessions in real time ---------------------------------------------------

F = SAMPLES_PER_FRAME
PHRASE_A = "Hello there, how are you today?"
PHRASE_B = "Streaming avatars need steady latency."


@dataclass
class Received:
    frame: OutputFrame
    at: float  # wall time at which frames() yielded it


def tuned(settings: Settings, **pipeline: object) -> Settings:
    """`settings` with some pipeline fields replaced."""
    return settings.model_copy(update={"pipeline": settings.pipeline.model_copy(update=pipeline)})


class Receiver:
    """Consumes `session.frames()` in a task, recording each frame and when it came."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.frames: list[Received] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for frame in self.session.frames():
            self.frames.append(Received(frame, time.time()))

    async def until_frame(self, k: int, timeout: float = 15.0) -> list[Received]:
        """Wait until frame k has been received; returns everything received so far."""

        async def wait() -> None:
            while not self.frames or self.frames[-1].frame.frame_index < k:
                if self._task.done():
                    self._task.result()  # re-raise what ended the stream
                    raise AssertionError(f"stream ended before frame {k}")
                await asyncio.sleep(0.02)

        await asyncio.wait_for(wait(), timeout)
        return list(self.frames)

    async def stop(self) -> list[Received]:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return list(self.frames)


def is_idle(session: Session, frame: OutputFrame) -> bool:
    avatar = session.avatar
    return np.array_equal(frame.image, avatar.frames[avatar.cycle_index(frame.frame_index)])


def audio_from(received: list[Received], first_frame: int) -> np.ndarray:
    return np.concatenate([r.frame.audio for r in received if r.frame.frame_index >= first_frame])


def assert_clock(received: list[Received], session: Session) -> None:
    """Consecutive frames k with pts 3600k, presented at t0 + D + 0.04k, never early."""
    ks = [r.frame.frame_index for r in received]
    assert ks == list(range(ks[0], ks[0] + len(ks))), "frames must arrive in order without gaps"
    clock = session.clock
    for r in received:
        k = r.frame.frame_index
        assert r.frame.pts == PTS_PER_FRAME * k
        assert r.frame.presentation_time == pytest.approx(clock.t0 + clock.delay_s + 0.04 * k, abs=1e-9)
        assert r.at >= r.frame.presentation_time - 1e-3
        assert r.frame.audio.shape == (F,) and r.frame.audio.dtype == np.float32
        assert r.frame.session_id == session.session_id


def assert_audio_is(received: list[Received], start_frame: int, voice: np.ndarray) -> None:
    """The output audio from `start_frame` on is exactly `voice`, then silence; none before."""
    out = audio_from(received, start_frame)
    assert len(out) >= len(voice)
    np.testing.assert_array_equal(out[: len(voice)], voice)
    assert not out[len(voice) :].any()
    before = [r.frame.audio for r in received if r.frame.frame_index < start_frame]
    assert not any(a.any() for a in before)


def speech_frames(detector, voice: np.ndarray, start_frame: int) -> set[int]:
    """Frames the VAD calls speech when `voice` starts at frame `start_frame`."""
    padded = np.concatenate([voice, np.zeros(-len(voice) % F, np.float32)])
    flags = detector.detect(padded).reshape(-1, 2).any(axis=1)
    return {start_frame + i for i in np.flatnonzero(flags)}


async def push_in_real_time(session: Session, voice: np.ndarray, utterance_id: str):
    """Push `voice` in 20 ms chunks paced by the wall clock (one streamed utterance)."""
    start, first = time.time(), None
    for i, at in enumerate(range(0, len(voice), 320)):
        utt = await session.push_audio(voice[at : at + 320], utterance_id, final=at + 320 >= len(voice))
        first = first or utt
        await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - time.time()))
    return first


async def speak_once(pipeline, voice: np.ndarray, utterance_id: str):
    """One session speaks `voice` in real time; returns (session, utterance, stats, received)."""
    session = await pipeline.create_session()
    rx = Receiver(session)
    utt = await push_in_real_time(session, voice, utterance_id)
    await rx.until_frame(utt.end_frame + 3)
    received = await rx.stop()
    return session, utt, session.stats(), received


@dataclass
class InterruptRun:
    session: Session
    long: object  # the interrupted Utterance
    reply: object  # the Utterance pushed right after the interrupt
    epoch: int
    t_interrupt: float
    received: list[Received]


async def interrupt_and_reply(pipeline, voice: np.ndarray, reply: np.ndarray) -> InterruptRun:
    """Speak `voice`, interrupt 1 s into its presentation, push `reply` at once (barge-in)."""
    session = await pipeline.create_session()
    rx = Receiver(session)
    utt = await session.push_audio(voice, "long")
    await asyncio.sleep(session.clock.presentation_time(utt.start_frame) + 1.0 - time.time())
    t_interrupt = time.time()
    epoch = await session.interrupt()
    new = await session.push_audio(reply, "reply")
    await rx.until_frame(new.end_frame + 2)
    received = await rx.stop()
    await pipeline.shutdown()
    return InterruptRun(session, utt, new, epoch, t_interrupt, received)


def check_interrupt(run: InterruptRun, voice: np.ndarray, reply: np.ndarray) -> None:
    """Nothing of the old speech after T + 80 ms; the reply plays exactly and is rendered."""
    session, received, t_interrupt = run.session, run.received, run.t_interrupt
    assert_clock(received, session)
    assert run.epoch == 1
    before = [r for r in received if r.frame.presentation_time <= t_interrupt]
    assert any(not is_idle(session, r.frame) for r in before), "speech was on screen before"
    limit = t_interrupt + 0.08
    old = [r for r in received if r.frame.presentation_time > limit and r.frame.frame_index < run.reply.start_frame]
    assert old, "frames between the interrupt and the reply"
    for r in old:
        assert r.at > limit - 1e-3
        assert not r.frame.audio.any() and is_idle(session, r.frame)
        assert r.frame.epoch == 1
    first_after = min(r.frame.frame_index for r in received if r.frame.presentation_time > t_interrupt)
    assert run.long.end_frame <= first_after + 1  # the utterance was cut there ...
    assert run.long.end_frame < run.long.start_frame + len(voice) // F  # ... well before its end
    start = run.reply.start_frame
    assert_audio_is([r for r in received if r.frame.frame_index >= start], start, reply)
    talking = [r for r in received if r.frame.frame_index >= start and not is_idle(session, r.frame)]
    assert len(talking) > 10, "the reply after the interrupt is rendered"


# -- avatars -------------------------------------------------------------------------------

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"  # recordings, where present
CLIPPED = "clipped"  # the avatar of the `clip_settings` fixture: a main video and three clips
ABOVE_MOUTH = slice(0, 120)  # rows of a "clipped" frame that lip sync never changes


def check_sources(received, avatar) -> None:
    """Every frame shows the source frame it names: exactly when silent, above the mouth when
    lip-synced."""
    for r in received:
        frame = r.frame
        assert frame.source_frame is not None
        expected = avatar.frames[frame.source_frame]
        if frame.speech and not frame.dropped:
            assert np.array_equal(frame.image[ABOVE_MOUTH], expected[ABOVE_MOUTH])
        elif "fade" in frame.meta:  # a switch cross-faded
            fade = frame.meta["fade"]
            old = avatar.frames[fade["from_source_frame"]]
            assert np.array_equal(frame.image, cross_fade(old, expected, fade["weight"]))
        else:
            assert np.array_equal(frame.image, expected)


def synthetic_avatar(name: str = "synth", n: int = 3, seed: int = 0) -> Avatar:
    """An avatar made of random arrays (no face analysis): for pure storage tests."""
    rng = np.random.default_rng(seed)
    return Avatar(
        name=name,
        frames=rng.integers(0, 256, (n, 48, 64, 3), dtype=np.uint8),
        crop_boxes=rng.integers(0, 40, (n, 4)).astype(np.int32),
        crops=rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8),
        masks=rng.integers(0, 256, (n, 256, 256), dtype=np.uint8),
        landmarks=rng.normal(128, 30, (n, 10, 2)).astype(np.float32),
        detected=np.array([True, False, True][:n] + [True] * max(0, n - 3)),
        fps=30.0,
    )


def assert_same(a: Avatar, b: Avatar) -> None:
    for attr in ("frames", "crop_boxes", "crops", "masks", "landmarks", "detected"):
        x, y = getattr(a, attr), getattr(b, attr)
        assert x.dtype == y.dtype and x.shape == y.shape, attr
        assert np.array_equal(x, y), attr
    assert a.name == b.name and a.fps == b.fps


# -- headless Chromium ----------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]


@contextmanager
def chromium() -> Iterator[object]:
    """Headless Debian chromium through playwright (the flags this sandbox needs)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def make_frame(k: int, *, audio: np.ndarray | None = None, size: int = 64, t: float = 0.0) -> OutputFrame:
    """Output frame k of session "s": a flat grey picture (k % 256) and `audio` (else silence)."""
    image = np.full((size, size, 3), k % 256, dtype=np.uint8)
    samples = np.zeros(SAMPLES_PER_FRAME, np.float32) if audio is None else audio
    return OutputFrame("s", 0, k, image, samples, video_pts(k), t)


TONE = np.full(SAMPLES_PER_FRAME, 0.1, np.float32)  # a frame's audio that is never silence


async def paced_frames(n: int, t0: float):
    """Frames 0..n-1 (audio `TONE`), each yielded at its presentation time t0 + 40 ms * k,
    like the session's frames."""
    for k in range(n):
        await asyncio.sleep(max(0.0, t0 + 0.04 * k - time.time()))
        yield make_frame(k, audio=TONE, t=t0 + 0.04 * k)


async def sent_times(track, n: int) -> list[tuple[float, int]]:
    """(wall time, pts) of the next `n` packets a track hands its sender."""
    sent = []
    for _ in range(n):
        packet = await track.recv()
        sent.append((time.time(), int(packet.pts)))
    return sent
