"""A talking session watched in headless Chromium through emulated bad links.

The viewer (benchmarks/network_viewer.py: Debian's chromium through playwright, the service's
own page) runs in a network namespace joined to this one by an `EmulatedLink`
(tests/emulated_link.py): kernel tbf for the rate, a relay for loss and jitter (this kernel has
no netem). Each case is a fresh session that speaks for `--seconds`; the link is shaped server
-> client:

- `300kbit`: 300 kbit/s (tbf, 300 ms queue);
- `1mbit_2pct`: 1 Mbit/s with 2 % random loss;
- `jitter`: 80 ms +- 30 ms delay, no rate limit;
- `step`: 600 kbit/s, halved to 300 kbit/s after `--step-at` seconds (time to adapt).

Per case (after the first `SETTLE_S` of speech): video fps shown, the longest gap between shown
frames, Chromium's freezeCount / totalFreezesDuration, concealed audio (concealedSamples /
totalSamplesReceived), the A/V offset as Chromium plays it (audio minus video
estimatedPlayoutTimestamp: positive = sound late against the picture), the encoder's bitrate
at the end (the server's `network.encoder_bps`), NACKs/PLIs, and for `step` the seconds from the
step until the encoder runs at or below 90 % of the new rate.

    python benchmarks/network.py --start --json benchmarks/results/network.json   # ray-lipsync serve
    python benchmarks/network.py --cases 300kbit --repeats 3                        # in-process service
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from emulated_link import EmulatedLink, unavailable  # noqa: E402
from speech import RATE, speech, to_wav_bytes  # noqa: E402  (tests/speech.py)
from output import git_commit, write_json  # noqa: E402

log = logging.getLogger("benchmarks.network")
SETTLE_S = 3.0  # the first seconds of speech are not judged (the link estimate converges)
CASES = {
    "300kbit": {"rate_kbit": 300},
    "1mbit_2pct": {"rate_kbit": 1000, "loss": 0.02},
    "jitter": {"delay_ms": 80, "jitter_ms": 30},
    "step": {"rate_kbit": 600},
}
STEP_TO = {"rate_kbit": 300}
MAX_SPEECH_S = 25  # one upload under the API's size limit
PHRASE = "The quick brown fox jumps over the lazy dog, and then it runs away again into the woods."


def speech_wav(seconds: float) -> bytes:
    """`seconds` of continuous TTS speech, 16 kHz mono WAV."""
    phrase = speech(PHRASE)
    return to_wav_bytes(np.tile(phrase, int(np.ceil(seconds * RATE / len(phrase))))[: int(seconds * RATE)])


def run_viewer(link: EmulatedLink, url: str, wav: Path, seconds: float,
               step: tuple[float, dict] | None = None) -> dict:
    """The viewer in the client host; `step` = (seconds after the speech was posted, new shape)
    is applied while it runs. Returns its JSON (or {"failed": reason})."""
    cmd = link.command([sys.executable, str(ROOT / "benchmarks" / "network_viewer.py"), "--url", url,
                        "--wav", str(wav), "--seconds", str(seconds)])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    timer: threading.Timer | None = None
    stepped: list[float] = []

    def apply_step() -> None:
        link.shape(**step[1])
        stepped.append(time.time())

    for line in proc.stderr:  # until the viewer says it started speaking (or ends)
        err.append(line)
        if line.strip() == "speaking":
            if step is not None:
                timer = threading.Timer(step[0], apply_step)
                timer.start()
            break
    try:
        out, rest = proc.communicate(timeout=seconds + 120)
    finally:
        if timer is not None:
            timer.cancel()
    err.append(rest)
    if proc.returncode != 0:
        lines = "".join(err).strip().splitlines()
        return {"failed": lines[-1] if lines else f"exit {proc.returncode}"}
    result = json.loads(out)
    if stepped:  # on the page's clock (the same machine's wall clock)
        result["step_at"] = 1000 * stepped[0] - result["time_origin"]
    return result


def _delta(samples: list[dict], kind: str, key: str) -> float:
    values = [s[kind][key] for s in samples if s.get(kind) and key in s[kind]]
    return float(values[-1] - values[0]) if len(values) >= 2 else 0.0


def analyse(raw: dict, step_at_ms: float | None = None, step_rate_kbit: int | None = None) -> dict:
    """The figures of one viewer run (see the module docstring)."""
    if "failed" in raw:
        return {"failed": raw["failed"]}
    start = raw["speech_at"] + 1000 * SETTLE_S
    samples = [s for s in raw["samples"] if s["t"] >= start]
    frames = [t for t in raw["frames"] if t >= start]
    span_s = (samples[-1]["t"] - samples[0]["t"]) / 1000 if len(samples) >= 2 else 0.0
    gaps = np.diff(frames) if len(frames) >= 2 else np.array([float("inf")])
    per_s = [sum(1 for t in frames if a <= t < a + 1000) for a in np.arange(start, start + 1000 * int(span_s), 1000)]
    offsets = [s["audio"]["estimatedPlayoutTimestamp"] - s["video"]["estimatedPlayoutTimestamp"]
               for s in samples if s.get("audio") and s.get("video")
               and s["audio"].get("estimatedPlayoutTimestamp") and s["video"].get("estimatedPlayoutTimestamp")]
    received = _delta(samples, "audio", "totalSamplesReceived")
    servers = [s["server"] for s in raw["samples"] if s.get("server")]
    late = [s["server"] for s in samples if s.get("server")]
    result = {
        "seconds_judged": round(span_s, 1),
        "fps": round(len(frames) / span_s, 1) if span_s else 0.0,
        "fps_min_1s": min(per_s) if per_s else 0,
        "longest_gap_ms": round(float(gaps.max()), 1),
        "freeze_count": int(_delta(samples, "video", "freezeCount")),
        "freezes_s": round(_delta(samples, "video", "totalFreezesDuration"), 3),
        "concealed_audio_pct": round(100 * _delta(samples, "audio", "concealedSamples") / received, 3) if received else None,
        "concealment_events": int(_delta(samples, "audio", "concealmentEvents")),
        "av_offset_ms_p50": round(float(np.median(offsets)), 1) if offsets else None,
        "av_offset_ms_max_abs": round(float(np.max(np.abs(offsets))), 1) if offsets else None,
        "video_kbit_s_received": round(8 * _delta(samples, "video", "bytesReceived") / span_s / 1000, 1) if span_s else None,
        "nacks": int(_delta(samples, "video", "nackCount")),
        "plis": int(_delta(samples, "video", "pliCount")),
        "fec_packets": int(_delta(samples, "audio", "fecPacketsReceived")),
        "encoder_kbit_s_end": round(late[-1]["encoder_bps"] / 1000) if late else None,
        "remb_kbit_s_end": round(late[-1]["remb_bps"] / 1000) if late and late[-1].get("remb_bps") else None,
        "keyframes": servers[-1]["keyframes"] if servers else None,
        "first_frame_ms": round(raw["frames"][0] - raw["speech_at"], 1) if raw["frames"] else None,
        "errors": raw.get("errors", []),
    }
    if step_at_ms is not None and step_rate_kbit is not None:
        after = [s for s in raw["samples"] if s["t"] >= step_at_ms and s.get("server")]
        adapted = next((s["t"] for s in after if s["server"]["encoder_bps"] <= 0.9 * step_rate_kbit * 1000), None)
        result["adapt_s"] = None if adapted is None else round((adapted - step_at_ms) / 1000, 2)
        frames_after = [t for t in raw["frames"] if t >= step_at_ms]
        result["longest_gap_after_step_ms"] = round(float(np.diff(frames_after).max()), 1) if len(frames_after) > 2 else None
    return result


@contextlib.contextmanager
def service(args: argparse.Namespace, host: str) -> Iterator[str]:
    """`ray-lipsync serve` (--start) or the API over LocalPipeline in this process."""
    if args.start:
        import asyncio

        import httpx
        from e2e import start_server, wait_healthy  # benchmarks/e2e.py

        server = start_server(args.port, ["--host", "0.0.0.0"], None)
        try:
            async def healthy() -> None:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", timeout=5) as http:
                    await wait_healthy(http, 180, server)

            asyncio.run(healthy())
            yield f"http://{host}:{args.port}"
        finally:
            server.terminate()
            server.wait(60)
        return
    from local_service import serve_app  # tests/local_service.py

    from ray_lipsync.config import Settings

    with tempfile.TemporaryDirectory() as home, serve_app(Settings(home=Path(home)), args.port, host="0.0.0.0"):
        yield f"http://{host}:{args.port}"


def run(args: argparse.Namespace) -> dict:
    reason = unavailable()
    if reason:
        raise SystemExit(f"cannot emulate links here: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        wav.write_bytes(speech_wav(min(args.seconds + 4, MAX_SPEECH_S)))
        results: dict[str, list[dict]] = {}
        with EmulatedLink() as link, service(args, link.server_ip) as url:
            for name in args.cases:
                for _ in range(args.repeats):
                    link.shape(**CASES[name])
                    step = (args.step_at, STEP_TO) if name == "step" else None
                    raw = run_viewer(link, url, wav, args.seconds, step)
                    step_at = raw.get("step_at")
                    figures = analyse(raw, step_at, STEP_TO["rate_kbit"] if step else None)
                    log.info("%s: %s", name, figures)
                    if args.raw:
                        figures["raw"] = raw
                    results.setdefault(name, []).append(figures)
    return {"config": {"seconds": args.seconds, "repeats": args.repeats, "start": args.start,
                       "cases": {n: CASES[n] for n in args.cases}, "step_to": STEP_TO, "settle_s": SETTLE_S,
                       "commit": git_commit()},
            "cases": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--step-at", type=float, default=12.0, help="step: seconds after the speech starts")
    parser.add_argument("--start", action="store_true", help="measure `ray-lipsync serve` (else in-process)")
    parser.add_argument("--port", type=int, default=18600)
    parser.add_argument("--json", default=None)
    parser.add_argument("--raw", action="store_true", help="keep each viewer's samples in the JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = run(args)
    print(json.dumps(result["cases"], indent=2))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
