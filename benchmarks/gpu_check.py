"""The one-call GPU check (run by benchmarks/gpu_check.sh): MuseTalk v1.5 speed, then the real
pipeline, each eager, with `musetalk.cuda_graphs` and with `musetalk.compile`, inside a
wall-time budget.

1. Random full-size weights (ARCHITECTURE.md section 6: UNet ~850M params, sd-vae,
   whisper-tiny) are written in MuseTalk's file layout, so the real loaders load them; the
   default avatar gets its VAE latents.
2. Model: frames/s per batch size (UNet step + VAE decode + uint8, fp16 on CUDA), Whisper
   encoder time per second of audio (offline 30 s windows; streaming windows), peak memory.
3. Pipeline: `LocalPipeline` with the musetalk backend at 1, 4, 8, 16 concurrent sessions of
   real-time speech (benchmarks/latency.py's session driver): frames/s per session, rendered
   frames/s, p50/p99 latency (last audio sample of a frame -> frame ready), dropped frames.
2 and 3 run in each of `--modes`: eager, then `graphs` (musetalk.cuda_graphs: the render step
replayed from CUDA graphs, the renderer's start with the capture reported on its own), then compiled (compile time
reported on its own; the compiled graphs are shared by every renderer of the process, so the
pipeline runs start warm).

Phases that would overrun the budget are skipped and say so. `--reduced` (automatic without
CUDA) uses the tests' tiny weights, 2 batch sizes, 1 and 2 sessions and no compile: a check
that the script works, not a measurement.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json [--budget-s 480]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency import drive_session, load_speech, percentiles  # noqa: E402
from musetalk_gpu import SD_VAE, WHISPER_TINY, bench_encoder, bench_render  # noqa: E402
from output import git_commit  # noqa: E402

from ray_lipsync.backends.musetalk.weights import UNET_CONFIG, UNET_WEIGHTS, full_unet_config  # noqa: E402
from ray_lipsync.config import Settings  # noqa: E402

log = logging.getLogger("gpu_check")
SESSIONS = (1, 4, 8, 16)
BATCHES = (1, 4, 8, 16, 32)


class Budget:
    """Wall-time budget counted from `started` (the shell script's start, or now)."""

    def __init__(self, seconds: float, started: float) -> None:
        self.deadline = started + seconds

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def write_weights(root: Path, reduced: bool) -> Path:
    """Random MuseTalk v1.5 weights in the real layout under `root` (tiny when `reduced`)."""
    if reduced:
        sys.path.insert(0, str(ROOT / "tests"))
        from musetalk_fixtures import build_tiny_models

        return build_tiny_models(root)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = full_unet_config()
    (root / UNET_CONFIG).parent.mkdir(parents=True, exist_ok=True)
    (root / UNET_CONFIG).write_text(json.dumps(config, indent=2))
    unet = UNet2DConditionModel.from_config(config)
    torch.save({k: v.half() for k, v in unet.state_dict().items()}, root / UNET_WEIGHTS)  # 1.7 GB, not 3.4
    del unet
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        latent_channels=4, sample_size=256, **SD_VAE)  # fmt: skip
    vae.save_pretrained(root / "sd-vae", safe_serialization=False)
    whisper = WhisperConfig(**WHISPER_TINY, num_mel_bins=80, max_source_positions=1500)
    (root / "whisper").mkdir(parents=True, exist_ok=True)
    whisper.save_pretrained(root / "whisper")
    torch.save(WhisperForConditionalGeneration(whisper).state_dict(), root / "whisper" / "pytorch_model.bin")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")
    return root


def prepare_avatar(settings: Settings) -> None:
    """The default avatar with its MuseTalk latents, in settings.home."""
    from ray_lipsync.avatar.default import ensure_default_avatar
    from ray_lipsync.avatar.store import AvatarStore
    from ray_lipsync.backends.musetalk import add_latents

    store = AvatarStore(settings.avatars_dir)
    ensure_default_avatar(store, settings.avatar)
    add_latents(store, "default", settings)


MODES = {"eager": {}, "graphs": {"cuda_graphs": True}, "compile": {"compile": True}}  # musetalk settings


def with_mode(settings: Settings, mode: str) -> Settings:
    """`settings` with the musetalk options of `mode` (MODES)."""
    return settings.model_copy(update={"musetalk": settings.musetalk.model_copy(update=MODES[mode])})


def bench_model(settings: Settings, batches: tuple[int, ...], warmup: int, iters: int) -> dict[str, Any]:
    """Renderer speed per batch (the renderer's own networks: compiled or replayed from CUDA
    graphs when settings say so; `capture_s` is the renderer's start with the graphs' capture, the
    weights already loaded when an earlier mode loaded them)."""
    from ray_lipsync.backends.musetalk.renderer import MuseTalkRenderer, render_latents, sinusoidal_positions

    started = time.perf_counter()
    renderer = MuseTalkRenderer(settings)
    models, out = renderer.models, {}
    if renderer.networks.graphed is not None:
        out["capture_s"] = round(time.perf_counter() - started, 1)
        out["buckets"] = renderer.networks.graphed.buckets
    if settings.musetalk.compile:  # compile the batch sizes the pipeline meets (automatic dynamic shapes)
        started = time.perf_counter()
        positions = sinusoidal_positions(50, 384).to(models.device, models.dtype)
        for batch in (1, 2, max(batches)):
            latents = torch.randn(batch, 8, 32, 32, device=models.device, dtype=models.dtype)
            features = torch.randn(batch, 50, 384, device=models.device, dtype=models.dtype)
            render_latents(models, latents, features, positions, renderer.networks)
        out["compile_s"] = round(time.perf_counter() - started, 1)
    out["render"] = bench_render(models, list(batches), warmup, iters, renderer.networks)
    return out


async def run_sessions(settings: Settings, sessions: int, seconds: float, speech: np.ndarray) -> dict[str, Any]:
    """`sessions` concurrent real-time sessions through LocalPipeline (musetalk)."""
    from ray_lipsync.streaming.local import LocalPipeline

    pipeline = LocalPipeline(settings)
    try:
        opened = [await pipeline.create_session(backend="musetalk") for _ in range(sessions)]
        before = sum(s.get("frames", 0) for s in await pipeline.replica_stats())
        offset = len(speech) // sessions
        rng = np.random.default_rng(sessions)
        started = time.perf_counter()
        results = await asyncio.gather(*[
            drive_session(s, np.roll(speech, -i * offset), seconds, float(rng.uniform(0, 0.04)))
            for i, s in enumerate(opened)
        ])  # fmt: skip
        elapsed = time.perf_counter() - started
        stats = await pipeline.replica_stats()
    finally:
        await pipeline.shutdown()
    rendered = sum(s.get("frames", 0) for s in stats) - before
    latencies = [v for r in results for v in r["latencies"]]
    emitted = sum(r["emitted"] for r in results)
    dropped = sum(r["dropped"] for r in results)
    return {
        "sessions": sessions,
        "seconds": seconds,
        # frames leave at 25 fps whatever happens (a late one is replaced): the fresh rate
        # is 25 x the share of frames that were not replaced
        "fresh_fps_per_session": round(25.0 * (1 - dropped / emitted), 2) if emitted else None,
        "rendered_frames_per_s": round(rendered / elapsed, 1),
        "speech_frames_measured": len(latencies),
        "latency_ms": percentiles(latencies),
        "dropped_frames": int(dropped),
        "frames": int(emitted),
        "max_batch_seen": max((s.get("max_batch_seen", 0) for s in stats), default=0),
        "device": stats[0].get("device") if stats else None,
    }


def pipeline_runs(
    mode: str, settings: Settings, counts: tuple[int, ...], seconds: float, budget: Budget, speech: np.ndarray,
    runs: list[dict], saved: Callable[[], None] = lambda: None,
) -> None:
    """`run_sessions` for each session count that still fits the budget, appended to `runs`
    (`saved()` after each)."""
    for n in counts:
        need = seconds + settings.pipeline.playout_delay_ms / 1000 + 4 + 0.3 * n
        if not budget.allows(need):
            runs.append({"sessions": n, "skipped": f"out of time ({budget.left():.0f} s left, ~{need:.0f} s needed)"})
            continue
        runs.append(asyncio.run(run_sessions(settings, n, seconds, speech)))
        log.info("pipeline %s: %s", mode, runs[-1])
        saved()


def table(result: dict[str, Any]) -> str:
    """A short text summary of `result`."""
    lines = [f"{result['device']}  torch {result['torch']}  {result['dtype']}  reduced={result['reduced']}"]
    for mode, data in result["modes"].items():
        if "skipped" in data:
            lines.append(f"[{mode}] skipped: {data['skipped']}")
            continue
        if "error" in data:
            lines.append(f"[{mode}] failed: {data['error'][:300]}")
        extra = "".join(f" ({what} {data[key]} s)" for what, key in (("compile", "compile_s"), ("capture", "capture_s"))
                        if key in data)
        renders = "  ".join(f"b{r['batch']}: {r['frames_per_s']:.0f}" for r in data.get("render", []))
        lines.append(f"[{mode}] frames/s per batch{extra}: {renders}")
        for run in data.get("pipeline", []):
            if "skipped" in run:
                lines.append(f"  {run['sessions']:>2} sessions: skipped ({run['skipped']})")
                continue
            lat = run["latency_ms"]
            lines.append(
                f"  {run['sessions']:>2} sessions: {run['fresh_fps_per_session']} fresh fps/session, "
                f"{run['rendered_frames_per_s']:.0f} rendered/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
                f"dropped {run['dropped_frames']}/{run['frames']}"
            )
    enc = result.get("encoder", {})
    if enc:
        lines.append(
            f"whisper encoder: offline {enc['offline_ms_per_audio_s']:.1f} ms per s of audio; streaming "
            f"{enc['stream_ms_per_audio_s_at_64_windows']:.1f} ms per s of audio (64 windows/forward)"
        )
    if result.get("peak_gpu_memory_GiB") is not None:
        lines.append(f"peak GPU memory: {result['peak_gpu_memory_GiB']:.2f} GiB")
    return "\n".join(lines)


COMPILE_RESERVE_S = 150.0  # compile + compiled model bench, kept for the compiled mode


def run(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The check; `save(result)` is called whenever a phase has added figures (so a run cut
    short by its caller's timeout still leaves what it measured)."""
    began = args.started_at or time.time()
    budget = Budget(args.budget_s, began)
    cuda = torch.cuda.is_available()
    reduced = args.reduced or not cuda
    if not cuda and not args.reduced:
        log.warning("no usable CUDA: running the reduced CPU mode (no GPU figures)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    started = time.perf_counter()
    models_dir = write_weights(work / "models", reduced)
    settings = Settings(
        backend="musetalk",
        home=work / "home",
        models_dir=models_dir,
        musetalk={"device": "cuda" if cuda else "cpu"},
        audio={"vad_model": args.vad_model},
        pipeline={
            "max_batch": 16,
            "sessions_per_replica": max(SESSIONS),
            "playout_delay_ms": 3000 if reduced else 300,  # CPU + tiny weights: give frames time
        },
    )
    prepare_avatar(settings)
    log.info("weights and avatar ready in %.1f s", time.perf_counter() - started)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batches = (1, 2) if reduced else BATCHES
    counts = (1, 2) if reduced else SESSIONS
    warmup, iters = (1, 1) if reduced else (3, 10)
    speech, source = load_speech(args.seconds + 10, args.speech)
    speech = speech[max(0, int(np.argmax(np.abs(speech) > 0.02)) - 1600) :]  # start at the speech
    from ray_lipsync.backends.musetalk.features import MuseTalkFeaturizer

    featurizer = MuseTalkFeaturizer(settings)
    result: dict[str, Any] = {
        "benchmark": "gpu_check",
        "commit": git_commit(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(featurizer.models.dtype),
        "reduced": reduced,
        "weights": "random, tiny (tests)" if reduced else "random, full size",
        "speech": source,
        "encoder_window_s": settings.musetalk.encoder_window_s,
        "lookahead_ms": settings.musetalk.lookahead_ms,
        "encoder": bench_encoder(featurizer.models, settings.musetalk.encoder_window_s, warmup, iters),
        "modes": {},
    }
    skipped: dict[str, str] = {}  # modes not run, and why
    if reduced:
        skipped["graphs"] = "reduced mode (CUDA graphs need CUDA)"
        if not args.compile_on_cpu:
            skipped["compile"] = "reduced mode (torch.compile on CPU takes about a minute per shape)"
    modes = [m for m in args.modes if m not in skipped]
    seconds = args.seconds
    for name in modes:
        mode_settings = with_mode(settings, name)
        if not budget.allows(30 if name == "compile" else 10):
            result["modes"][name] = {"skipped": f"out of time ({budget.left():.0f} s left)"}
            continue
        data = result["modes"][name] = {}
        try:
            data.update(bench_model(mode_settings, batches, warmup, iters))
            save(result)
            if name == modes[0]:  # one speech length for every pipeline run, so that all fit
                reserve = COMPILE_RESERVE_S if "compile" in modes else 0.0
                per_run = (budget.left() - reserve) / (len(counts) * len(modes))
                per_run -= 5 + settings.pipeline.playout_delay_ms / 1000
                seconds = float(min(args.seconds, max(args.min_seconds, math.floor(per_run))))
            data["pipeline"] = []
            pipeline_runs(name, mode_settings, counts, seconds, budget, speech, data["pipeline"], lambda: save(result))
        except Exception as error:  # noqa: BLE001 - one mode failing (a compiler, say) keeps the others' figures
            log.exception("%s mode failed", name)
            data["error"] = f"{type(error).__name__}: {error}"[:2000]
        save(result)
    result["modes"].update({m: {"skipped": skipped[m]} for m in args.modes if m in skipped})
    result["peak_gpu_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    result["wall_s"] = round(time.time() - began, 1)
    return result


def _modes(text: str) -> list[str]:
    modes = text.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall time for everything, from --started-at")
    parser.add_argument("--started-at", type=float, help="epoch seconds the check began (the shell script's start)")
    parser.add_argument("--seconds", type=float, default=12.0, help="speech per session and run (most)")
    parser.add_argument("--min-seconds", type=float, default=4.0, help="speech per session and run (least)")
    parser.add_argument("--reduced", action="store_true", help="tiny weights, few runs (automatic without CUDA)")
    parser.add_argument("--modes", default="eager,graphs,compile", type=_modes,
                        help="comma-separated, in order: eager (plain), graphs (musetalk.cuda_graphs), "
                        "compile (musetalk.compile); the first sizes the speech per run")
    parser.add_argument("--compile-on-cpu", action="store_true", help="in reduced mode, also run the compiled mode")
    parser.add_argument("--speech", type=Path, help="the speech that drives the sessions: an audio file "
                        "(default: ../shared/media/eng.wav, else offline TTS)")
    parser.add_argument("--vad-model", type=Path, help="a Silero VAD ONNX file (audio.vad_model), for machines "
                        "without faster-whisper")
    parser.add_argument("--workdir", type=Path, help="where weights and the avatar store go (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.reduced:
        args.seconds = min(args.seconds, 1.5)
        args.min_seconds = min(args.min_seconds, args.seconds)
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict[str, Any]) -> None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    result = run(args, save)
    save(result)
    sys.stdout.write(table(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
