"""benchmarks/gpu_check: the one-call GPU check runs end to end in its reduced CPU mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from speech import speech, to_wav_bytes

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.mark.slow
def test_gpu_check_reduced_mode_runs(tmp_path: Path) -> None:
    """Tiny weights in the real layout, the default avatar with latents, the model benchmark
    and LocalPipeline sessions with the musetalk backend: JSON and table come out."""
    from ray_lipsync.audio.vad import default_model_path

    # --speech and --vad-model: how it runs where ../shared and faster-whisper are absent
    wav = tmp_path / "speech.wav"
    wav.write_bytes(to_wav_bytes(speech("Hello there, how are you today?")))
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--reduced", "--json", str(out),
         "--workdir", str(tmp_path / "work"), "--speech", str(wav), "--vad-model", str(default_model_path())],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["reduced"] is True and result["device"] == "cpu" and result["speech"] == "speech.wav"
    eager = result["modes"]["eager"]
    assert [r["batch"] for r in eager["render"]] == [1, 2] and all(r["frames_per_s"] > 0 for r in eager["render"])
    runs = eager["pipeline"]
    assert [r["sessions"] for r in runs] == [1, 2]
    for run in runs:
        assert run["device"] == "cpu" and run["frames"] > 0 and run["speech_frames_measured"] > 0
        assert run["latency_ms"]["p50"] is not None and run["rendered_frames_per_s"] > 0
    assert "skipped" in result["modes"]["compile"] and "skipped" in result["modes"]["graphs"]
    assert result["encoder"]["offline_ms_per_audio_s"] > 0
    assert "frames/s per batch" in proc.stdout and "sessions:" in proc.stdout
