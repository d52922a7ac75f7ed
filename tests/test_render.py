"""Offline render: TTS speech -> frames -> MP4, checked by decoding the file back."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from ray_lipsync.avatar.model import LANDMARK
from ray_lipsync.backends.procedural import synthetic_avatar
from ray_lipsync.clock import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_in_samples
from ray_lipsync.config import Settings
from ray_lipsync.errors import LipsyncError, MalformedAudio
from ray_lipsync.render import (
    RenderedFrame,
    detect_speech,
    encode_mp4,
    frame_speech,
    render_file,
    render_frames,
)

AAC_FRAME = 1024


def loudness(samples: np.ndarray) -> np.ndarray:
    """RMS per video frame."""
    n = frames_in_samples(len(samples))
    frames = samples[: n * SAMPLES_PER_FRAME].reshape(n, SAMPLES_PER_FRAME)
    return np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))


def mouth_region(avatar, source: int) -> tuple[slice, slice, np.ndarray]:
    """Rows, cols (frame pixels) around the mouth and the blend mask there (bool)."""
    x1, y1, x2, y2 = (int(v) for v in avatar.crop_boxes[source])
    sx, sy = (x2 - x1) / 256, (y2 - y1) / 256
    lm = avatar.landmarks[source]
    left, right = lm[LANDMARK["mouth_left"], 0], lm[LANDMARK["mouth_right"], 0]
    w = right - left
    cols = slice(int(x1 + (left - 0.25 * w) * sx), int(x1 + (right + 0.25 * w) * sx))
    rows = slice(int(y1 + lm[LANDMARK["upper_lip_top"], 1] * sy), int(y1 + lm[LANDMARK["chin"], 1] * sy))
    mask = cv2.resize(avatar.masks[source], (x2 - x1, y2 - y1)) > 0
    return rows, cols, mask[rows.start - y1 : rows.stop - y1, cols.start - x1 : cols.stop - x1]


def test_frame_speech_rule() -> None:
    chunks = np.array([0, 0, 1, 0, 0, 1, 0, 0, 1], bool)  # 9 chunks: 4 whole frames
    np.testing.assert_array_equal(frame_speech(chunks, 4), [False, True, True, False])
    np.testing.assert_array_equal(frame_speech(chunks[:3], 3), [False, True, False])


def test_frames_follow_the_speech(speech_clip: np.ndarray) -> None:
    settings = Settings()
    avatar = synthetic_avatar(n_frames=5)
    speech = detect_speech(speech_clip, settings)
    n = frames_in_samples(len(speech_clip))
    assert len(speech) == n and 0.3 * n < speech.sum() < 0.95 * n
    change = np.zeros(n)
    for rendered in render_frames(speech_clip, avatar, settings, speech=speech):
        k, source = rendered.index, avatar.cycle_index(rendered.index)
        assert rendered.image.shape == (512, 512, 3) and rendered.image.dtype == np.uint8
        assert rendered.speech == speech[k]
        idle = avatar.frames[source]
        if not rendered.speech:
            np.testing.assert_array_equal(rendered.image, idle)
            continue
        rows, cols, inside = mouth_region(avatar, source)
        diff = np.abs(rendered.image[rows, cols].astype(np.int16) - idle[rows, cols]).mean(axis=2)
        change[k] = diff[inside].mean()
    assert k == n - 1
    r = np.corrcoef(change, loudness(speech_clip))[0, 1]
    assert r >= 0.7, f"mouth motion vs loudness: Pearson r = {r:.2f}"
    spoken = speech & (loudness(speech_clip) > 0.01)
    r_speech = np.corrcoef(change[spoken], loudness(speech_clip)[spoken])[0, 1]
    assert r_speech >= 0.6, f"within speech: Pearson r = {r_speech:.2f}"


def test_render_flags_must_match_the_audio() -> None:
    with pytest.raises(LipsyncError, match="speech flags"):
        list(render_frames(np.zeros(6400, np.float32), synthetic_avatar(n_frames=1), Settings(), speech=np.ones(3, bool)))


def decode(path: Path) -> tuple[list[np.ndarray], np.ndarray, str]:
    with av.open(str(path)) as container:
        codec = container.streams.video[0].codec_context.name
        images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return images, audio, codec


def test_render_file_writes_a_playable_mp4(tmp_path: Path, speech_clip: np.ndarray, lipsync_settings) -> None:
    from speech import to_wav_bytes

    clip = speech_clip[: int(3.33 * SAMPLE_RATE)]  # ends in a partial frame
    wav = tmp_path / "speech.wav"
    wav.write_bytes(to_wav_bytes(clip))
    report = render_file(wav, tmp_path / "out.mp4", lipsync_settings, progress=False)
    images, audio, codec = decode(tmp_path / "out.mp4")
    assert codec == "h264" and report.video_codec in ("libx264", "libopenh264")
    assert len(images) == report.frames == int(len(clip) / SAMPLE_RATE * 25) == 83
    assert images[0].shape == (512, 512, 3) and report.avatar == "default"
    assert abs(len(audio) - len(clip)) <= AAC_FRAME
    assert 0 < report.speech_frames <= report.frames and report.realtime_factor > 0
    # audio content survives: loudness envelopes of input and decoded track agree
    m = min(len(audio), len(clip)) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME
    assert np.corrcoef(loudness(audio[:m]), loudness(clip[:m]))[0, 1] > 0.9


def test_odd_sized_avatar_is_padded_to_even(tmp_path: Path) -> None:
    avatar = synthetic_avatar(size=(203, 181), n_frames=2)
    samples = np.zeros(SAMPLE_RATE // 2, np.float32)
    frames = render_frames(samples, avatar, Settings(), speech=np.zeros(12, bool))
    encode_mp4(frames, samples, tmp_path / "odd.mp4", avatar.size, progress=False)
    images, _, _ = decode(tmp_path / "odd.mp4")
    assert len(images) == 12 and images[0].shape == (182, 204, 3)
    # colours survive the RGB -> yuv420p -> RGB round trip (no range or matrix mix-up)
    assert np.abs(images[0][:181, :203].astype(int) - avatar.frames[0]).mean() < 3.0
    assert isinstance(next(iter(render_frames(samples, avatar, Settings(), speech=np.zeros(12, bool)))), RenderedFrame)


def test_too_short_audio_is_rejected(tmp_path: Path, lipsync_settings) -> None:
    from speech import to_wav_bytes

    wav = tmp_path / "blip.wav"
    wav.write_bytes(to_wav_bytes(np.zeros(300, np.float32)))
    with pytest.raises(MalformedAudio, match="at least one frame"):
        render_file(wav, tmp_path / "out.mp4", lipsync_settings, progress=False)
