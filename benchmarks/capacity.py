"""Capacity: sessions are added one at a time to `ray-lipsync serve` until it answers 503, and
every admitted session's fps and drops are watched the whole time.

    python benchmarks/capacity.py --start --talking all --json benchmarks/results/capacity_all.json
    python benchmarks/capacity.py --start --talking quarter --json benchmarks/results/capacity_quarter.json

Every `--interval-s` a new client (aiortc, on this machine) asks for a session. Admitted, it
connects and, if it is a talker (`all`: every session; `quarter`: sessions 1, 5, 9, ...),
streams TTS speech over the session's WebSocket in real time until the run ends; the others
stay silent (with --start, `serve.admission.talking_share` is set to match: 1 or 0.25).
Refused (503), the client waits its Retry-After and asks again; after
`--refusals` refusals in a row no more sessions are added and the run holds `--hold-s` more
seconds. Every 2 s each session's fps and its server state (frames sent, visible drops) are
sampled. The fps is the frames its client decoded plus the frames the server left out because
they repeated a still picture the viewer was showing (`network.frames_left_out`,
`webrtc.still_fps`); the received fps alone is reported too; a session is judged from 2 s after its first
frame to the end, so the arrival of every later session counts against it.

Reported: sessions admitted, refusals (status, Retry-After), any 5xx other than 503, per
session the lowest 2 s fps and its dropped share, whether every session held >= 24 fps and
<= 1 % drops throughout, the server process tree's CPU (cores) with no session, and per
session at the end, and this process's own CPU (the clients) separately.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from output import git_commit, machine_speed, write_json  # noqa: E402
from e2e import DEFAULT_TEXT, SessionResult, cpu_seconds, speech, stream_speech, wait_healthy  # noqa: E402

from ray_lipsync.webrtc.client import ReceiverClient  # noqa: E402

log = logging.getLogger("benchmarks.capacity")
SAMPLE_S = 2.0
JUDGE_AFTER_S = 2.0


@dataclass
class Watched:
    index: int
    session_id: str
    talker: bool
    admitted_at: float
    first_frame_at: float | None = None
    fps: list[tuple[float, float]] = field(default_factory=list)  # (time, fps shown over the last 2 s)
    received_fps: list[tuple[float, float]] = field(default_factory=list)  # (time, decoded fps)
    left_out: tuple[float, int] | None = None  # (time, frames left out so far) at the last sample
    state: list[tuple[float, int, int]] = field(default_factory=list)  # (time, sent, dropped)
    errors: list[str] = field(default_factory=list)
    closed_by_server: str | None = None  # e.g. shed under overload
    arrivals: list[float] = field(default_factory=list)  # monotonic times its video frames arrived

    def judged(self, end: float) -> dict:
        start = (self.first_frame_at or end) + JUDGE_AFTER_S
        windows = [(t, f) for t, f in self.fps if start + SAMPLE_S <= t <= end]
        fps = [f for _, f in windows]
        received = [f for t, f in self.received_fps if start + SAMPLE_S <= t <= end]
        states = [(t, s, d) for t, s, d in self.state if t >= start]
        span = [t for t in self.arrivals if start <= t <= end] if self.talker else []
        sent = states[-1][1] - states[0][1] if len(states) >= 2 else 0
        dropped = states[-1][2] - states[0][2] if len(states) >= 2 else 0
        return {"index": self.index, "talker": self.talker, "fps_min_2s": min(fps) if fps else None,
                "fps_median": round(float(np.median(fps)), 1) if fps else None,
                "received_fps_min_2s": min(received) if received else None,
                "received_fps_median": round(float(np.median(received)), 1) if received else None,
                "fps_2s": [(round(t - start, 1), round(f, 1)) for t, f in windows],
                # a talker's frames all go out (a dropped one is replaced): gaps are stalls
                "max_frame_gap_ms": round(1000 * max(np.diff(span)), 1) if len(span) > 1 else None,
                "frames_sent": sent, "dropped_pct": round(100 * dropped / sent, 2) if sent else None,
                "closed_by_server": self.closed_by_server, "errors": self.errors}


async def watch_session(http: httpx.AsyncClient, w: Watched, token: str, samples: np.ndarray,
                        stop: asyncio.Event, run_s: float) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    client = ReceiverClient(keep_audio=False)
    talk: asyncio.Task | None = None
    try:
        offer = await client.offer()
        answer = (await http.post(f"/v1/sessions/{w.session_id}/offer", json=offer, headers=headers)
                  ).raise_for_status().json()
        await client.accept(answer)
        await client.wait_first_video(timeout=60)
        w.first_frame_at = time.monotonic()
        if w.talker:
            result = SessionResult(session_id=w.session_id)
            talk = asyncio.ensure_future(stream_speech(http, result, token, samples, run_s))
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_S)
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            response = await http.get(f"/v1/sessions/{w.session_id}", headers=headers)
            if response.status_code != 200:  # closed by the server (shed): judged until then
                w.closed_by_server = f"HTTP {response.status_code} at {now - w.admitted_at:.0f} s"
                break
            state = response.json()
            received = client.received.fps(now - SAMPLE_S, now)
            left_out = (state.get("network") or {}).get("frames_left_out", 0)
            if w.left_out is not None:
                w.received_fps.append((now, received))
                w.fps.append((now, received + (left_out - w.left_out[1]) / (now - w.left_out[0])))
            w.left_out = (now, left_out)
            w.state.append((now, state["frames_sent"], state["frames_dropped"]))
    except Exception as exc:  # noqa: BLE001 - one failing client must not hide the others
        w.errors.append(f"{exc.__class__.__name__}: {exc}")
    finally:
        if talk is not None:
            talk.cancel()
        w.arrivals = list(client.received.video_times)
        await client.close()
        await http.delete(f"/v1/sessions/{w.session_id}", headers=headers)


def start_server(args: argparse.Namespace, config: Path) -> subprocess.Popen:
    """`ray-lipsync serve` with `serve.admission.talking_share` set as the run assumes."""
    admission = {"talking_share": args.talking_share}
    if args.cpu_target is not None:
        admission["cpu_target"] = args.cpu_target
    config.write_text(json.dumps({"serve": {"admission": admission}}))
    cmd = [sys.executable, "-m", "serve_app", "-q", "--config", str(config), "serve", "--port", str(args.port)]
    return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)


async def benchmark(args: argparse.Namespace) -> dict:
    server = start_server(args, Path(tempfile.mkdtemp()) / "settings.json") if args.start else None
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            await wait_healthy(http, 180, server)
            samples = speech(DEFAULT_TEXT)
            base_cpu = None
            if server is not None:  # the server with no session, over 5 s
                before = cpu_seconds(server.pid)
                await asyncio.sleep(5)
                base_cpu = (cpu_seconds(server.pid) - before) / 5
            stop = asyncio.Event()
            watched: list[Watched] = []
            tasks: list[asyncio.Task] = []
            refusals: list[dict] = []
            server_errors: list[int] = []
            in_a_row = 0
            run_started = time.monotonic()
            while in_a_row < args.refusals and len(watched) < args.max_sessions:
                response = await http.post("/v1/sessions", json={"avatar": args.avatar})
                if response.status_code == 201:
                    in_a_row = 0
                    created = response.json()
                    index = len(watched)
                    talker = args.talking == "all" or index % 4 == 0
                    w = Watched(index, created["session_id"], talker, time.monotonic())
                    watched.append(w)
                    tasks.append(asyncio.ensure_future(watch_session(
                        http, w, created["token"], samples, stop, args.max_run_s)))
                    log.info("session %d admitted (%s)", index + 1, "talking" if talker else "silent")
                    await asyncio.sleep(args.interval_s)
                    continue
                if response.status_code >= 500 and response.status_code != 503:
                    server_errors.append(response.status_code)
                retry = float(response.headers.get("Retry-After", "5"))
                refusals.append({"after_sessions": len(watched), "status": response.status_code, "retry_after_s": retry,
                                 "detail": response.json().get("detail") if response.content else None})
                log.info("refused after %d sessions: %s", len(watched), refusals[-1]["detail"])
                in_a_row += 1
                await asyncio.sleep(retry)
            cpu_from = (cpu_seconds(server.pid) if server else None, time.process_time(), time.monotonic())
            await asyncio.sleep(args.hold_s)
            hold = time.monotonic() - cpu_from[2]
            server_cpu = (cpu_seconds(server.pid) - cpu_from[0]) / hold if server else None
            client_cpu = (time.process_time() - cpu_from[1]) / hold
            end = time.monotonic()
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    sessions = [w.judged(end) for w in watched]
    held = all(s["fps_min_2s"] is not None and s["fps_min_2s"] >= 24 and (s["dropped_pct"] or 0) <= 1
               and s["closed_by_server"] is None for s in sessions)
    n = len(watched)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "admitted": n, "talking": sum(w.talker for w in watched), "refusals": refusals,
        "server_errors_5xx": server_errors, "every_session_held_24fps_1pct": held,
        "server_cpu_cores_idle_service": None if base_cpu is None else round(base_cpu, 3),
        "server_cpu_cores_at_end": None if server_cpu is None else round(server_cpu, 3),
        "server_cpu_cores_per_session": None if server_cpu is None or not n
        else round((server_cpu - (base_cpu or 0)) / n, 3),
        "client_cpu_cores": round(client_cpu, 3),
        "run_s": round(end - run_started, 1),
        "sessions": sessions,
        "raw": [asdict(w) for w in watched] if args.raw else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", nargs="?", default=None)
    parser.add_argument("--start", action="store_true", help="start `ray-lipsync serve` for the run")
    parser.add_argument("--port", type=int, default=18700)
    parser.add_argument("--talking", choices=["all", "quarter"], default="all")
    parser.add_argument("--talking-share", type=float, default=None, help="with --start: "
                        "serve.admission.talking_share (default: 1 for --talking all, 0.25 for quarter)")
    parser.add_argument("--cpu-target", type=float, default=None,
                        help="with --start: serve.admission.cpu_target (default: the setting's)")
    parser.add_argument("--interval-s", type=float, default=6.0)
    parser.add_argument("--refusals", type=int, default=3, help="refusals in a row that end the adding")
    parser.add_argument("--max-sessions", type=int, default=32)
    parser.add_argument("--hold-s", type=float, default=20.0)
    parser.add_argument("--max-run-s", type=float, default=600.0)
    parser.add_argument("--avatar", default="default")
    parser.add_argument("--raw", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if bool(args.url) == args.start:
        parser.error("give a URL or --start, not both")
    if args.talking_share is None:
        args.talking_share = 1.0 if args.talking == "all" else 0.25
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    machine = machine_speed()  # before the server starts: the machine alone
    result = {"commit": git_commit(), "machine": machine, **asyncio.run(benchmark(args))}
    print(json.dumps({k: v for k, v in result.items() if k not in ("sessions", "raw")}, indent=2))
    for s in result["sessions"]:
        print(s)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
