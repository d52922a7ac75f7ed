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
