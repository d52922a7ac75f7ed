"""What the WebRTC media path alone costs per talking session: the floor under issue 19's
"<= 10 % of a core per talking session".

A server process hosts N of the gateway's own `SessionPeer`s (aiortc, the session's VP8 and
Opus encoders, the gateway's WebRTC settings) fed from frames rendered before the run (the
default avatar talking, procedural backend, with its speech), paced at 25 fps on the wall
clock, each session at its own phase of the clip. No pipeline, no Ray, no Serve, no speech
upload: only what every talking session costs to send whatever renders it. N aiortc
receivers in this process decode everything; their CPU is reported apart. The server's CPU
is read from its own rusage over a window once every session has received video for
`--settle` seconds.

    .venv/bin/python benchmarks/media_floor.py --sessions 1,6 --runs 3 --json benchmarks/results/media_floor.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.latency import load_speech  # noqa: E402
from ray_lipsync.clock import FPS, SAMPLE_RATE, sample_range, video_pts  # noqa: E402
from ray_lipsync.config import Settings  # noqa: E402
from ray_lipsync.types import OutputFrame  # noqa: E402
from ray_lipsync.webrtc.encoder import VIDEO_TIME_BASE  # noqa: E402
from ray_lipsync.webrtc.tracks import audio_chunks  # noqa: E402

log = logging.getLogger("benchmarks.media_floor")


def talking_clip(seconds: float) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """(image, audio, speech) per frame of the default avatar speaking for `seconds`."""
    from ray_lipsync.render import render_frames
    from ray_lipsync.streaming.engine import load_avatar

    settings = Settings()
    samples = load_speech(seconds)[0][: int(seconds * SAMPLE_RATE)].astype(np.float32)
    clip = []
    for f in render_frames(samples, load_avatar(settings, "default"), settings):
        start, stop = sample_range(f.index)
        clip.append((np.array(f.image), samples[start:stop], f.speech))
    return clip


class _Sender:
    """The two callbacks `SessionPeer` reads from its session (nothing to record here)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    def record_sent(self, frame: OutputFrame) -> None:
        pass

    def record_sender_drop(self, frame: OutputFrame) -> None:
        pass


async def paced(clip: list, session_id: str, offset: int) -> AsyncIterator[OutputFrame]:
    """The clip from frame `offset` on, looped, each frame yielded at its presentation time."""
    start = time.time()
    for k in range(10**9):
        image, audio, speech = clip[(offset + k) % len(clip)]
        due = start + k / FPS
        wait = due - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        yield OutputFrame(session_id, 0, k, image, audio, video_pts(k), due, speech=speech)


class QueueTrack(MediaStreamTrack):
    """A track whose recv() hands out what its peer queued (aiortc encodes it); the first
    recv() starts the peer's frame pump."""

    def __init__(self, kind: str, queue: asyncio.Queue, start: Callable[[], None]) -> None:
        super().__init__()
        self.kind, self._queue, self._start = kind, queue, start

    async def recv(self) -> av.frame.Frame:
        self._start()
        return await self._queue.get()


class StockPeer:
    """aiortc as its documentation has it: tracks that return av frames (aiortc's own VP8 and
    Opus encoders, its resampling to 48 kHz stereo), no still-picture or silence shortcuts."""

    def __init__(self, frames: AsyncIterator[OutputFrame]) -> None:
        self._pc = RTCPeerConnection()
        self._frames = frames
        self._queues: dict[str, asyncio.Queue] = {"audio": asyncio.Queue(), "video": asyncio.Queue()}
        self._pump: asyncio.Task | None = None

    def network(self) -> None:
        """No link feedback here: aiortc's encoder follows REMB by itself."""
        return None

    async def answer(self, sdp: str) -> dict:
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        for transceiver in self._pc.getTransceivers():
            transceiver.direction = "sendonly"
            self._pc.addTrack(QueueTrack(transceiver.kind, self._queues[transceiver.kind], self._start))
        await self._pc.setLocalDescription(await self._pc.createAnswer())
        return {"sdp": self._pc.localDescription.sdp, "type": "answer"}

    def _start(self) -> None:
        if self._pump is None:
            self._pump = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for frame in self._frames:
            video = av.VideoFrame.from_ndarray(frame.image, format="rgb24")
            video.pts, video.time_base = frame.pts, VIDEO_TIME_BASE
            self._queues["video"].put_nowait(video)
            for chunk in audio_chunks(frame):
                self._queues["audio"].put_nowait(chunk)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        await self._pc.close()


def serve(conn, clip_seconds: float, path: str) -> None:
    """The server process: answer offers with SessionPeers (or `StockPeer`s), then report its
    CPU on request."""
    from ray_lipsync.webrtc.peer import SessionPeer

    async def main() -> None:
        clip = talking_clip(clip_seconds)
        rtc = Settings().webrtc
        peers = []
        loop = asyncio.get_running_loop()
        conn.send({"ready": len(clip)})
        while True:
            message = await loop.run_in_executor(None, conn.recv)
            if "offer" in message:
                sid = f"s{len(peers)}"
                frames = paced(clip, sid, random.randrange(len(clip)))
                peer = StockPeer(frames) if path == "aiortc" else SessionPeer(_Sender(sid), bitrate=rtc.bitrate_bounds(), still_every=rtc.still_every(),
                                   video_hold=rtc.video_hold(),
                                   frames=lambda frames=frames: frames)
                peers.append(peer)
                conn.send(await peer.answer(message["offer"]["sdp"]))
            elif "measure" in message:
                before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
                await asyncio.sleep(message["measure"])
                after, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                conn.send({"cpu_s": cpu, "wall_s": t1 - t0, "network": [p.network() for p in peers]})
            elif "stop" in message:
                await asyncio.gather(*(p.close() for p in peers))
                conn.send({"stopped": True})
                return

    asyncio.run(main())


async def one_run(sessions: int, seconds: float, settle: float, clip_seconds: float, path: str) -> dict:
    from ray_lipsync.webrtc.client import ReceiverClient

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(child, clip_seconds, path), daemon=True)
    server.start()
    loop = asyncio.get_running_loop()

    async def ask(message: dict) -> dict:
        parent.send(message)
        return await loop.run_in_executor(None, parent.recv)

    try:
        await loop.run_in_executor(None, parent.recv)  # the clip is rendered
        clients = [ReceiverClient(keep_audio=False) for _ in range(sessions)]
        for client in clients:
            await client.accept(await ask({"offer": await client.offer()}))
        await asyncio.gather(*(c.wait_first_video(30) for c in clients))
        await asyncio.sleep(settle)
        counts = [c.received.video_frames for c in clients]
        own0 = resource.getrusage(resource.RUSAGE_SELF)
        report = await ask({"measure": seconds})
        own1 = resource.getrusage(resource.RUSAGE_SELF)
        fps = [(c.received.video_frames - n) / report["wall_s"] for c, n in zip(clients, counts)]
        await ask({"stop": True})
        await asyncio.gather(*(c.close() for c in clients))
    finally:
        server.join(10)
        if server.is_alive():
            server.kill()
    server_pct = 100 * report["cpu_s"] / report["wall_s"]
    clients_pct = 100 * ((own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)) / report["wall_s"]
    sent_kbps = [round(n["sent_bps"] / 1000) for n in report["network"] if n]
    return {"path": path, "sessions": sessions, "server_cpu_percent": round(server_pct, 2),
            "server_cpu_percent_per_session": round(server_pct / sessions, 2),
            "clients_cpu_percent": round(clients_pct, 1),
            "received_fps_min": round(min(fps), 2), "received_fps_median": round(statistics.median(fps), 2),
            "network": report["network"], "sent_kbps": sent_kbps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1,6", help="comma-separated session counts")
    parser.add_argument("--runs", type=int, default=3, help="runs per session count (interleaved)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds of video before the window")
    parser.add_argument("--clip", type=float, default=20.0, help="seconds of talking clip to loop")
    parser.add_argument("--paths", default="session", help="comma-separated: session (the gateway's "
                        "SessionPeer), aiortc (stock aiortc tracks and encoders)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    counts = [int(n) for n in args.sessions.split(",")]
    results = []
    paths = args.paths.split(",")
    for run in range(args.runs):
        for n, path in ((n, path) for n in counts for path in paths):
            result = asyncio.run(one_run(n, args.seconds, args.settle, args.clip, path))
            result["run"] = run + 1
            log.info("%s, run %d, %d sessions: server %.2f %% of a core per session (%.1f %% in all), "
                     "clients %.1f %%, fps min %.2f", path, run + 1, n, result["server_cpu_percent_per_session"],
                     result["server_cpu_percent"], result["clients_cpu_percent"], result["received_fps_min"])
            results.append(result)
    summary = {}
    for n, path in ((n, path) for n in counts for path in paths):
        per = [r["server_cpu_percent_per_session"] for r in results if r["sessions"] == n and r["path"] == path]
        summary[f"{path} {n}"] = {"per_session_median": round(statistics.median(per), 2),
                           "per_session_worst": max(per), "per_session_runs": per}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "seconds": args.seconds, "settle": args.settle, "summary": summary, "runs": results}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
