"""Real Ray Serve on loopback with the real RayPipeline: two gateway replicas, session-affine
routing, cluster /metrics, and one session end to end over real HTTP + real WebRTC.

One Ray + Serve start for the whole module (the `base_url` fixture).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from actors.runtime import init_ray  # noqa: E402

from ray_lipsync.config import Settings  # noqa: E402
from ray_lipsync.webrtc.client import ReceiverClient  # noqa: E402
from helpers import loud_ms  # noqa: E402
from speech import silence, speech, to_wav_bytes  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PORT = 8123
ROOT = Path(__file__).resolve().parent.parent
FRAME_S = 0.04
RECEIVER_PREFETCH_S = 0.08  # aiortc's audio JitterBuffer(prefetch=4) holds 4 x 20 ms packets


@pytest.fixture(scope="module")
def base_url(lipsync_home):
    import serve_app

    init_ray(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    settings = Settings(home=lipsync_home,
                        # offer_timeout_s: most sessions here never get a WebRTC peer, and a test
                        # may wait a minute for Serve to add a gateway: they must not expire meanwhile
                        serve={"min_gateways": 2, "max_gateways": 3, "target_sessions_per_gateway": 4,
                               "livetalking_compat": True, "max_sessions": 50, "stream_read_ahead_s": 5,
                               "offer_timeout_s": 900,
                               # many sessions on a 2-core machine shared with this test's own
                               # clients: measured headroom would refuse them (see test_admission.py)
                               "admission": {"enabled": False}},
                        pipeline={"sessions_per_replica": 64})
    serve.run(serve_app.build_app(settings), name="ray-lipsync", route_prefix="/")
    yield f"http://127.0.0.1:{PORT}"
    serve.shutdown()
    ray.shutdown()


def test_sessions_stay_on_their_home_replica(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as client:
        assert "<html" in client.get("/").text.lower()
        sessions: dict[str, dict] = {}
        homes: set[str] = set()
        for _ in range(40):
            body = client.post("/v1/sessions", json={}).json()
            sessions[body["session_id"]] = {"Authorization": f"Bearer {body['token']}"}
            homes.add(body["session_id"].split(".")[0])
            if len(homes) == 2 and len(sessions) >= 6:
                break
        assert len(homes) == 2, "sessions never spread over both gateways"
        for _ in range(2):
            for sid, auth in sessions.items():
                state = client.get(f"/v1/sessions/{sid}", headers=auth)
                assert state.status_code == 200, state.text
                assert state.json()["gateway"] == sid.split(".")[0]
                # the proxy sent the HTTP request straight to the home gateway (no forwarding)
                assert state.headers["x-lipsync-gateway"] == sid.split(".")[0]
                assert state.json()["replica"].startswith("replica-") and "-procedural-" in state.json()["replica"]
                assert client.post(f"/v1/sessions/{sid}/interrupt", headers=auth).status_code == 200
        sid, auth = next(iter(sessions.items()))
        assert client.get(f"/v1/sessions/{sid}").status_code == 401
        assert client.get(f"/v1/sessions/{sid}", headers={"Authorization": "Bearer x"}).status_code == 403
        tag = sid.split(".")[0]
        assert client.get(f"/v1/sessions/{tag}.nothing", headers=auth).status_code == 404
        assert client.get("/v1/sessions/gone.nothing", headers=auth).status_code == 404
        text = ""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = client.get("/metrics").text
            if all(f'lipsync_sessions{{replica="{h}"}}' in text for h in homes) and (
                'lipsync_replica_queue_depth{inference_replica="replica-' in text
            ):
                break
            time.sleep(0.5)
        for h in homes:
            assert f'lipsync_sessions{{replica="{h}"}}' in text
        assert 'lipsync_replica_sessions{inference_replica="replica-' in text
        assert 'lipsync_frames_dropped_total{reason="stage_unavailable",replica=' in text
        assert 'lipsync_replica_device{device="cpu",inference_replica="replica-' in text
        assert "lipsync_frame_latency_ms_bucket" in text
        for sid, auth in sessions.items():
            assert client.delete(f"/v1/sessions/{sid}", headers=auth).status_code == 204
        assert client.get(f"/v1/sessions/{sid}", headers=auth).status_code == 404


def test_stream_socket_reaches_the_home_gateway_through_the_proxy(base_url):
    """The Serve proxy routes the WebSocket by its path too; refusals come before the upgrade."""
    import websockets
    from websockets.exceptions import InvalidStatus

    async def main() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            sessions = {}
            for _ in range(20):
                body = (await client.post("/v1/sessions", json={})).json()
                sessions.setdefault(body["session_id"].split(".")[0], body)
                if len(sessions) == 2:
                    break
            assert len(sessions) == 2
            ws_base = base_url.replace("http", "ws")
            for body in sessions.values():
                sid, token = body["session_id"], body["token"]
                with pytest.raises(InvalidStatus) as refused:
                    async with websockets.connect(f"{ws_base}/v1/sessions/{sid}/stream"):
                        pass
                assert refused.value.response.status_code == 401
                async with websockets.connect(f"{ws_base}/v1/sessions/{sid}/stream?token={token}&rate=8000") as ws:
                    await ws.send((np.full(8000, 3000)).astype("<i2").tobytes())  # 1 s
                    await ws.send(json.dumps({"type": "flush"}))
                    await ws.send("?")
                    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "error"
                    state = (await client.get(f"/v1/sessions/{sid}",
                                              headers={"Authorization": f"Bearer {token}"})).json()
                    assert 0.5 < state["queued_audio_s"] <= 1.0
                    assert (await client.delete(f"/v1/sessions/{sid}",
                                                headers={"Authorization": f"Bearer {token}"})).status_code == 204
                    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "session.closed"

    asyncio.run(main())


def test_stream_socket_bounds_what_the_proxy_reads_ahead(base_url):
    """Serve's proxy reads a WebSocket without backpressure, so the socket bounds it: a client
    sending at 10x real time fills the 30 s buffer, is told 'too_far_ahead' once 5 s more
    wait, and is closed with 1008; the buffer holds what fitted."""
    import websockets

    async def main() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            body = (await client.post("/v1/sessions", json={})).json()
            sid, token = body["session_id"], body["token"]
            url = f"{base_url.replace('http', 'ws')}/v1/sessions/{sid}/stream?token={token}"
            piece = (np.full(3200, 3000)).astype("<i2").tobytes()  # 200 ms

            async def flood(ws) -> None:  # 10x real time, for up to 100 s of audio
                try:
                    for _ in range(500):
                        await ws.send(piece)
                        await asyncio.sleep(0.02)
                except websockets.ConnectionClosed:
                    pass

            async with websockets.connect(url) as ws:
                sender = asyncio.create_task(flood(ws))
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert message["type"] == "error" and message["error"] == "too_far_ahead", message
                await asyncio.wait_for(ws.wait_closed(), 10)
                assert ws.close_code == 1008
                await sender
            state = (await client.get(f"/v1/sessions/{sid}",
                                      headers={"Authorization": f"Bearer {token}"})).json()
            assert 29.0 <= state["queued_audio_s"] <= 30.05, state
            await client.delete(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"})

    asyncio.run(main())


def test_a_recording_through_the_serve_proxy(base_url):
    """POST/DELETE/GET recording through Serve's proxy: the MP4 streams back from the session's
    home gateway (no WebRTC peer: the recording alone keeps the frames flowing)."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        created = client.post("/v1/sessions", json={"avatar": "default"}).json()
        sid, auth = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
        assert client.post(f"/v1/sessions/{sid}/recording", headers=auth).status_code == 201
        time.sleep(1.5)
        state = client.delete(f"/v1/sessions/{sid}/recording", headers=auth).json()
        assert state["state"] == "stopped" and state["bytes"] > 0, state
        r = client.get(f"/v1/sessions/{sid}/recording", headers=auth)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        assert len(r.content) == int(r.headers["content-length"]) > state["bytes"]
        assert r.content[4:8] == b"ftyp"  # an MP4
        assert client.delete(f"/v1/sessions/{sid}", headers=auth).status_code == 204


def test_livetalking_offer_routes_home(base_url):
    async def main() -> tuple[dict, dict]:
        receiver = ReceiverClient(ice_servers=[])
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            bad = (await client.post("/offer", json={"sdp": "v=0", "type": "offer"}))
            r = (await client.post("/offer", json=await receiver.offer())).json()
            await receiver.accept(r)
            await receiver.wait_first_video(timeout=5)
            state = (await client.post("/is_speaking", json={"sessionid": r["sessionid"]})).json()
        await receiver.close()
        return {"status": bad.status_code, **bad.json()}, {**r, "speaking": state}

    bad, good = asyncio.run(main())
    assert bad["code"] == -1 and bad["status"] == 400
    assert isinstance(good["sessionid"], int) and good["speaking"] == {"code": 0, "data": False}


class AudioArrivals:
    """Arrival times of the receiver's decoded audio pieces (polled every 5 ms)."""

    def __init__(self, receiver: ReceiverClient) -> None:
        self._receiver = receiver
        self.marks: list[tuple[float, int]] = []  # (time, pieces received by then)
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            self.marks.append((time.monotonic(), len(self._receiver.received.audio)))
            await asyncio.sleep(0.005)

    def between(self, start: float, end: float) -> list[np.ndarray]:
        """Pieces that arrived within [start, end)."""
        first = next((n for t, n in self.marks if t >= start), None)
        last = next((n for t, n in self.marks if t >= end), len(self._receiver.received.audio))
        return self._receiver.received.audio[first:last] if first is not None else []

    def stop(self) -> None:
        self._task.cancel()


async def read_events(client: httpx.AsyncClient, url: str, into: list) -> None:
    """Read the SSE stream over HTTP, recording (arrival time, event, data)."""
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event:
                into.append((time.monotonic(), event, json.loads(line[6:])))
                if event == "session.closed":
                    return


def test_end_to_end_over_http_and_webrtc(base_url):
    """Issue checks: first frame < 2 s; 25 +/- 1 fps over 10 s; received speech as long as the
    pushed speech; interrupt silences video and audio within 2 frames; events arrive."""
    clip = np.concatenate([silence(0.2), speech("The quick brown fox jumps over the lazy dog."),
                           silence(0.2)])

    async def main() -> dict:
        out: dict = {}
        receiver = ReceiverClient(ice_servers=[])
        events: list[tuple[float, str, dict]] = []
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            body = (await client.post("/v1/sessions", json={})).json()
            sid, token = body["session_id"], body["token"]
            auth = {"Authorization": f"Bearer {token}"}
            listener = asyncio.create_task(
                read_events(client, f"/v1/sessions/{sid}/events?token={token}", events))
            r = await client.post(f"/v1/sessions/{sid}/offer", json=await receiver.offer(), headers=auth)
            assert r.status_code == 200, r.text
            await receiver.accept(r.json())
            out["first_frame_s"] = await receiver.wait_first_video(timeout=10)
            arrivals = AudioArrivals(receiver)
            t0 = time.monotonic()
            left_out = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()["network"]["frames_left_out"]

            async def upload():
                data = to_wav_bytes(clip)
                for i in range(0, len(data), 8192):
                    yield data[i:i + 8192]

            await asyncio.sleep(0.3)
            r = await client.post(f"/v1/sessions/{sid}/audio", content=upload(),
                                  headers={**auth, "Content-Type": "audio/wav"})
            assert r.status_code == 202, r.text
            out["upload"] = r.json()
            await asyncio.sleep(t0 + 4.5 - time.monotonic())
            out["speech_audio"] = arrivals.between(t0, t0 + 4.5)
            r = await client.post(f"/v1/sessions/{sid}/speak", headers=auth, json={
                "text": "Streaming avatars need steady latency, even when they are interrupted."})
            assert r.status_code == 202, r.text
            out["spoken"] = r.json()
            await asyncio.sleep(1.5)
            r = await client.post(f"/v1/sessions/{sid}/interrupt", headers=auth)
            out["interrupted_at"] = time.monotonic()
            assert r.status_code == 200 and r.json()["epoch"] == 1
            out["cut"] = r.json()
            state = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
            out["speaking_after_interrupt"] = state["speaking"]
            await asyncio.sleep(t0 + 10.0 - time.monotonic())
            out["fps"] = receiver.received.fps(t0, t0 + 10.0)
            out["state"] = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
            # frames of the still idle picture left out in the 10 s (webrtc.still_fps)
            out["left_out_fps"] = (out["state"]["network"]["frames_left_out"] - left_out) / 10.0
            out["before_interrupt"] = arrivals.between(out["interrupted_at"] - 1.0, out["interrupted_at"])
            out["after_interrupt"] = arrivals.between(out["interrupted_at"], t0 + 10.0)
            assert (await client.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
            await asyncio.wait_for(listener, 10)
            arrivals.stop()
        await receiver.close()
        out["events"], out["rate"] = events, receiver.received.audio_rate
        return out

    r = asyncio.run(main())
    print(f"first frame {r['first_frame_s']:.3f} s, {r['fps']:.2f} fps")
    assert r["first_frame_s"] < 2.0
    # every frame of the 10 s either arrived or was a still picture's repeat left out
    assert 24.0 <= r["fps"] + r["left_out_fps"] <= 26.0, (r["fps"], r["left_out_fps"])
    assert r["fps"] >= 12, r["fps"]  # 5.6 s of speech at 25 fps, the rest >= 5 fps
    assert r["state"]["frames_sent"] >= 250 and r["state"]["connection_state"] == "connected"

    # the received speech is as long as the pushed speech (energy VAD on both)
    heard = loud_ms(np.concatenate(r["speech_audio"]), r["rate"])
    pushed = loud_ms(clip, 16000)
    print(f"speech: pushed {pushed} ms, received {heard} ms")
    assert abs(heard - pushed) <= 60, (heard, pushed)

    # interrupt: no loud audio more than 2 frames after it (levels relative to the speech);
    # the receiving client plays audio RECEIVER_PREFETCH_S late, so that much more arrives
    piece_s = len(r["after_interrupt"][0]) / r["rate"]
    level = max(float(np.sqrt((p.astype(np.float64) ** 2).mean())) for p in r["before_interrupt"])
    loud_after = [i for i, p in enumerate(r["after_interrupt"])
                  if np.sqrt((p.astype(np.float64) ** 2).mean()) > level * 0.05]
    late_s = (loud_after[-1] + 1) * piece_s if loud_after else 0.0
    print(f"interrupt: speech level {level:.3f}, speech heard for {late_s * 1000:.0f} ms after it")
    assert level > 0.05, "the interrupted speech was not playing"
    assert late_s <= 2 * FRAME_S + RECEIVER_PREFETCH_S + piece_s, late_s
    assert r["speaking_after_interrupt"] is False

    # events: one start/end per utterance, the interrupted one ended at the interrupt
    events = [(t, e, d) for t, e, d in r["events"]]
    names = [(e, d.get("utterance_id")) for _, e, d in events]
    up, sp = r["upload"]["utterance_id"], r["spoken"]["utterance_id"]
    assert names == [("utterance.start", up), ("utterance.end", up), ("utterance.start", sp),
                     ("interrupt", sp), ("utterance.end", sp), ("session.closed", None)], names
    ended = next(t for t, e, d in events if e == "utterance.end" and d["utterance_id"] == sp)
    print(f"interrupt: utterance.end arrived {(ended - r['interrupted_at']) * 1000:.0f} ms after it")
    assert ended - r["interrupted_at"] <= 2 * FRAME_S + 0.1
    start_ev, end_ev = (d for _, e, d in events[:2])
    assert end_ev["frame"] - start_ev["frame"] + 1 == -(-len(clip) // 640)
    # playback positions through Serve: the upload played whole, the spoken one was cut
    assert (end_ev["played_ms"], end_ev["interrupted"]) == (r["upload"]["duration_ms"], False)
    cut_ev = next(d for _, e, d in events if e == "utterance.end" and d["utterance_id"] == sp)
    assert r["cut"]["utterance_id"] == sp and r["cut"]["interrupted"] is True
    assert cut_ev["played_ms"] == r["cut"]["played_ms"] and cut_ev["interrupted"] is True


def running_gateways() -> int:
    deployments = serve.status().applications["ray-lipsync"].deployments
    return sum(n for state, n in deployments["Gateway"].replica_states.items() if str(state).endswith("RUNNING"))


def test_gateways_scale_up_on_sessions_and_old_sessions_stay_home(base_url):
    """More sessions than 2 gateways x 4 target: a third gateway is added (custom metric);
    sessions created before it keep reaching their home replica; a new one lands on it."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        sessions: dict[str, dict] = {}

        def create() -> str:
            body = client.post("/v1/sessions", json={}).json()
            sessions[body["session_id"]] = {"Authorization": f"Bearer {body['token']}"}
            return body["session_id"].split(".")[0]

        homes = {create() for _ in range(10)}
        before = dict(sessions)
        deadline = time.monotonic() + 90
        while running_gateways() < 3 and time.monotonic() < deadline:
            time.sleep(1)
        assert running_gateways() == 3, "10 sessions at 4 per gateway did not add a third gateway"
        # least-loaded placement reads routing stats refreshed every second: the new, empty
        # gateway takes new sessions once the router has seen it
        newcomers = []
        for _ in range(10):
            newcomers.append(create())
            if newcomers[-1] not in homes:
                break
            time.sleep(1)
        assert newcomers[-1] not in homes, f"no new session reached the added gateway: {newcomers}"
        for sid, auth in before.items():
            state = client.get(f"/v1/sessions/{sid}", headers=auth)
            assert state.status_code == 200 and state.json()["gateway"] == sid.split(".")[0]
        for sid, auth in sessions.items():
            assert client.delete(f"/v1/sessions/{sid}", headers=auth).status_code == 204
