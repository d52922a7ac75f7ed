"""Cold start: is the first session after the service starts as fast as the later ones?

    python benchmarks/cold_start.py --json benchmarks/results/cold_start.json

Starts `ray-lipsync serve` (local Ray + Serve, procedural backend), waits for /healthz, then
opens sessions one after another as a client would: POST /v1/sessions, POST the WebRTC offer
(aiortc), wait for the first decoded video frame, close. Per session: create, offer (POST ->
answer) and offer -> first frame, in ms. Issue 13's target: the first create <= 300 ms and
the first session no slower than the later ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import start_server, wait_healthy  # noqa: E402

from ray_lipsync.webrtc.client import ReceiverClient  # noqa: E402

log = logging.getLogger("benchmarks.cold_start")


async def one_session(http: httpx.AsyncClient) -> dict[str, float]:
    """Create, connect and close one session; the three times in ms."""
    t0 = time.monotonic()
    created = (await http.post("/v1/sessions", json={})).raise_for_status().json()
    t1 = time.monotonic()
    auth = {"Authorization": f"Bearer {created['token']}"}
    receiver = ReceiverClient(ice_servers=[])
    try:
        offer = await receiver.offer()
        t2 = time.monotonic()
        answer = (await http.post(f"/v1/sessions/{created['session_id']}/offer", json=offer,
                                  headers=auth)).raise_for_status().json()
        t3 = time.monotonic()
        await receiver.accept(answer)
        await receiver.wait_first_video(timeout=30)
        t4 = time.monotonic()
    finally:
        await receiver.close()
        await http.delete(f"/v1/sessions/{created['session_id']}", headers=auth)
    return {"create_ms": 1000 * (t1 - t0), "offer_ms": 1000 * (t3 - t2),
            "offer_to_first_frame_ms": 1000 * (t4 - t2)}


async def benchmark(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    server = start_server(args.port, ["--backend", "procedural"], None)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", timeout=60) as http:
            await wait_healthy(http, args.startup_timeout, server)
            healthy_s = time.monotonic() - started
            sessions = []
            for _ in range(args.sessions):
                sessions.append(await one_session(http))
                await asyncio.sleep(args.pause_s)
    finally:
        server.terminate()
        server.wait(30)
    later = sessions[1:]
    summary = {"healthy_after_start_s": round(healthy_s, 2), "first": {k: round(v, 1) for k, v in sessions[0].items()}}
    if later:
        summary["later_p50"] = {k: round(statistics.median(s[k] for s in later), 1) for k in sessions[0]}
    return {"config": {"sessions": args.sessions, "pause_s": args.pause_s, "backend": "procedural"},
            "summary": summary, "sessions": sessions}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--pause-s", type=float, default=1.0, help="between sessions")
    parser.add_argument("--port", type=int, default=8140)
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    result = asyncio.run(benchmark(args))
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
