"""CPU cost of a session's egress: one recording / restream, and each extra target.

The frames are made first (not measured): the default avatar (512x512) talking through the
procedural backend, and a 704x1216 video avatar (../shared/media/yongen.mp4 when present,
else a synthetic 704x1216 frame source with a moving patch), with speech
(../shared/media/eng.wav or offline TTS). Then, per case, the service's own egress code runs
over them as fast as it can: `AvEncoder` (the shared H.264 + AAC encode) and `PacketSink`s
(the outputs, each muxing in its own thread): a recording (MP4 file), a restream (FLV to a
local nginx-rtmp, when installed), and a recording plus two restream targets (one encode,
three outputs). Measured: process CPU time (all threads) per second of media, i.e. the
share of one core an output costs a session; `ROUNDS` runs, median and worst. nginx's own
CPU (the receiver) is not counted.

    .venv/bin/python benchmarks/egress.py [--json benchmarks/results/egress.json] [--seconds 10]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.latency import load_speech  # noqa: E402
from benchmarks.output import git_commit, write_json  # noqa: E402
from benchmarks.vp8 import talking_frames  # noqa: E402
from ray_lipsync.clock import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402
from ray_lipsync.config import Settings  # noqa: E402
from ray_lipsync.egress.encoder import AvEncoder  # noqa: E402
from ray_lipsync.egress.outputs import encoder_settings  # noqa: E402
from ray_lipsync.egress.sink import PacketSink  # noqa: E402
from ray_lipsync.types import OutputFrame  # noqa: E402

log = logging.getLogger("benchmarks.egress")
ROUNDS = 5
VIDEO_AVATAR = ROOT.parent / "shared" / "media" / "yongen.mp4"


def video_avatar_frames(n: int) -> tuple[np.ndarray, str]:
    """`n` 704x1216 frames: the video avatar's (looped) or a synthetic source."""
    if VIDEO_AVATAR.exists():
        with av.open(str(VIDEO_AVATAR)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        return np.stack((frames * (n // len(frames) + 1))[:n]), VIDEO_AVATAR.name
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1216, 704, 3), dtype=np.uint8)
    out = np.repeat(base[None], n, axis=0)
    for k in range(n):  # a mouth-sized patch that changes every frame
        out[k, 700:800, 300:420] = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    return out, "synthetic 704x1216"


def output_frames(images: np.ndarray, audio: np.ndarray) -> list[OutputFrame]:
    frames = []
    for k, image in enumerate(images):
        chunk = audio[k * SAMPLES_PER_FRAME:(k + 1) * SAMPLES_PER_FRAME]
        frames.append(OutputFrame("bench", 0, k, image, chunk, 3600 * k, k / FPS))
    return frames


def run_case(frames: list[OutputFrame], outputs: list[str], settings: Settings, folder: Path,
             rtmp_url: str | None) -> float:
    """Encode `frames` once and mux them into `outputs`; CPU seconds per second of media."""
    height, width = frames[0].image.shape[:2]
    started = time.process_time()
    encoder = AvEncoder(width, height, encoder_settings(settings))
    sinks = []
    for i, kind in enumerate(outputs):
        if kind == "recording":
            path = folder / f"out{i}.mp4"
            opener = lambda path=path: av.open(str(path), "w", format="mp4")  # noqa: E731
        else:
            opener = lambda i=i: av.open(f"{rtmp_url}{i}", "w", format="flv")  # noqa: E731
        sink = PacketSink(kind, opener, lambda: (encoder.video_template, encoder.audio_template),
                          request_keyframe=encoder.request_keyframe, on_state=lambda s: None,
                          retry=False, queue_packets=len(frames) * 4)
        sink.start()
        sinks.append(sink)
    time.sleep(0.5)  # each output connects and writes its header (loopback: milliseconds)
    for frame in frames:
        packets = encoder.encode(frame)
        for sink in sinks:
            sink.put(packets)
    for sink in sinks:
        sink.stop(timeout=30)
        if sink.status.packets_dropped or sink.status.state == "failed":
            raise RuntimeError(f"{sink.name}: {sink.status}")
    encoder.close()
    return (time.process_time() - started) / (len(frames) / FPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings()
    n = int(args.seconds * FPS)
    audio = load_speech(args.seconds + 1)[0][: n * SAMPLES_PER_FRAME]
    sources = {"512x512": (talking_frames(n), "default avatar (procedural, talking)")}
    sources["704x1216"] = video_avatar_frames(n)
    server = None
    try:
        from helpers import free_port
        from rtmp_server import rtmp_server

        server_context = rtmp_server(free_port())
        server = server_context.__enter__()
    except BaseException as error:  # noqa: BLE001 - pytest.skip when nginx-rtmp is missing
        log.warning("no nginx-rtmp (%s); restream cases left out", error)
    cases = {"recording": ["recording"]}
    if server is not None:
        cases.update({"restream": ["restream"], "recording+2 restreams": ["recording", "restream", "restream"]})
    results = []
    try:
        for size, (images, source) in sources.items():
            frames = output_frames(images, audio)
            for case, outputs in cases.items():
                cores = []
                for _ in range(ROUNDS):
                    with tempfile.TemporaryDirectory() as folder:
                        url = server.url("bench") if server is not None else None
                        cores.append(run_case(frames, outputs, settings, Path(folder), url))
                row = {"size": size, "source": source, "case": case, "outputs": len(outputs),
                       "cores_median": round(statistics.median(cores), 4), "cores_worst": round(max(cores), 4),
                       "runs": [round(c, 4) for c in cores]}
                log.info("%s %-22s median %.3f cores, worst %.3f", size, case, row["cores_median"], row["cores_worst"])
                results.append(row)
    finally:
        if server is not None:
            server_context.__exit__(None, None, None)
    write_json(args.json, {
        "what": "process CPU seconds (all threads) per second of media of the egress: one shared "
                "H.264+AAC encode muxed into each output", "commit": git_commit(),
        "seconds_per_run": args.seconds, "rounds": ROUNDS,
        "encoder": {"preset": settings.egress.preset, "video_bitrate": settings.egress.video_bitrate,
                    "audio": f"AAC 48 kHz mono {settings.egress.audio_bitrate} bit/s",
                    "threads": 1},
        "results": results})


if __name__ == "__main__":
    main()
