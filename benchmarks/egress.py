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

WHEP viewers: the real service (HTTP API, in-process gateway, procedural backend) serves one
session that speaks without pause (speech looped); 1, 2 and 4 aiortc WHEP viewers watch it
from a child process (their decoding is not counted). The service process's CPU per second
with N viewers, minus with 1, over N - 1: what each extra viewer costs (packetizing,
encryption, sending, RTCP; the encode is shared). `WHEP_ROUNDS` runs, median and worst.

    .venv/bin/python benchmarks/egress.py [--json benchmarks/results/egress.json] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
from ray_lipsync.egress.sink import FileOutput, PacketSink, RelayOutput  # noqa: E402
from ray_lipsync.types import OutputFrame  # noqa: E402

log = logging.getLogger("benchmarks.egress")
ROUNDS = 5
WHEP_ROUNDS = 3
WHEP_VIEWERS = (1, 2, 4)
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
    started = cpu_time()
    encoder = AvEncoder(width, height, encoder_settings(settings))
    sinks = []
    for i, kind in enumerate(outputs):
        output = (FileOutput(str(folder / f"out{i}.mp4")) if kind == "recording"
                  else RelayOutput("flv", f"{rtmp_url}{i}"))
        sink = PacketSink(kind, output, lambda: (encoder.video_template, encoder.audio_template),
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
    return (cpu_time() - started) / (len(frames) / FPS)


def cpu_time() -> float:
    """CPU seconds of this process (all threads) and of its finished children (the relays)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


async def watch(url: str, sid: str, token: str, viewers: int, seconds: float) -> None:
    """(child process) `viewers` WHEP viewers of the session for `seconds`."""
    import httpx

    from ray_lipsync.webrtc.client import ReceiverClient

    clients, locations = [], []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        auth = {"Authorization": f"Bearer {token}"}
        for _ in range(viewers):
            client = ReceiverClient(ice_servers=[], keep_audio=False)
            r = await http.post(f"/v1/sessions/{sid}/whep", content=(await client.offer())["sdp"],
                                headers={**auth, "Content-Type": "application/sdp"})
            r.raise_for_status()
            await client.accept({"sdp": r.text, "type": "answer"})
            await client.wait_first_video(timeout=10)
            clients.append(client)
            locations.append(r.headers["location"])
        print("watching", flush=True)
        await asyncio.sleep(seconds)
        for client, location in zip(clients, locations):
            await http.delete(location, headers=auth)
            await client.close()


def whep_costs(seconds: float) -> dict:
    """Service CPU (cores) with 1, 2, 4 WHEP viewers of one talking session; per extra viewer."""
    import subprocess

    import httpx

    from helpers import free_port
    from local_service import serve_app

    settings = Settings(home=Path(tempfile.mkdtemp(prefix="egress-bench-")),
                        serve={"admission": {"enabled": False}}, pipeline={"audio_buffer_s": 300})
    voice = load_speech(60)[0]
    from speech import to_wav_bytes

    wav = to_wav_bytes(np.tile(voice[: 60 * SAMPLE_RATE], 4))  # speech all along the measurement
    by_viewers: dict[int, list[float]] = {n: [] for n in WHEP_VIEWERS}
    with serve_app(settings, free_port()) as url, httpx.Client(base_url=url, timeout=30) as http:
        created = http.post("/v1/sessions", json={}).json()
        sid, token = created["session_id"], created["token"]
        auth = {"Authorization": f"Bearer {token}"}
        r = http.post(f"/v1/sessions/{sid}/audio", content=wav, headers={**auth, "Content-Type": "audio/wav"})
        if r.status_code != 202:
            raise RuntimeError(f"the speech was refused: {r.text}")
        for _ in range(WHEP_ROUNDS):
            for n in WHEP_VIEWERS:
                child = subprocess.Popen([sys.executable, __file__, "--watch", url, sid, token, str(n), str(seconds + 2)],
                                         stdout=subprocess.PIPE, text=True)
                assert child.stdout is not None
                if child.stdout.readline().strip() != "watching":
                    raise RuntimeError("the WHEP viewers did not start")
                time.sleep(1.0)  # settle
                cpu, wall = time.process_time(), time.monotonic()
                time.sleep(seconds)
                by_viewers[n].append((time.process_time() - cpu) / (time.monotonic() - wall))
                child.wait(60)
                log.info("WHEP %d viewer(s): %.3f cores", n, by_viewers[n][-1])
        http.delete(f"/v1/sessions/{sid}", headers=auth)
    extra = [(by_viewers[WHEP_VIEWERS[-1]][i] - by_viewers[1][i]) / (WHEP_VIEWERS[-1] - 1) for i in range(WHEP_ROUNDS)]
    return {"service_cores": {str(n): [round(c, 4) for c in v] for n, v in by_viewers.items()},
            "per_extra_viewer_cores_median": round(statistics.median(extra), 4),
            "per_extra_viewer_cores_worst": round(max(extra), 4),
            "one_viewer_cores_median": round(statistics.median(by_viewers[1]), 4)}


def output_costs(seconds: float, settings: Settings) -> list[dict]:
    """CPU (cores) of a recording, a restream, a recording + 2 restreams, at both sizes."""
    n = int(seconds * FPS)
    audio = load_speech(seconds + 1)[0][: n * SAMPLES_PER_FRAME]
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
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--watch", nargs=5, metavar=("URL", "SID", "TOKEN", "VIEWERS", "SECONDS"),
                        help=argparse.SUPPRESS)  # the child process of the WHEP case
    parser.add_argument("--only", choices=("outputs", "whep"), default=None)
    args = parser.parse_args()
    if args.watch:
        url, sid, token, viewers, seconds = args.watch
        asyncio.run(watch(url, sid, token, int(viewers), float(seconds)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("aioice", "aiortc", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings()
    results = output_costs(args.seconds, settings) if args.only in (None, "outputs") else []
    # after the outputs: the service it starts leaves threads behind that would count there
    whep = whep_costs(args.seconds) if args.only in (None, "whep") else None
    write_json(args.json, {
        "what": "process CPU seconds (all threads) per second of media of the egress: one shared "
                "H.264+AAC encode muxed into each output", "commit": git_commit(),
        "seconds_per_run": args.seconds, "rounds": ROUNDS,
        "encoder": {"preset": settings.egress.preset, "video_bitrate": settings.egress.video_bitrate,
                    "audio": f"AAC 48 kHz mono {settings.egress.audio_bitrate} bit/s",
                    "threads": 1},
        "results": results, "whep": whep})


if __name__ == "__main__":
    main()
