"""MuseTalk v1.5 backend on tiny random weights in the real file layout (CPU, seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk_fixtures import build_tiny_models
from ray_lipsync.avatar.model import LANDMARK_NAMES, Avatar
from ray_lipsync.backends.musetalk import (
    LATENTS_KEY,
    MuseTalkFeaturizer,
    MuseTalkRenderer,
    add_latents,
    check_weights,
    compute_latents,
    shared_models,
)
from ray_lipsync.backends.musetalk.avatar import crop_inputs
from ray_lipsync.backends.musetalk.features import encode_states, log_mel
from ray_lipsync.backends.musetalk.fidelity import compare_streaming, streaming_requests
from ray_lipsync.backends.musetalk.weights import FILES, UNET_WEIGHTS
from ray_lipsync.config import Settings
from ray_lipsync.errors import AvatarError, WeightsError
from ray_lipsync.types import FeatureRequest, RenderJob

# tiny random weights in the real layout: seconds per module, so in the full suite only
pytestmark = pytest.mark.slow

SR = 16000


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def settings(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(models_dir=models_dir, home=tmp_path_factory.mktemp("home"), pipeline={"max_batch": 4})


@pytest.fixture(scope="session")
def featurizer(settings: Settings) -> MuseTalkFeaturizer:
    return MuseTalkFeaturizer(settings, device="cpu")


@pytest.fixture(scope="session")
def renderer(settings: Settings) -> MuseTalkRenderer:
    return MuseTalkRenderer(settings, device="cpu")


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-modulated test signal (16 kHz float32)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * h * np.cumsum(pitch) / SR) / h for h in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.2 * voiced * envelope + 0.005 * rng.standard_normal(len(t))).astype(np.float32)


def make_avatar(name: str, n: int, seed: int = 0) -> Avatar:
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    return Avatar(
        name=name,
        frames=rng.integers(0, 256, (n, 300, 300, 3), dtype=np.uint8),
        crop_boxes=np.tile(np.array([22, 22, 278, 278], np.int32), (n, 1)),
        crops=crops,
        masks=np.zeros((n, 256, 256), np.uint8),
        landmarks=np.zeros((n, len(LANDMARK_NAMES), 2), np.float32),
        detected=np.ones(n, bool),
    )


# --- weights -----------------------------------------------------------------------------


def test_missing_weights_lists_every_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as info:
        check_weights(tmp_path)
    message = str(info.value)
    for part_files in FILES.values():
        for f in part_files:
            assert str(tmp_path / f) in message
    assert "TMElyralab/MuseTalk" in message and "sd-vae-ft-mse" in message and "whisper-tiny" in message


def test_shape_and_dtype_mismatch_reported(models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "models"
    shutil.copytree(models_dir, broken)
    state = torch.load(broken / UNET_WEIGHTS, weights_only=True)
    state["conv_in.weight"] = torch.zeros(16, 9, 3, 3)
    state["conv_out.bias"] = torch.zeros(4, dtype=torch.int64)
    torch.save(state, broken / UNET_WEIGHTS)
    with pytest.raises(WeightsError) as info:
        check_weights(broken)
    message = str(info.value)
    assert "conv_in.weight has shape (16, 9, 3, 3), the config expects (16, 8, 3, 3)" in message
    assert "conv_out.bias has dtype torch.int64" in message


def test_models_are_loaded_once_per_process(settings: Settings) -> None:
    a = shared_models(settings.models_dir, "cpu", torch.float32, ("whisper",))
    b = shared_models(Path(str(settings.models_dir)), "cpu", torch.float32, ["whisper"])
    assert a is b and a.unet is None and a.whisper is not None


# --- features ----------------------------------------------------------------------------


def test_windowed_encoder_equals_library_forward_at_30s(featurizer: MuseTalkFeaturizer) -> None:
    models = featurizer.models
    with torch.inference_mode():
        mel = log_mel(models, [speechlike(1.5)], 30 * SR)
        library = torch.stack(models.whisper(mel, output_hidden_states=True).hidden_states, dim=2)
        ours = encode_states(models.whisper, mel)
    assert ours.shape == (1, 1500, 5, 384)
    torch.testing.assert_close(ours, library)


@pytest.mark.parametrize("seconds", [1.0, 1.03, 2.51])
def test_offline_features_shape(featurizer: MuseTalkFeaturizer, seconds: float) -> None:
    audio = speechlike(seconds)
    feats = featurizer.offline_features(audio)
    assert feats.shape == (int(len(audio) // 640), 50, 384) and feats.dtype == np.float32


def block(features: np.ndarray, k: int) -> np.ndarray:
    """Rows of whisper frame k (of 10) in a [50, 384] frame feature."""
    return features[5 * k : 5 * k + 5]


def test_zero_padding_at_the_edges(featurizer: MuseTalkFeaturizer) -> None:
    audio = speechlike(1.0)[: SR + 100]  # 50 whisper frames, 25 video frames
    for feats in (
        featurizer.offline_features(audio),
        featurizer.featurize([FeatureRequest(None, audio, 0, range(25))])[0],
    ):
        first, last = feats[0], feats[24]
        assert all(not block(first, k).any() for k in range(4))  # whisper frames -4..-1
        assert all(block(first, k).any() for k in range(4, 10))
        assert all(block(last, k).any() for k in range(6))  # whisper frames 44..49
        assert all(not block(last, k).any() for k in range(6, 10))  # 50..53: past the audio


def featurizer_with(settings: Settings, **musetalk: object) -> MuseTalkFeaturizer:
    cfg = settings.musetalk.model_copy(update=musetalk)
    return MuseTalkFeaturizer(settings.model_copy(update={"musetalk": cfg}), device="cpu")


def test_streaming_equals_offline_when_the_window_holds_the_clip(settings: Settings) -> None:
    featurizer = featurizer_with(settings, encoder_window_s=30.0)
    audio = speechlike(1.2)
    offline = featurizer.offline_features(audio)
    streamed = featurizer.featurize([FeatureRequest(None, audio, 0, range(len(offline)))])[0]
    np.testing.assert_allclose(streamed, offline, rtol=1e-4, atol=1e-4)


def test_window_states_sit_at_absolute_positions(featurizer: MuseTalkFeaturizer) -> None:
    """A window cut out of a 30 s segment adds the position rows of its place in the segment:
    its input embedding (state 0: conv + positions, no attention) equals the 30 s forward's."""
    models = featurizer.models
    audio = speechlike(6.0)
    first, width = 150, 100  # whisper frames 150..249 (3 s .. 5 s)
    with torch.inference_mode():
        full = encode_states(models.whisper, log_mel(models, [audio], 30 * SR))[0]
        window = audio[first * 320 : (first + width) * 320]
        mel = log_mel(models, [window], width * 320)
        absolute = encode_states(models.whisper, mel, torch.tensor([first]))[0]
        relative = encode_states(models.whisper, mel)[0]
        with pytest.raises(ValueError, match="positions"):
            encode_states(models.whisper, mel, torch.tensor([1450]))
    inner = slice(2, width - 2)  # conv and STFT edges of the window aside
    torch.testing.assert_close(absolute[inner, 0], full[first + 2 : first + width - 2, 0], rtol=1e-3, atol=1e-3)
    assert (relative[inner, 0] - full[first + 2 : first + width - 2, 0]).abs().max() > 0.5


def test_windows_never_cross_a_30s_segment(featurizer: MuseTalkFeaturizer) -> None:
    audio = np.zeros(32 * SR, np.float32)
    request = FeatureRequest(None, audio[28 * SR :], 28 * SR, range(749, 751))  # frames at 29.96 s
    (group, windows), = featurizer.windows(request)
    assert group == range(749, 751)
    assert [(w.segment, w.first, w.offset, w.valid_to) for w in windows] == [(0, 1400, 1400, 1500), (1, 1500, 0, 1508)]
    assert all(len(w.samples) == featurizer.window_frames * 320 for w in windows)


def test_absolute_features_equal_offline_on_whole_30s_segments(settings: Settings) -> None:
    """30 s windows over a clip of two segments (32 s): frames on both sides of the 30 s
    boundary read each segment whole, as MuseTalk's offline path does, and match it."""
    featurizer = featurizer_with(settings, encoder_window_s=30.0)
    audio = np.concatenate([speechlike(16.0, seed=3), speechlike(16.0, seed=4)])
    offline = featurizer.offline_features(audio)
    frames = range(740, 800)  # 29.6 s .. 32 s: the boundary at frame 750, to the clip's end
    streamed = featurizer.featurize([FeatureRequest(None, audio, 0, frames)])[0]
    np.testing.assert_allclose(streamed, offline[frames.start : frames.stop], rtol=1e-4, atol=1e-4)


def test_streaming_stays_close_to_offline(featurizer: MuseTalkFeaturizer, speech_clip: np.ndarray) -> None:
    """Default 2 s window, 120 ms lookahead, on TTS speech (tiny random weights): the bound
    measured in benchmarks/README.md (median cosine 0.98, worst 0.97; window-relative
    positions gave 0.38)."""
    summary = compare_streaming(featurizer, speech_clip[: 6 * SR]).summary()
    assert summary["cosine_median"] >= 0.97 and summary["cosine_min"] >= 0.95, summary
    assert summary["rel_l2_median"] <= 0.25 and summary["rel_l2_max"] <= 0.32, summary


def test_batch_composition_does_not_change_features(featurizer: MuseTalkFeaturizer) -> None:
    a, b = speechlike(3.0, seed=1), speechlike(0.6, seed=2)
    ra = FeatureRequest(None, a[6400:40000], 6400, range(30, 55))
    rb = FeatureRequest(None, b[:9600], 0, range(0, 12))
    together = featurizer.featurize([ra, rb])
    alone = [featurizer.featurize([ra])[0], featurizer.featurize([rb])[0]]
    assert [f.shape for f in together] == [(25, 50, 384), (12, 50, 384)]
    for x, y in zip(together, alone):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_request_without_its_frames_audio_is_rejected(featurizer: MuseTalkFeaturizer) -> None:
    audio = speechlike(0.5)
    with pytest.raises(ValueError, match="does not cover frames"):
        featurizer.featurize([FeatureRequest(None, audio[:1000], 0, range(0, 5))])
    with pytest.raises(ValueError, match="1-D"):
        featurizer.featurize([FeatureRequest(None, np.zeros((2, 640), np.float32), 0, range(1))])


def test_lookahead_is_declared(featurizer: MuseTalkFeaturizer) -> None:
    assert featurizer.lookahead_ms >= 100 and featurizer.context_ms > 80
    assert featurizer.window_frames == 100  # 2 s by default, configurable


def test_streaming_vs_offline_measurement_runs(featurizer: MuseTalkFeaturizer, speech_clip: np.ndarray) -> None:
    audio = speech_clip[: 3 * SR]  # offline TTS speech (tests/speech.py)
    requests = streaming_requests(featurizer, audio)
    assert [r.frames.start for r in requests] == list(range(75))
    assert all(r.audio_start + len(r.audio) <= len(audio) for r in requests)
    fidelity = compare_streaming(featurizer, audio)
    summary = fidelity.summary()
    assert summary["frames"] == 75 and np.isfinite(fidelity.rel_l2).all()
    assert -1.0 <= summary["cosine_min"] <= summary["cosine_median"] <= 1.0


# --- avatar latents and rendering ---------------------------------------------------------


def test_masked_crop_lower_half_is_minus_one() -> None:
    crops = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    masked, reference = crop_inputs(crops)
    assert masked.shape == reference.shape == (2, 3, 256, 256)
    assert torch.all(masked[:, :, 128:] == -1.0)
    torch.testing.assert_close(masked[:, :, :128], reference[:, :, :128])
    assert reference.min() >= -1.0 and reference.max() <= 1.0
    with pytest.raises(AvatarError, match="RGB uint8"):
        crop_inputs(crops[:, :128])


def test_crop_latents_shape_and_reproducible(renderer: MuseTalkRenderer) -> None:
    crops = make_avatar("lat", 5).crops
    latents = compute_latents(renderer.models.vae, crops, batch=8, progress=False)
    assert latents.shape == (5, 8, 32, 32) and latents.dtype == np.float32
    one_by_one = compute_latents(renderer.models.vae, crops, batch=1, progress=False)
    np.testing.assert_allclose(latents, one_by_one, rtol=1e-4, atol=1e-5)
    assert not np.allclose(latents[:, :4], latents[:, 4:])  # masked != reference latents


def test_unet_output_shape(renderer: MuseTalkRenderer) -> None:
    models = renderer.models
    with torch.inference_mode():
        out = models.unet(torch.zeros(3, 8, 32, 32), 0, encoder_hidden_states=torch.zeros(3, 50, 384)).sample
    assert out.shape == (3, 4, 32, 32)


def test_add_latents_to_store_and_render(settings: Settings, renderer: MuseTalkRenderer) -> None:
    from ray_lipsync.avatar.store import AvatarStore

    store = AvatarStore(settings.avatars_dir)
    store.save(make_avatar("stored", 3))
    add_latents(store, "stored", settings, device="cpu")
    avatar = store.load("stored")
    assert avatar.extras[LATENTS_KEY].shape == (3, 8, 32, 32)
    renderer.load_avatar(avatar)
    renderer.load_avatar(avatar)  # idempotent
    features = np.random.default_rng(1).standard_normal((50, 384)).astype(np.float32)
    crops = renderer.render([RenderJob("stored", 1, features)])
    assert crops[0].shape == (256, 256, 3) and crops[0].dtype == np.uint8


def test_latents_cover_the_clips_and_a_clip_frame_renders(settings: Settings, renderer: MuseTalkRenderer) -> None:
    """An avatar with clips (issue 21): the MuseTalk latents step covers the clips' source
    frames too, through the store, and a job on a clip's frame renders."""
    import dataclasses

    from ray_lipsync.avatar.store import AvatarStore

    store = AvatarStore(settings.avatars_dir)
    store.save(dataclasses.replace(make_avatar("with_clips", 5, seed=7), clips={"wave": range(3, 5)}))
    add_latents(store, "with_clips", settings, device="cpu")
    avatar = store.load("with_clips")
    assert avatar.clips == {"wave": range(3, 5)}
    assert avatar.extras[LATENTS_KEY].shape == (5, 8, 32, 32)
    renderer.load_avatar(avatar)
    features = np.random.default_rng(3).standard_normal((50, 384)).astype(np.float32)
    crops = renderer.render([RenderJob("with_clips", avatar.clips["wave"][-1], features)])
    assert crops[0].shape == (256, 256, 3) and crops[0].dtype == np.uint8


def test_render_partial_batch_and_mirror_cycle(renderer: MuseTalkRenderer) -> None:
    avatar = make_avatar("cycle", 3, seed=4)
    avatar.extras[LATENTS_KEY] = compute_latents(renderer.models.vae, avatar.crops, progress=False)
    renderer.load_avatar(avatar)
    features = np.random.default_rng(2).standard_normal((50, 384)).astype(np.float32)
    sources = [avatar.cycle_index(k) for k in range(6)]
    assert sources == [0, 1, 2, 2, 1, 0]  # MuseTalk: the list, then the list reversed
    jobs = [RenderJob("cycle", s, features) for s in sources]
    crops = renderer.render(jobs)  # max_batch 4: a batch of 4, then a partial one of 2
    assert len(crops) == 6 and all(c.shape == (256, 256, 3) and c.dtype == np.uint8 for c in crops)
    for k, crop in enumerate(crops):
        single = renderer.render([jobs[k]])[0]
        assert np.abs(crop.astype(int) - single.astype(int)).max() <= 1
    assert np.abs(crops[1].astype(int) - crops[4].astype(int)).max() <= 1  # same source frame
    assert np.abs(crops[0].astype(int) - crops[2].astype(int)).max() > 1  # different frames


def test_avatar_without_latents_says_what_to_run(renderer: MuseTalkRenderer) -> None:
    with pytest.raises(AvatarError, match="avatar prepare --backend musetalk"):
        renderer.load_avatar(make_avatar("plain", 2))


def test_bad_jobs_are_rejected(renderer: MuseTalkRenderer) -> None:
    avatar = make_avatar("jobs", 2, seed=5)
    avatar.extras[LATENTS_KEY] = np.zeros((2, 8, 32, 32), np.float32)
    renderer.load_avatar(avatar)
    good = np.zeros((50, 384), np.float32)
    with pytest.raises(AvatarError, match="has 2 frames"):
        renderer.render([RenderJob("jobs", 2, good)])
    with pytest.raises(ValueError, match="shape"):
        renderer.render([RenderJob("jobs", 0, np.zeros((10, 384), np.float32))])
    with pytest.raises(KeyError, match="not loaded"):
        renderer.render([RenderJob("nobody", 0, good)])


# --- post-processing, device, offline render -----------------------------------------------


def test_post_processing_is_float32_like_musetalk() -> None:
    """fp16 VAE output: (x / 2 + 0.5).clamp(0, 1) in fp16, then x 255 and round in float32
    (MuseTalk's decode_latents); scaling and rounding in fp16 puts values one level off."""
    from ray_lipsync.backends.musetalk.renderer import to_uint8

    decoded = (torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2).half()
    reference = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    reference = (reference * 255).round().astype(np.uint8)
    ours = to_uint8(decoded)
    assert ours.dtype == torch.uint8 and ours.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(ours.numpy(), reference)
    in_fp16 = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert (in_fp16 != reference).mean() > 0.01  # what the fp16 path got wrong


def test_declared_gpu_without_cuda_fails_loudly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ray_lipsync.backends.musetalk.weights import resolve_device
    from ray_lipsync.errors import DeviceError

    if torch.cuda.is_available():
        pytest.skip("this machine has usable CUDA")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what Ray sets for a num_gpus=1 actor
    with pytest.raises(DeviceError, match="CUDA_VISIBLE_DEVICES=0.*musetalk.device = cpu"):
        resolve_device("auto")
    with pytest.raises(DeviceError, match="musetalk.device = cuda"):
        resolve_device("cuda")
    with caplog.at_level("WARNING"):
        assert resolve_device("cpu") == torch.device("cpu")  # asked for: warned, not refused
    assert "CPU" in caplog.text
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU given to this process
    assert resolve_device("auto") == torch.device("cpu")


def test_declared_gpu_stops_the_renderer_at_start(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_lipsync.errors import DeviceError

    if torch.cuda.is_available():
        pytest.skip("this machine has usable CUDA")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(DeviceError):
        MuseTalkRenderer(settings)
    cpu = settings.model_copy(update={"musetalk": settings.musetalk.model_copy(update={"device": "cpu"})})
    assert str(MuseTalkRenderer(cpu).device) == "cpu"


def test_offline_render_uses_the_offline_features(settings: Settings, renderer: MuseTalkRenderer) -> None:
    """`render_frames` with the musetalk backend feeds the renderer MuseTalk's whole-clip
    features (not the streaming windows, which differ from them)."""
    from ray_lipsync.render import render_frames

    class Recording(MuseTalkRenderer):
        def __init__(self) -> None:  # share the loaded models of the fixture renderer
            self.__dict__.update(renderer.__dict__)
            self.seen: list[np.ndarray] = []

        def render(self, jobs):  # type: ignore[no-untyped-def]
            self.seen.extend(j.features for j in jobs)
            return super().render(jobs)

    featurizer = MuseTalkFeaturizer(settings, device="cpu")
    avatar = make_avatar("offline", 2, seed=6)
    avatar.extras[LATENTS_KEY] = compute_latents(renderer.models.vae, avatar.crops, progress=False)
    audio = speechlike(2.4)
    n = len(audio) // 640
    recording = Recording()
    speech = np.ones(n, bool)
    frames = list(render_frames(audio, avatar, settings, speech=speech, featurizer=featurizer, renderer=recording))
    assert [f.index for f in frames] == list(range(n)) and all(f.speech for f in frames)
    offline = featurizer.offline_features(audio)
    np.testing.assert_array_equal(np.stack(recording.seen), offline)
    streaming = featurizer.featurize([FeatureRequest(None, audio, 0, range(n))])[0]
    assert np.abs(streaming - offline).max() > 1e-3  # the two paths really differ


def test_compile_setting_wraps_the_networks_once_per_process(settings: Settings, renderer: MuseTalkRenderer) -> None:
    """musetalk.compile (opt-in): the UNet and VAE decoder are torch.compile'd once per loaded
    model set and shared by every renderer; off, the renderer calls the models themselves.
    (Compiling the tiny UNet on this CPU takes ~60 s, so the compiled output is checked by
    hand and by benchmarks/gpu_check.py, not here: it matched eager within one grey level.)"""
    assert renderer.networks.unet is renderer.models.unet
    on = settings.model_copy(update={"musetalk": settings.musetalk.model_copy(update={"compile": True})})
    a, b = MuseTalkRenderer(on, device="cpu"), MuseTalkRenderer(on, device="cpu")
    assert a.networks is b.networks and a.networks.unet is not a.models.unet
    assert callable(a.networks.unet) and callable(a.networks.decode)
