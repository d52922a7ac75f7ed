"""When an `interrupt` event reaches a client: over the SSE stream (through Serve's HTTP proxy)
and over the peer connection's "events" data channel, against `ray-lipsync serve`.

One session with an aiortc peer that opens the data channel and an SSE stream beside it;
`--talkers` more sessions stream speech all along (load). Per interrupt: a phrase, then after
0.9 s `POST /interrupt`; the times (from the POST) at which its answer, the data channel's
event and the SSE event arrived. Writes JSON (`--json`).

    .venv/bin/python benchmarks/event_paths.py --talkers 3 --interrupts 15 --json benchmarks/results/event_paths_3.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from e2e import DEFAULT_TEXT, run_client, speech, start_server, wait_healthy, warm_up
from output import git_commit, write_json
from ray_lipsync.webrtc.client import ReceiverClient

PHRASE = "Streaming avatars need steady latency, even when they are interrupted."


async def sse_interrupts(http: httpx.AsyncClient, sid: str, token: str, arrived: dict[int, float]) -> None:
    """Record when each `interrupt` event (by epoch) arrives on the session's SSE stream."""
    async with http.stream("GET", f"/v1/sessions/{sid}/events?token={token}", timeout=None) as response:
        name = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: ") and name == "interrupt":
                arrived[json.loads(line[len("data: "):])["epoch"]] = time.monotonic()


async def measure(http: httpx.AsyncClient, interrupts: int) -> list[dict]:
    created = (await http.post("/v1/sessions", json={"avatar": "default"})).raise_for_status().json()
    sid, token = created["session_id"], created["token"]
    auth = {"Authorization": f"Bearer {token}"}
    receiver = ReceiverClient(ice_servers=[], events=True, keep_audio=False)
    answer = await http.post(f"/v1/sessions/{sid}/offer", json=await receiver.offer(), headers=auth)
    await receiver.accept(answer.raise_for_status().json())
    await receiver.wait_first_video(10)
    sse: dict[int, float] = {}
    listener = asyncio.create_task(sse_interrupts(http, sid, token, sse))
    await asyncio.sleep(1.0)
    rows = []
    try:
        for _ in range(interrupts):
            (await http.post(f"/v1/sessions/{sid}/speak", headers=auth, json={"text": PHRASE})).raise_for_status()
            await asyncio.sleep(0.9)
            t = time.monotonic()
            cut = (await http.post(f"/v1/sessions/{sid}/interrupt", headers=auth)).raise_for_status().json()
            answered = time.monotonic()
            await asyncio.sleep(0.4)
            channel = next((at for at, name, data in receiver.received.events
                            if name == "interrupt" and data["epoch"] == cut["epoch"]), None)
            rows.append({"answered_ms": (answered - t) * 1000,
                         "data_channel_ms": None if channel is None else (channel - t) * 1000,
                         "sse_ms": None if cut["epoch"] not in sse else (sse[cut["epoch"]] - t) * 1000})
    finally:
        listener.cancel()
        await receiver.close()
        await http.delete(f"/v1/sessions/{sid}", headers=auth)
    return rows


def summary(rows: list[dict]) -> dict:
    def stats(values: list[float]) -> dict | None:
        values = sorted(values)
        return {"p50": round(statistics.median(values), 1), "min": round(values[0], 1),
                "max": round(values[-1], 1)} if values else None

    both = [r for r in rows if r["data_channel_ms"] is not None and r["sse_ms"] is not None]
    return {"interrupts": len(rows), "answered_ms": stats([r["answered_ms"] for r in rows]),
            "data_channel_ms": stats([r["data_channel_ms"] for r in rows if r["data_channel_ms"] is not None]),
            "sse_ms": stats([r["sse_ms"] for r in rows if r["sse_ms"] is not None]),
            "data_channel_minus_sse_ms": stats([r["data_channel_ms"] - r["sse_ms"] for r in both])}


async def main(args) -> dict:
    server = start_server(args.port, [], None)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", timeout=60) as http:
            await wait_healthy(http, 240, server)
            await warm_up(http, "default")
            load = None
            if args.talkers:
                samples = await asyncio.to_thread(speech, DEFAULT_TEXT)
                seconds = 5 + args.interrupts * 1.6
                load = asyncio.gather(*(run_client(http, samples, seconds, "default", "stream")
                                        for _ in range(args.talkers)))
                await asyncio.sleep(3.0)  # the talkers are talking
            rows = await measure(http, args.interrupts)
            if load is not None:
                await load
    finally:
        server.terminate()
        server.wait(60)
    return {"config": {"talkers": args.talkers, "interrupts": args.interrupts, "commit": git_commit()},
            "summary": summary(rows), "interrupts": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--talkers", type=int, default=0)
    parser.add_argument("--interrupts", type=int, default=15)
    parser.add_argument("--port", type=int, default=8031)
    parser.add_argument("--json", default=None)
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    write_json(arguments.json, result)
    print(json.dumps(result["summary"], indent=2))
