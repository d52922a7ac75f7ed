"""End-to-end benchmark: N WebRTC clients (aiortc) for S seconds against a running service.

    python benchmarks/e2e.py http://127.0.0.1:8000 --sessions 4 --seconds 30 --json out.json
    python benchmarks/e2e.py --start --sessions 4 --seconds 30      # starts `ray-lipsync serve`

Each client creates a session, sends its offer, and once video arrives talks: offline-TTS
speech (ray_lipsync.tts) streamed in real time, either over the session's WebSocket
(/v1/sessions/{id}/stream, --source stream, the default; PCM16 pieces as a TTS sends them) or
as its WebRTC microphone track (--source mic), so the service sees a live talker. Measured per session: time to first frame (offer -> first decoded frame), received
fps, frames sent / dropped and per-frame latency p50 (GET /v1/sessions/{id}; p95 / p99 when
the status exposes them), the gateway's push-to-sent histogram quantiles (/metrics), and CPU
of the server process tree per session (/proc; with --start or --server-pid).
Target: 4 sessions at 25 fps with 0 dropped frames and p50 <= 150 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import subprocess
import tempfile
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray_lipsync.webrtc.client import PlaybackTrack, ReceiverClient  # noqa: E402

log = logging.getLogger("benchmarks.e2e")

DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog. Streaming avatars need steady frames "
                "and low latency, so every frame is timed by one clock.")
PIECE_S = 0.2  # the talker sends its speech in real-time pieces of this length


@dataclass
class SessionResult:
    session_id: str = ""
    time_to_first_frame_s: float | None = None
    received_fps: float | None = None
    frames_received: int = 0
    audio_received_s: float = 0.0
    speech_pushed_s: float = 0.0
    frames_sent: int | None = None
    frames_dropped: int | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    latency_ms_p99: float | None = None
    network: dict | None = None  # the session state's `network` at the end (bitrates, keyframes)
    errors: list[str] = field(default_factory=list)


def speech(text: str) -> np.ndarray:
    from ray_lipsync.tts import Synthesizer

    return Synthesizer().synthesize(text)


# -- server CPU (/proc) ----------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_by_process(root: int) -> dict[str, float]:
    """utime + stime (s) of `root` and its descendants now alive, by process title.

    Ray names its worker processes after what they run (`ray::ServeReplica:ray-lipsync:Gateway`,
    `ray::InferenceReplica...`), so the gateway's share can be told from the pipeline's. While
    an actor runs a method its title gains it (`ray::ServeController.listen_for_change`): the
    method is cut off, or two readings would count one process under two names.
    """
    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        name = title.split()[0].split(".")[0] if title.startswith("ray::") else Path(title.split()[0] if title else "?").name
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


def cpu_seconds(root: int) -> float:
    """utime + stime (s) of `root` and its descendants now alive."""
    return sum(cpu_by_process(root).values())


def gateway_cpu(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU seconds spent by the gateway replicas between two `cpu_by_process` readings."""
    return sum(after[k] - before.get(k, 0.0) for k in after if "Gateway" in k)


# -- latency quantiles from the Prometheus histogram -------------------------------------------


def histogram_quantiles(metrics_text: str, quantiles: tuple[float, ...]) -> dict[float, float | None]:
    """Quantiles of lipsync_frame_latency_ms (summed over replicas), linearly interpolated."""
    buckets: dict[float, float] = {}
    pattern = re.compile(r'^lipsync_frame_latency_ms_bucket\{[^}]*le="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)', re.M)
    for le, count in pattern.findall(metrics_text):
        bound = float("inf") if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + float(count)
    if not buckets:
        return {q: None for q in quantiles}
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    out: dict[float, float | None] = {}
    for q in quantiles:
        if total <= 0:
            out[q] = None
            continue
        target, prev_bound, prev_count = q * total, 0.0, 0.0
        for bound in bounds:
            if buckets[bound] >= target:
                if bound == float("inf"):
                    out[q] = prev_bound
                else:
                    span = buckets[bound] - prev_count
                    frac = (target - prev_count) / span if span else 1.0
                    out[q] = prev_bound + frac * (bound - prev_bound)
                break
            prev_bound, prev_count = bound, buckets[bound]
    return out


# -- one client ------------------------------------------------------------------------------


async def stream_speech(http: httpx.AsyncClient, result: SessionResult, token: str, samples: np.ndarray,
                        seconds: float) -> None:
    """The talker streams its speech over the session's WebSocket (PCM16 pieces), paced in real
    time, as a TTS would: each PIECE_S piece is sent when it is spoken, then a flush."""
    import websockets

    piece = max(1, int(PIECE_S * 16000))
    total = int(seconds * 16000)
    # the speech repeated to `seconds`, each piece cut when it is sent: a whole run's PCM made
    # at once (capacity.py's talkers stream for up to 600 s: ~150 MB of temporaries) stalled
    # this process's event loop, and with it every receiver here, each time a talker started
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    url = str(http.base_url).replace("http", "ws", 1).rstrip("/")
    async with websockets.connect(f"{url}/v1/sessions/{result.session_id}/stream?token={token}") as ws:
        start = time.monotonic()
        for i in range(0, total, piece):
            await asyncio.sleep(max(0.0, start + i / 16000 - 0.1 - time.monotonic()))
            chunk = pcm.take(np.arange(i, min(i + piece, total)), mode="wrap")
            await ws.send(chunk.tobytes())
            result.speech_pushed_s += len(chunk) / 16000
        await ws.send(json.dumps({"type": "flush"}))
        try:  # wait for the utterance to finish playing
            while json.loads(await asyncio.wait_for(ws.recv(), seconds + 30)).get("type") != "playback.finished":
                pass
        except (asyncio.TimeoutError, websockets.ConnectionClosed) as exc:
            result.errors.append(f"stream: {exc.__class__.__name__}")


async def run_client(http: httpx.AsyncClient, samples: np.ndarray, seconds: float, avatar: str,
                     source: str = "mic", lockstep: bool = False) -> SessionResult:
    result = SessionResult()
    try:
        created = (await http.post("/v1/sessions", json={"avatar": avatar})).raise_for_status().json()
    except Exception as exc:
        result.errors.append(f"create session: {exc.__class__.__name__}: {exc}")
        return result
    result.session_id = created["session_id"]
    headers = {"Authorization": f"Bearer {created['token']}"}
    mic = PlaybackTrack(samples, loop=True) if source == "mic" else None
    client = ReceiverClient(mic=mic, ice_servers=created.get("ice_servers") or [], keep_audio=False)
    try:
        offer = await client.offer()
        answer = (await http.post(f"/v1/sessions/{result.session_id}/offer", json=offer, headers=headers)
                  ).raise_for_status().json()
        await client.accept(answer)
        result.time_to_first_frame_s = await client.wait_first_video(timeout=30)
        if source == "mic":
            await asyncio.sleep(seconds)
            result.speech_pushed_s = seconds
        else:
            # talkers that start together send their pieces in the same instants, and one
            # dispatch round carries all of them; users' pieces fall at any phase
            if not lockstep:
                await asyncio.sleep(random.uniform(0.0, PIECE_S))
            await stream_speech(http, result, created["token"], samples, seconds)
        await asyncio.sleep(0.5)
        measured_from = client.first_video_at + 1.0  # past the start-up transient
        result.received_fps = round(client.received.fps(measured_from, time.monotonic()), 2)
        result.frames_received = client.received.video_frames
        rate = client.received.audio_rate or 48000
        result.audio_received_s = round(client.received.audio_samples / rate, 2)
        status = (await http.get(f"/v1/sessions/{result.session_id}", headers=headers)).raise_for_status().json()
        for key in ("frames_sent", "frames_dropped", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99"):
            setattr(result, key, status.get(key))
        result.network = status.get("network")
        await http.delete(f"/v1/sessions/{result.session_id}", headers=headers)
    except Exception as exc:  # one failing client must not hide the others' numbers
        result.errors.append(f"{exc.__class__.__name__}: {exc}")
    finally:
        await client.close()
    return result


# -- the run ---------------------------------------------------------------------------------


def start_server(port: int, extra: list[str], ray_cpus: float | None,
                 settings: dict | None = None) -> subprocess.Popen:
    """`ray-lipsync serve` with a local Ray; `ray_cpus` overrides its logical CPU count;
    `settings` (sections of the settings JSON) go in through `--config`."""
    config: list[str] = []
    if settings:
        path = Path(tempfile.mkdtemp()) / "settings.json"
        path.write_text(json.dumps(settings))
        config = ["--config", str(path)]
    cmd = [sys.executable, "-m", "serve_app", "-q", *config, "serve", "--port", str(port), *extra]
    env = dict(os.environ)
    if ray_cpus:
        env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": ray_cpus})
    log.info("starting %s", " ".join(cmd))
    return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, env=env)


async def warm_up(http: httpx.AsyncClient, avatar: str) -> float:
    """Create and close one session (places the pipeline actors, loads the avatar): seconds."""
    t = time.monotonic()
    created = (await http.post("/v1/sessions", json={"avatar": avatar})).raise_for_status().json()
    await http.delete(f"/v1/sessions/{created['session_id']}",
                      headers={"Authorization": f"Bearer {created['token']}"})
    return time.monotonic() - t


async def wait_healthy(http: httpx.AsyncClient, timeout: float, server: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if (await http.get("/healthz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the service at {http.base_url} was not healthy within {timeout:.0f} s")


async def benchmark(args: argparse.Namespace) -> dict:
    server = start_server(args.port, args.serve_arg, args.ray_cpus, args.settings) if args.start else None
    url = args.url or f"http://127.0.0.1:{args.port}"
    server_pid = server.pid if server else args.server_pid
    try:
        async with httpx.AsyncClient(base_url=url, timeout=args.startup_timeout) as http:
            await wait_healthy(http, args.startup_timeout, server)
            samples = await asyncio.to_thread(speech, args.text)
            warmup_s = await warm_up(http, args.avatar)
            procs0 = cpu_by_process(server_pid) if server_pid else {}
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(run_client(http, samples, args.seconds, args.avatar, args.source, args.lockstep)
                  for _ in range(args.sessions)))
            wall = time.monotonic() - t0
            procs1 = cpu_by_process(server_pid) if server_pid else {}
            cpu = (sum(procs1.values()) - sum(procs0.values())) if server_pid else None
            gw_cpu = gateway_cpu(procs0, procs1) if server_pid else None
            metrics = (await http.get("/metrics")).text
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    q = histogram_quantiles(metrics, (0.5, 0.95, 0.99))
    ok = [r for r in results if not r.errors]
    p50s = [r.latency_ms_p50 for r in ok if r.latency_ms_p50 is not None]
    summary = {
        "url": url,
        "sessions": args.sessions,
        "settings": args.settings,
        "source": args.source,
        "seconds": args.seconds,
        "lockstep": args.lockstep,
        "sessions_ok": len(ok),
        "warmup_session_create_s": round(warmup_s, 2),
        "time_to_first_frame_s_max": max((r.time_to_first_frame_s or 0 for r in ok), default=None),
        "received_fps_min": min((r.received_fps or 0 for r in ok), default=None),
        "frames_dropped_total": sum(r.frames_dropped or 0 for r in ok),
        "latency_ms_p50_max": max(p50s) if p50s else None,
        "latency_ms_p95_max": max((r.latency_ms_p95 for r in ok if r.latency_ms_p95 is not None), default=None),
        "latency_ms_p99_max": max((r.latency_ms_p99 for r in ok if r.latency_ms_p99 is not None), default=None),
        # /metrics histogram: audio *pushed* -> frame sent, so it includes how far ahead of
        # playback the speech was pushed and the playout delay (not the per-frame compute latency)
        "gateway_push_to_sent_ms": {"p50": q[0.5], "p95": q[0.95], "p99": q[0.99]},
        "server_cpu_percent_per_session": round(100 * cpu / wall / args.sessions, 1) if cpu is not None else None,
        "gateway_cpu_percent_per_session": round(100 * gw_cpu / wall / args.sessions, 1) if gw_cpu is not None else None,
        "cpu_percent_by_process": {k: round(100 * (procs1[k] - procs0.get(k, 0.0)) / wall, 1)
                                   for k in sorted(procs1)} if server_pid else None,
    }
    summary["target_met"] = bool(
        len(ok) == args.sessions
        and summary["received_fps_min"] is not None and abs(summary["received_fps_min"] - 25) <= 1
        and summary["frames_dropped_total"] == 0
        and summary["latency_ms_p50_max"] is not None and summary["latency_ms_p50_max"] <= 150
    )
    return {"summary": summary, "sessions": [asdict(r) for r in results]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", help="service URL (default http://127.0.0.1:<port>)")
    parser.add_argument("--start", action="store_true", help="start `ray-lipsync serve` for the run")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument for serve (repeat)")
    parser.add_argument("--ray-cpus", type=float, default=4.0,
                        help="with --start: logical CPUs of the local Ray (the gateway and the pipeline "
                             "actors reserve more than 2; 0 = Ray's default)")
    parser.add_argument("--server-pid", type=int, help="PID of a running server, for CPU accounting")
    parser.add_argument("--settings", type=json.loads,
                        help='settings sections for --start, as JSON (e.g. \'{"pipeline": {"dispatch_tick_ms": 80}}\')')
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--source", choices=["mic", "stream"], default="stream",
                        help="speech from each client's WebRTC microphone track, or streamed over "
                        "the session's WebSocket paced in real time")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--lockstep", action="store_true", help="--source stream: every talker sends its "
                        "pieces at the same instants (by default each starts at a random phase, as users do)")
    parser.add_argument("--avatar", default="default")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--json", type=Path, help="write the result as JSON here ('-' = stdout)")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0:
        parser.error("--sessions must be >= 1 and --seconds > 0")
    if args.url and args.start:
        parser.error("give a URL or --start, not both")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    result = asyncio.run(benchmark(args))
    text = json.dumps(result, indent=2)
    if args.json and str(args.json) != "-":
        args.json.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0 if result["summary"]["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
