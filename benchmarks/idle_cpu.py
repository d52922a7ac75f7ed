"""CPU of silent sessions, per process of `ray-lipsync serve`.

Starts `ray-lipsync serve`, measures every process of its tree for 10 s with no session, then
connects N aiortc clients that never speak and, `--settle` seconds later, measures `--seconds`
again (from `/proc`, as e2e.py does). A video avatar's idle cycle is sent again without
encoding only once it was encoded whole after the bitrate settled (ray_lipsync/webrtc/loop.py):
give it the bitrate ramp (~25 s here) plus the cycle's length. Reports, per process title, % of
a core before, with the sessions, and the difference per session; this process's own CPU (the
clients); and each session's frames sent again, keyframes and encoder bitrate.

    python benchmarks/idle_cpu.py --sessions 4 --json benchmarks/results/idle_cpu.json
    python benchmarks/idle_cpu.py --sessions 4 --avatar yongen --settle 60 --json benchmarks/results/idle_cpu_yongen.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from output import git_commit, machine_speed, write_json  # noqa: E402
from e2e import cpu_by_process, start_server, wait_healthy  # noqa: E402

from ray_lipsync.webrtc.client import ReceiverClient  # noqa: E402


async def percent_by_process(pid: int, seconds: float) -> dict[str, float]:
    before, t = cpu_by_process(pid), time.monotonic()
    await asyncio.sleep(seconds)
    after, dt = cpu_by_process(pid), time.monotonic() - t
    return {k: 100 * (after[k] - before.get(k, 0.0)) / dt for k in after}


async def benchmark(args: argparse.Namespace) -> dict:
    # admission off: it would refuse sessions while this machine is busy (this is a CPU count)
    server = start_server(args.port, [], None, {"webrtc": {"still_fps": args.still_fps,
                                                           "opus_dtx": args.opus_dtx},
                                                "serve": {"admission": {"enabled": False}}})
    clients: list[ReceiverClient] = []
    sessions: list[tuple[str, dict]] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", timeout=60) as http:
            await wait_healthy(http, 180, server)
            await asyncio.sleep(5)  # past the start-up work
            alone = await percent_by_process(server.pid, 10)
            for _ in range(args.sessions):
                created = (await http.post("/v1/sessions", json={"avatar": args.avatar})).raise_for_status().json()
                sid, auth = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
                sessions.append((sid, auth))
                client = ReceiverClient(keep_audio=False)
                clients.append(client)
                answer = (await http.post(f"/v1/sessions/{sid}/offer", json=await client.offer(),
                                          headers=auth)).json()
                await client.accept(answer)
                await client.wait_first_video(30)
            await asyncio.sleep(args.settle)
            own = time.process_time()
            silent = await percent_by_process(server.pid, args.seconds)
            clients_percent = 100 * (time.process_time() - own) / args.seconds
            network = [(await http.get(f"/v1/sessions/{sid}", headers=auth)).json()["network"]
                       for sid, auth in sessions]
    finally:
        for client in clients:
            await client.close()
        server.terminate()
        server.wait(60)
    by_process = {k: {"no_session": round(alone.get(k, 0.0), 1), "with_sessions": round(v, 1),
                      "per_session": round((v - alone.get(k, 0.0)) / args.sessions, 2)}
                  for k, v in silent.items() if v >= 0.5 or alone.get(k, 0.0) >= 0.5}
    return {"sessions": args.sessions, "avatar": args.avatar, "still_fps": args.still_fps,
            "opus_dtx": args.opus_dtx, "settle_s": args.settle, "seconds": args.seconds,
            "commit": git_commit(), "by_process": by_process,
            "frames_replayed": [n.get("frames_replayed", 0) for n in network],
            "keyframes": [n["keyframes"] for n in network], "encoder_bps": [n["encoder_bps"] for n in network],
            "server_percent_per_session": round((sum(silent.values()) - sum(alone.values())) / args.sessions, 2),
            "clients_percent": round(clients_percent, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--port", type=int, default=18800)
    parser.add_argument("--avatar", default="default", help="a prepared avatar (e.g. one made from "
                        "../shared/media/yongen.mp4 with `ray-lipsync avatar prepare`)")
    parser.add_argument("--still-fps", type=float, default=5.0, help="webrtc.still_fps of the server "
                        "(25: every frame of a still picture is encoded, as before it existed)")
    parser.add_argument("--opus-dtx", choices=["auto", "on", "off"], default="auto",
                        help="webrtc.opus_dtx of the server (its aiortc clients do not ask for DTX: "
                        "auto = off for them)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds from the last connect to the measurement")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds measured")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    machine = machine_speed()  # before the server starts: the machine alone
    result = {"machine": machine, **asyncio.run(benchmark(args))}
    print(json.dumps(result, indent=2))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
