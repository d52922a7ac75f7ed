"""MuseTalk v1.5 speed on one device: UNet + VAE decode frames/s per batch, Whisper encoder cost.

Builds the FULL-size architecture (ARCHITECTURE.md section 6: UNet [320,640,1280,1280] ~850M
params, sd-vae, whisper-tiny) with random weights - speed does not depend on the values - in
fp16 on CUDA. On CPU it runs a reduced size (small channels, batches 1 and 4, few iterations)
and says so ("reduced": true). It also reports how far streaming features are from offline
ones: with --models-dir holding the real weights that is the real figure, otherwise a
mechanism check on random Whisper weights (on CPU: 6 s of speech, 30 s windows skipped).

    .venv/bin/python benchmarks/musetalk_gpu.py --json benchmarks/results/musetalk_gpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from ray_lipsync.backends.musetalk.features import MuseTalkFeaturizer, encode_states, log_mel  # noqa: E402
from ray_lipsync.backends.musetalk.fidelity import compare_streaming  # noqa: E402
from ray_lipsync.backends.musetalk.renderer import Networks, render_latents, sinusoidal_positions  # noqa: E402
from ray_lipsync.backends.musetalk.weights import MuseTalkModels, check_weights, full_unet_config, load_models  # noqa: E402
from ray_lipsync.config import Settings  # noqa: E402
from ray_lipsync.errors import WeightsError  # noqa: E402

log = logging.getLogger("musetalk_gpu")
MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media" / "eng.wav"

SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32}
WHISPER_TINY = {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
                "decoder_layers": 4, "decoder_attention_heads": 6, "decoder_ffn_dim": 1536}  # fmt: skip


def build_random(device: torch.device, dtype: torch.dtype, reduced: bool) -> MuseTalkModels:
    """Random-weight models of the MuseTalk architecture (reduced channels when `reduced`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    unet_cfg = full_unet_config()
    vae_cfg = dict(SD_VAE)
    if reduced:
        unet_cfg.update(block_out_channels=[32, 64, 128, 128], layers_per_block=1)
        vae_cfg.update(block_out_channels=[32, 64, 64, 64], layers_per_block=1)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4, sample_size=256, **vae_cfg,
        )  # fmt: skip
        whisper = WhisperModel(WhisperConfig(**WHISPER_TINY)).get_encoder()
    return MuseTalkModels(
        device=device,
        dtype=dtype,
        unet=unet.to(dtype=dtype).eval(),
        vae=vae.to(dtype=dtype).eval(),
        whisper=whisper.to(dtype=dtype).eval(),
        feature_extractor=WhisperFeatureExtractor(feature_size=80),
    )


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of `fn` over `iters` runs after `warmup`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_render(
    models: MuseTalkModels, batches: list[int], warmup: int, iters: int, networks: Networks | None = None
) -> list[dict[str, float]]:
    """Median latency and frames/s of `render_latents` per batch size (`networks`: compiled or not)."""
    positions = sinusoidal_positions(50, 384).to(models.device, models.dtype)
    rows = []
    for batch in batches:
        latents = torch.randn(batch, 8, 32, 32, device=models.device, dtype=models.dtype)
        features = torch.randn(batch, 50, 384, device=models.device, dtype=models.dtype)
        seconds = timed(lambda: render_latents(models, latents, features, positions, networks), models.device, warmup, iters)
        rows.append({"batch": batch, "latency_ms": 1000 * seconds, "frames_per_s": batch / seconds})
        log.info("render batch %d: %.1f ms, %.1f frames/s", batch, 1000 * seconds, batch / seconds)
    return rows


def bench_encoder(models: MuseTalkModels, window_s: float, warmup: int, iters: int) -> dict[str, float]:
    """Offline (30 s window) and streaming (window_s windows, batched) encoder cost."""
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(30 * 16000)).astype(np.float32)
    mel30 = log_mel(models, [clip], 30 * 16000)
    with torch.inference_mode():
        offline = timed(lambda: encode_states(models.whisper, mel30), models.device, warmup, iters)
    out = {"offline_30s_window_ms": 1000 * offline, "offline_ms_per_audio_s": 1000 * offline / 30}
    n = int(window_s * 16000)
    for count in (1, 16, 64):
        windows = [clip[i * 320 : i * 320 + n] for i in range(count)]
        mel_s = timed(lambda: log_mel(models, windows, n), models.device, 1, max(1, iters // 2))
        mel = log_mel(models, windows, n)
        with torch.inference_mode():
            enc = timed(lambda: encode_states(models.whisper, mel), models.device, warmup, iters)
        out[f"stream_{count}_windows_encoder_ms"] = 1000 * enc
        out[f"stream_{count}_windows_logmel_ms"] = 1000 * mel_s
    # Per-frame streaming encodes one window per frame: 25 windows per second of audio.
    per_window = (out["stream_64_windows_encoder_ms"] + out["stream_64_windows_logmel_ms"]) / 64
    out["stream_ms_per_audio_s_at_64_windows"] = 25 * per_window
    return out


def fidelity(args: argparse.Namespace, random_models: MuseTalkModels) -> dict[str, Any]:
    """Streaming vs offline features on real speech (eng.wav, else offline TTS)."""
    settings = Settings(models_dir=args.models_dir)
    try:
        check_weights(args.models_dir, ("whisper",))
        models = load_models(args.models_dir, random_models.device, random_models.dtype, ("whisper",))
        weights = "real"
    except WeightsError:
        models, weights = random_models, "random (mechanism check only)"
    if MEDIA.is_file():
        from ray_lipsync.audio.decode import load_audio

        audio, source = load_audio(MEDIA), str(MEDIA.name)
    else:
        from ray_lipsync.tts import Synthesizer

        text = "The quick brown fox jumps over the lazy dog. Streaming avatars need steady latency."
        audio, source = Synthesizer().synthesize(text), "offline TTS"
    seconds = args.fidelity_seconds if random_models.device.type == "cuda" else min(args.fidelity_seconds, 6.0)
    audio = audio[: int(seconds * 16000)]
    result: dict[str, Any] = {"weights": weights, "audio": source, "seconds": len(audio) / 16000}
    windows = (settings.musetalk.encoder_window_s, 30.0) if random_models.device.type == "cuda" else (settings.musetalk.encoder_window_s,)
    for window in windows:  # 30 s windows (the whole segment so far): GPU only
        cfg = settings.musetalk.model_copy(update={"encoder_window_s": window})
        featurizer = MuseTalkFeaturizer(settings.model_copy(update={"musetalk": cfg}), models=models)
        key = f"window_{cfg.encoder_window_s:g}s"
        result[key] = compare_streaming(featurizer, audio, calls_of=32).summary()
        result[key]["lookahead_ms"] = featurizer.lookahead_ms
        log.info("fidelity %s: %s", key, result[key])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="real weights for the fidelity figure")
    parser.add_argument("--fidelity-seconds", type=float, default=20.0, help="speech used (at most 6 s on CPU)")
    parser.add_argument("--latency-budget-ms", type=float, default=100.0, help="largest acceptable batch latency")
    parser.add_argument("--no-fidelity", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reduced = device.type != "cuda"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batches = [1, 4] if reduced else [1, 4, 8, 16, 32, 64]
    warmup, iters = (1, 2) if reduced else (3, 10)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    models = build_random(device, dtype, reduced)
    unet_params = sum(p.numel() for p in models.unet.parameters())
    render = bench_render(models, batches, warmup, iters)
    encoder = bench_encoder(models, Settings().musetalk.encoder_window_s, warmup, iters)
    best = max(render, key=lambda r: r["frames_per_s"])
    within = [r for r in render if r["latency_ms"] <= args.latency_budget_ms]
    best_within = max(within, key=lambda r: r["frames_per_s"]) if within else None
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "reduced": reduced,
        "unet_params_M": unet_params / 1e6,
        "render": render,
        "encoder": encoder,
        "sessions_25fps": {
            "best_batch": best["batch"],
            "frames_per_s": best["frames_per_s"],
            "sessions": math.floor(best["frames_per_s"] / 25),
            "batch_latency_ms": best["latency_ms"],
            "within_budget": None if best_within is None else {
                "latency_budget_ms": args.latency_budget_ms,
                "batch": best_within["batch"],
                "sessions": math.floor(best_within["frames_per_s"] / 25),
                "batch_latency_ms": best_within["latency_ms"],
            },
        },  # fmt: skip
        "peak_gpu_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    if not args.no_fidelity:
        result["streaming_fidelity"] = fidelity(args, models)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    log.info("%s", text)


if __name__ == "__main__":
    main()
