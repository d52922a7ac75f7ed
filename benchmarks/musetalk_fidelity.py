"""How close streaming MuseTalk features stay to the offline ones, per window and lookahead.

Replays speech as a session would stream it (one request per frame, as soon as its audio and
lookahead exist, with the featurizer's left context) and compares every frame's [50, 384]
features with the whole-clip offline features (`fidelity.compare_streaming`): relative L2
and cosine per frame, median / p90 / worst.

Weights (`--weights`, several allowed):
- `real`: the Whisper-tiny of `--models-dir` (the real figure; needs the user's weights);
- `tiny`: the random tiny encoder of the tests (tests/musetalk_fixtures.py, real file layout);
- `random-whisper-tiny`: the full whisper-tiny architecture with random weights.
Random weights are a mechanism check: their attention is close to uniform, so the figure
depends on how many tokens a window holds, not on how far it looks ahead.

Audio: the first `--seconds` of ../shared/media/eng.wav when present, and offline TTS
(tests/speech.py's phrases via ray_lipsync.tts).

    .venv/bin/python benchmarks/musetalk_fidelity.py --weights tiny random-whisper-tiny \\
        --windows 1,2,3,4 --lookaheads 100,120,200 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from ray_lipsync.backends.musetalk.fidelity import sweep  # noqa: E402
from ray_lipsync.backends.musetalk.weights import MuseTalkModels, check_weights, load_models  # noqa: E402
from ray_lipsync.config import Settings  # noqa: E402
from ray_lipsync.errors import WeightsError  # noqa: E402

log = logging.getLogger("musetalk_fidelity")
MEDIA = ROOT.parent / "shared" / "media" / "eng.wav"
TTS_TEXT = (
    "Hello there, how are you today? The quick brown fox jumps over the lazy dog. "
    "Streaming avatars need steady latency."
)
WHISPER_TINY = {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
                "decoder_layers": 4, "decoder_attention_heads": 6, "decoder_ffn_dim": 1536}  # fmt: skip


def whisper_models(kind: str, models_dir: Path, device: torch.device) -> MuseTalkModels:
    """The Whisper encoder (+ feature extractor) of `kind` on `device` in fp32."""
    if kind == "real":
        check_weights(models_dir, ("whisper",))
        return load_models(models_dir, device, torch.float32, ("whisper",))
    if kind == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from musetalk_fixtures import build_tiny_models

        root = build_tiny_models(Path(tempfile.mkdtemp(prefix="musetalk-tiny-")))
        return load_models(root, device, torch.float32, ("whisper",))
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    encoder = WhisperModel(WhisperConfig(**WHISPER_TINY)).get_encoder().to(device).eval()
    return MuseTalkModels(device=device, dtype=torch.float32, whisper=encoder,
                          feature_extractor=WhisperFeatureExtractor(feature_size=80))  # fmt: skip


def clips(seconds: float) -> dict[str, np.ndarray]:
    """Speech to compare on: eng.wav (when present) and offline TTS, each at most `seconds`."""
    from ray_lipsync.tts import Synthesizer

    out = {}
    if MEDIA.is_file():
        from ray_lipsync.audio.decode import load_audio

        out["eng.wav"] = load_audio(MEDIA)
    out["tts"] = Synthesizer().synthesize(TTS_TEXT)
    return {k: v[: int(seconds * 16000)] for k, v in out.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    windows = [float(x) for x in args.windows.split(",")]
    lookaheads = [int(x) for x in args.lookaheads.split(",")]
    settings = Settings(models_dir=args.models_dir)
    audio = clips(args.seconds)
    result: dict[str, Any] = {"benchmark": "musetalk_fidelity", "device": str(device), "runs": []}
    for kind in args.weights:
        try:
            models = whisper_models(kind, args.models_dir, device)
        except WeightsError as exc:
            log.warning("skipping %s weights: %s", kind, str(exc).splitlines()[0])
            continue
        for name, clip in audio.items():
            started = time.perf_counter()
            rows = sweep(settings, models, clip, windows, lookaheads)
            for row in rows:
                result["runs"].append({"weights": kind, "audio": name, "seconds": len(clip) / 16000, **row})
                log.info("%s %s window %gs lookahead %d ms: cosine median %.3f min %.3f, rel L2 median %.3f max %.3f",
                         kind, name, row["encoder_window_s"], row["lookahead_ms"], row["cosine_median"],
                         row["cosine_min"], row["rel_l2_median"], row["rel_l2_max"])  # fmt: skip
            log.info("%s on %s: %.1f s", kind, name, time.perf_counter() - started)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", default=["real", "tiny", "random-whisper-tiny"],
                        choices=["real", "tiny", "random-whisper-tiny"])  # fmt: skip
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--windows", default="1,2,3,4", help="encoder windows (s), comma-separated")
    parser.add_argument("--lookaheads", default="100,120,200", help="lookaheads (ms), comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="speech per clip")
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/musetalk_fidelity.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
