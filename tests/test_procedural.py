"""The procedural backend on synthetic audio and a drawn avatar."""

from __future__ import annotations

import numpy as np
import pytest

from ray_lipsync.avatar.model import LANDMARK
from ray_lipsync.backends import create_featurizer, create_renderer
from ray_lipsync.backends.procedural import ProceduralFeaturizer, ProceduralRenderer, synthetic_avatar
from ray_lipsync.clock import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_in_samples, ms_to_samples
from ray_lipsync.config import Settings
from ray_lipsync.errors import AudioInputError, AvatarNotFound, LipsyncError
from ray_lipsync.types import FeatureRequest, RenderJob


def vowel(seconds: float, f0: float, formants: tuple[float, ...], amp: float, seed: int = 0) -> np.ndarray:
    """A crude voiced vowel: harmonics of f0 weighted by resonances at `formants`."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    out = np.zeros_like(t)
    for h in range(1, int(7000 / f0)):
        f = h * f0
        gain = sum(1.0 / (1.0 + ((f - fm) / 90.0) ** 2) for fm in formants)
        out += gain * np.sin(2 * np.pi * f * t + h)
    out += 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return (amp * out / np.max(np.abs(out))).astype(np.float32)


def speechlike(seed: int = 1) -> np.ndarray:
    """Syllables of varying loudness and vowel colour separated by pauses (about 4 s)."""
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(10):
        formants = [(700.0, 1200.0), (300.0, 2300.0), (320.0, 800.0)][i % 3]
        parts.append(vowel(rng.uniform(0.15, 0.35), rng.uniform(100, 180), formants, rng.uniform(0.05, 0.6), i))
        parts.append(np.zeros(int(rng.uniform(0.04, 0.3) * SAMPLE_RATE), np.float32))
    return np.concatenate(parts)


def whole(featurizer: ProceduralFeaturizer, audio: np.ndarray) -> np.ndarray:
    n = frames_in_samples(len(audio))
    return featurizer.featurize([FeatureRequest(featurizer.new_state(), audio, 0, range(n))])[0]


@pytest.mark.parametrize("with_context", [False, True])
def test_streaming_equals_whole_clip(with_context: bool) -> None:
    featurizer = ProceduralFeaturizer(Settings())
    audio = speechlike()
    n = frames_in_samples(len(audio))
    expected = whole(featurizer, audio)
    lookahead = ms_to_samples(featurizer.lookahead_ms)
    context = ms_to_samples(featurizer.context_ms) if with_context else 0
    state = featurizer.new_state()
    rng = np.random.default_rng(3)
    got, k = [], 0
    while k < n:
        stop = min(n, k + int(rng.integers(1, 9)))
        lo = max(0, k * SAMPLES_PER_FRAME - context)
        hi = min(len(audio), stop * SAMPLES_PER_FRAME + lookahead)
        got.append(featurizer.featurize([FeatureRequest(state, audio[lo:hi], lo, range(k, stop))])[0])
        k = stop
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-6)


def test_requests_of_many_sessions_in_one_call() -> None:
    featurizer = ProceduralFeaturizer(Settings())
    a, b = speechlike(1), speechlike(2)
    sa, sb = featurizer.new_state(), featurizer.new_state()
    half = 40
    hi = half * SAMPLES_PER_FRAME + ms_to_samples(featurizer.lookahead_ms)
    first = featurizer.featurize(
        [FeatureRequest(sa, a[:hi], 0, range(half)), FeatureRequest(sb, b[:hi], 0, range(half))]
    )
    na, nb = frames_in_samples(len(a)), frames_in_samples(len(b))
    lo = half * SAMPLES_PER_FRAME
    second = featurizer.featurize(
        [FeatureRequest(sb, b[lo:], lo, range(half, nb)), FeatureRequest(sa, a[lo:], lo, range(half, na))]
    )
    np.testing.assert_allclose(np.concatenate([first[0], second[1]]), whole(featurizer, a), atol=1e-6)
    np.testing.assert_allclose(np.concatenate([first[1], second[0]]), whole(featurizer, b), atol=1e-6)


def test_features_range_and_silence() -> None:
    featurizer = create_featurizer(Settings())
    assert isinstance(featurizer, ProceduralFeaturizer) and 0 < featurizer.lookahead_ms <= 60
    feats = whole(featurizer, speechlike())
    assert feats.dtype == np.float32 and feats.shape[1] == 3
    assert feats.min() >= 0.0 and feats.max() <= 1.0 and feats[:, 0].max() > 0.8
    silent = whole(featurizer, np.zeros(SAMPLE_RATE, np.float32))
    assert silent.shape == (25, 3) and not silent.any()
    # the mouth closes again within a few frames of silence after speech
    tail = whole(featurizer, np.concatenate([vowel(0.5, 120, (700, 1200), 0.5), np.zeros(8000, np.float32)]))
    assert not tail[-4:].any()


def test_open_follows_loudness_and_shape_follows_spectrum() -> None:
    featurizer = ProceduralFeaturizer(Settings())
    quiet_loud = np.concatenate([vowel(1.0, 120, (700, 1200), 0.5), vowel(0.4, 120, (700, 1200), 0.06)])
    feats = whole(featurizer, quiet_loud)
    assert feats[15:24, 0].mean() > feats[-5:, 0].mean() + 0.3
    front = whole(featurizer, vowel(0.6, 140, (300, 2300, 3000), 0.4))[5:]
    back = whole(featurizer, vowel(0.6, 140, (320, 800), 0.4))[5:]
    assert front[:, 1].mean() > front[:, 2].mean() + 0.2
    assert back[:, 2].mean() > back[:, 1].mean() + 0.2


def test_request_validation() -> None:
    featurizer = ProceduralFeaturizer(Settings())
    state = featurizer.new_state()
    with pytest.raises(AudioInputError, match="needs samples"):
        featurizer.featurize([FeatureRequest(state, np.zeros(100, np.float32), 0, range(2))])
    bad = np.zeros(2000, np.float32)
    bad[5] = np.nan
    with pytest.raises(AudioInputError, match="NaN"):
        featurizer.featurize([FeatureRequest(state, bad, 0, range(2))])
    with pytest.raises(TypeError):
        featurizer.featurize([FeatureRequest(object(), np.zeros(2000, np.float32), 0, range(2))])


@pytest.fixture(scope="module")
def avatar():
    return synthetic_avatar(n_frames=3)


def render(renderer: ProceduralRenderer, avatar, features, frame: int = 0) -> np.ndarray:
    return renderer.render([RenderJob(avatar.name, frame, np.asarray(features, np.float32))])[0]


def mouth_gap_box(avatar, frame: int = 0) -> tuple[slice, slice]:
    lm = avatar.landmarks[frame]
    x0, x1 = lm[LANDMARK["mouth_left"], 0], lm[LANDMARK["mouth_right"], 0]
    cx, w = (x0 + x1) / 2, x1 - x0
    top, bottom = lm[LANDMARK["upper_lip_bottom"], 1], lm[LANDMARK["chin"], 1]
    return slice(int(top), int((top + bottom) / 2)), slice(int(cx - w / 4), int(cx + w / 4))


def test_renderer_shape_and_idle(avatar) -> None:
    renderer = create_renderer(Settings())
    renderer.load_avatar(avatar)
    renderer.load_avatar(avatar)  # idempotent
    crops = renderer.render([RenderJob(avatar.name, i, np.zeros(3, np.float32)) for i in range(3)])
    for i, crop in enumerate(crops):
        assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, avatar.crops[i])
    assert renderer.render([]) == []


def test_renderer_opens_mouth_inside_mask(avatar) -> None:
    renderer = ProceduralRenderer(Settings())
    renderer.load_avatar(avatar)
    rows, cols = mouth_gap_box(avatar)
    idle = avatar.crops[0].astype(np.float32)
    change, darkness = [], []
    for level in (0.0, 0.3, 0.6, 1.0):
        crop = render(renderer, avatar, [level, 0.0, 0.0]).astype(np.float32)
        change.append(np.abs(crop - idle).mean())
        darkness.append(idle[rows, cols].mean() - crop[rows, cols].mean())
        outside = avatar.masks[0] == 0
        np.testing.assert_array_equal(crop[outside], idle[outside])
    assert change == sorted(change) and change[-1] > 2.0
    assert darkness[-1] > 30.0 and darkness == sorted(darkness)


def test_spread_and_round_change_width(avatar) -> None:
    renderer = ProceduralRenderer(Settings())
    renderer.load_avatar(avatar)
    y = int(avatar.landmarks[0][LANDMARK["mouth_left"], 1])

    def lip_width(crop: np.ndarray) -> int:
        rows = crop[y - 10 : y + 16].astype(int)
        return int(((rows[..., 0] - rows[..., 1]) > 70).sum(axis=1).max())

    neutral = lip_width(avatar.crops[0])
    wide = lip_width(render(renderer, avatar, [0.0, 1.0, 0.0]))
    narrow = lip_width(render(renderer, avatar, [0.0, 0.0, 1.0]))
    assert wide > neutral > narrow


def test_renderer_validation(avatar) -> None:
    renderer = ProceduralRenderer(Settings())
    with pytest.raises(AvatarNotFound, match="load_avatar"):
        render(renderer, avatar, [0.5, 0, 0])
    renderer.load_avatar(avatar)
    with pytest.raises(LipsyncError, match="3 finite floats"):
        render(renderer, avatar, [0.5, 0])
    with pytest.raises(LipsyncError, match="frames"):
        render(renderer, avatar, [0.5, 0, 0], frame=7)


def test_loud_vowel_opens_the_mouth_end_to_end(avatar) -> None:
    featurizer, renderer = ProceduralFeaturizer(Settings()), ProceduralRenderer(Settings())
    renderer.load_avatar(avatar)
    audio = np.concatenate([np.zeros(8000, np.float32), vowel(0.6, 120, (700, 1200), 0.5)])
    feats = whole(featurizer, audio)
    rows, cols = mouth_gap_box(avatar)
    idle = avatar.crops[0][rows, cols].astype(np.float32).mean()
    silent = render(renderer, avatar, feats[5])
    loud = render(renderer, avatar, feats[-3])
    np.testing.assert_array_equal(silent, avatar.crops[0])
    assert idle - loud[rows, cols].astype(np.float32).mean() > 30.0
