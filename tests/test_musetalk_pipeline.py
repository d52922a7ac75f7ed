"""The MuseTalk backend end to end through the streaming pipelines, on tiny random weights.

The weights are random, so the pictures mean nothing; what is checked is that the real
loaders, the streaming Whisper featurizer, the batched UNet + VAE renderer and the avatar
latents work inside LocalPipeline and the Ray pipeline: speech frames come out rendered (not
idle), in order, with the pushed audio.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from musetalk_fixtures import build_tiny_models
from ray_lipsync.config import Settings

# tiny random weights in the real layout: seconds per module, so in the full suite only
pytestmark = pytest.mark.slow

SPEECH_S = 1.6


@pytest.fixture(scope="module")
def musetalk_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    from ray_lipsync.avatar.default import ensure_default_avatar
    from ray_lipsync.avatar.store import AvatarStore
    from ray_lipsync.backends.musetalk import add_latents

    models = build_tiny_models(tmp_path_factory.mktemp("models"))
    settings = Settings(
        home=tmp_path_factory.mktemp("home"),
        models_dir=models,
        backend="musetalk",
        # CPU + random tiny weights: give frames time; the GPU budget is in benchmarks/.
        pipeline={"playout_delay_ms": 3000, "max_batch": 8},
    )
    store = AvatarStore(settings.avatars_dir)
    ensure_default_avatar(store, settings.avatar)
    add_latents(store, "default", settings)
    return settings


def voiced(seconds: float) -> np.ndarray:
    """A voiced, syllable-modulated signal the VAD takes for speech."""
    from speech import speech

    audio = speech("Hello, this is the neural backend speaking.")
    return audio[: int(seconds * 16000)]


async def run_session(pipeline, seconds: float) -> tuple[list, np.ndarray]:
    session = await pipeline.create_session(backend="musetalk")
    audio = voiced(seconds)
    utterance = await session.push_audio(audio)
    frames = []
    async for frame in session.frames():
        frames.append(frame)
        if frame.frame_index >= utterance.end_frame + 2:
            break
    await pipeline.close_session(session.session_id)
    return frames, audio, utterance  # type: ignore[return-value]


def check(frames, audio: np.ndarray, utterance, avatar_frames) -> None:
    ks = [f.frame_index for f in frames]
    assert ks == list(range(ks[0], ks[0] + len(ks)))
    spoken = [f for f in frames if utterance.start_frame <= f.frame_index < utterance.end_frame]
    out = np.concatenate([f.audio for f in spoken])[: len(audio)]
    np.testing.assert_array_equal(out, audio)
    rendered = [f for f in spoken if f.latency_ms is not None]
    assert len(rendered) >= 0.5 * len(spoken), f"only {len(rendered)} of {len(spoken)} speech frames rendered"
    for f in rendered:
        assert not np.array_equal(f.image, avatar_frames[0]), "a rendered frame equals the idle frame"
        assert f.image.shape == avatar_frames[0].shape


def test_musetalk_local_pipeline(musetalk_settings: Settings) -> None:
    from ray_lipsync.streaming.local import LocalPipeline

    async def main():
        pipeline = LocalPipeline(musetalk_settings)
        try:
            return await run_session(pipeline, SPEECH_S), await pipeline.replica_stats()
        finally:
            await pipeline.shutdown()

    (frames, audio, utterance), stats = asyncio.run(main())
    # no GPU here: the replica says it renders on the CPU (reaches /metrics and session state)
    assert [(s["replica"], s["backend"], s["device"]) for s in stats] == [("local", "musetalk", "cpu")]
    assert stats[0]["frames"] > 0
    from ray_lipsync.streaming.engine import load_avatar

    check(frames, audio, utterance, load_avatar(musetalk_settings, "default").frames)


@pytest.mark.ray
def test_musetalk_ray_pipeline(musetalk_settings: Settings) -> None:
    import ray
    from actors.runtime import init_ray

    from actors.pipeline import RayPipeline
    from ray_lipsync.streaming.engine import load_avatar

    init_ray(num_cpus=2, include_dashboard=False, namespace="musetalk-test")
    try:
        async def main():
            pipeline = await RayPipeline.connect(musetalk_settings)
            try:
                return await run_session(pipeline, SPEECH_S)
            finally:
                await pipeline.shutdown()

        frames, audio, utterance = asyncio.run(main())
    finally:
        ray.shutdown()
    check(frames, audio, utterance, load_avatar(musetalk_settings, "default").frames)
