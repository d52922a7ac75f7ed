"""Shared fixtures. Keep this small: helpers live in tests/helpers.py, tests/speech.py, ..."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

# helpers.py asserts on behalf of the test modules: its asserts get pytest's messages too
pytest.register_assert_rewrite("helpers")

# pipecat-ai and MediaPipe 0.10.14 cannot share a venv (protobuf >= 5 vs < 5): without pipecat
# its tests are not collected here, and ./dev test runs them in .venv-pipecat.
HAVE_PIPECAT = importlib.util.find_spec("pipecat") is not None
collect_ignore_glob = [] if HAVE_PIPECAT else ["test_pipecat*.py"]


def pytest_report_header(config: pytest.Config) -> str:
    if HAVE_PIPECAT:
        return "pipecat tests: collected (pipecat-ai installed)"
    return "pipecat tests: not collected (pipecat-ai absent; ./dev test runs them in .venv-pipecat)"


@pytest.fixture(scope="session")
def speech_clip() -> np.ndarray:
    """About 8.7 s of offline TTS: three phrases separated by 0.6 s silences (16 kHz)."""
    from speech import speech_with_pauses

    return speech_with_pauses()


@pytest.fixture(scope="session")
def speech_detector():
    """One Silero VAD session shared by the tests (loading it takes ~0.1 s)."""
    from ray_lipsync.audio.vad import SpeechDetector

    return SpeechDetector()


@pytest.fixture(scope="session")
def lipsync_home(tmp_path_factory: pytest.TempPathFactory):
    """A RAY_LIPSYNC_HOME for the test session with the default avatar prepared once."""
    from ray_lipsync.avatar.default import load_or_prepare
    from ray_lipsync.avatar.store import AvatarStore
    from ray_lipsync.config import Settings

    home = tmp_path_factory.mktemp("lipsync_home")
    settings = Settings(home=home)
    load_or_prepare(AvatarStore(settings.avatars_dir), "default", settings.avatar)
    return home


@pytest.fixture(scope="session")
def lipsync_settings(lipsync_home):
    """Settings (procedural backend) on the shared test home; derive variants with model_copy.

    Admission from measured headroom is off: these tests exercise other features on a 2-core
    machine they share with their own clients and, in CI, with whatever else runs, so the
    host's measured load must not decide whether their second session opens. Admission is
    tested on its own (test_admission.py)."""
    from ray_lipsync.config import Settings

    return Settings(home=lipsync_home, serve={"admission": {"enabled": False}})


@pytest.fixture(scope="session")
def clip_settings(tmp_path_factory: pytest.TempPathFactory):
    """Settings on a home holding avatar "clipped", made from the default portrait (cut to
    384x384 around the face) with procedural head motion (`avatar.motion.SAMPLE_MOTIONS`):
    the main video (a sway), clips `listening` (a nod), `thinking` (a tilt) and `wave` (30
    frames, a slow sideways move and back: long enough for speech to start during it). The videos are
    written to MP4 and prepared through the real `avatar prepare` path (MediaPipe); where
    MediaPipe is not installed (the pipecat venv), each frame is prepared from the default
    portrait's shipped landmarks moved with it. Returns (settings, PrepareReport or None)."""
    from helpers import CLIPPED
    from ray_lipsync.avatar.face import FaceObservation
    from ray_lipsync.avatar.motion import (
        SAMPLE_MOTIONS, motion, moved, moved_points, sample_portrait, sample_videos,
    )
    from ray_lipsync.avatar.prepare import build_avatar, join_clips, run_prepare
    from ray_lipsync.avatar.store import AvatarStore
    from ray_lipsync.config import Settings

    home = tmp_path_factory.mktemp("clip_home")
    face, points = sample_portrait()
    settings = Settings(home=home, avatar={"name": CLIPPED}, serve={"admission": {"enabled": False}})
    if importlib.util.find_spec("mediapipe") is not None:
        paths = sample_videos(face, home)
        report = run_prepare(settings, image=None, video=paths.pop("main"), name=CLIPPED,
                             progress=False, clips=paths)
        return settings, report
    steps = {name: motion(n, **sway) for name, (n, sway) in SAMPLE_MOTIONS.items()}
    parts = {
        name: build_avatar(CLIPPED, np.stack([moved(face, s) for s in moved_steps]),
                           [FaceObservation.from_landmarks(moved_points(points, s, face.shape[1::-1]))
                            for s in moved_steps], settings.avatar, smooth=True)[0]
        for name, moved_steps in steps.items()
    }
    main = parts.pop("main")
    AvatarStore(settings.avatars_dir).save(join_clips(main, parts))
    return settings, None
