"""HTTP API over an in-process gateway on the real pipeline (LocalPipeline + SessionPeer).

No stand-ins: sessions run the procedural backend on a temporary RAY_LIPSYNC_HOME (the
`lipsync_settings` fixture prepares the default avatar once), offers are answered by the real
aiortc SessionPeer and read by the receiving aiortc client, speech is offline TTS.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from ray_lipsync.api.gateway import Gateway
from ray_lipsync.api.session_entry import default_peer_factory
from ray_lipsync.api.session_ids import home_of
from ray_lipsync.streaming.local import LocalPipeline
from ray_lipsync.webrtc.client import ReceiverClient
from helpers import connect, loud_ms, make, new_session, pieces, variant
from speech import silence, speech, to_pcm16_bytes, to_wav_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_session_lifecycle_and_auth_errors(lipsync_settings):
    gateway, client = make(lipsync_settings)
    async with client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert "default" in (await client.get("/v1/avatars")).json()["avatars"]
        assert "<html" in (await client.get("/")).text.lower()
        sid, auth = await new_session(client)
        assert home_of(sid) == ("gw1", None)
        state = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
        assert state["gateway"] == "gw1" and state["replica"] == "local"
        assert state["device"] == "cpu"  # where the session's frames are rendered
        assert state["speaking"] is False and state["connection_state"] == "new"
        assert (await client.get(f"/v1/sessions/{sid}")).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert (await client.get(f"/v1/sessions/{sid}", headers=bad)).status_code == 403
        assert (await client.get("/v1/sessions/gw1.unknown", headers=auth)).status_code == 404
        assert (await client.get("/v1/sessions/../x", headers=auth)).status_code == 404
        r = await client.post(f"/v1/sessions/{sid}/interrupt", headers=auth)
        assert r.json() == {"epoch": 1, "utterance_id": None, "played_ms": None, "interrupted": None}
        assert len(gateway.pipeline.sessions()) == 1
        assert (await client.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
        assert (await client.get(f"/v1/sessions/{sid}", headers=auth)).status_code == 404
        assert gateway.session_count == 0 and gateway.pipeline.sessions() == []
        await gateway.shutdown()


async def test_bad_json_offers_and_capacity(lipsync_settings):
    gateway, client = make(variant(lipsync_settings, serve={"max_sessions": 2}))
    async with client:
        r = await client.post("/v1/sessions", content=b"{not json",
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "bad_request"
        assert (await client.post("/v1/sessions", json={"avatar": ""})).status_code == 400
        r = await client.post("/v1/sessions", json={"avatar": "nobody"})
        assert r.status_code == 404 and r.json()["error"] == "unknown_avatar"
        sid, auth = await new_session(client)
        url = f"/v1/sessions/{sid}/offer"
        r = await client.post(url, json={"sdp": "garbage"}, headers=auth)
        assert r.status_code == 400 and "SDP" in r.json()["detail"]
        r = await client.post(url, json={"sdp": "v=0", "type": "answer"}, headers=auth)
        assert r.status_code == 400
        receiver = await connect(client, sid, auth)  # a failed offer leaves the session usable
        receiver2 = await connect(client, sid, auth)  # a reconnect: the new peer replaces the old
        frames = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()["frames_sent"]
        assert gateway.session_count == 1 and frames > 0
        for _ in range(100):  # the old connection was closed by the server
            if receiver.connection_state == "closed":
                break
            await asyncio.sleep(0.05)
        assert receiver.connection_state == "closed"
        await new_session(client)
        r = await client.post("/v1/sessions", json={})
        assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
        await gateway.shutdown()
        await asyncio.gather(receiver.close(), receiver2.close())


async def test_an_offer_sets_its_video_hold_or_gets_the_servers(lipsync_settings):
    """`video_hold_ms` in the offer is that peer's hold (the client module sends 0); without
    it the peer gets webrtc.video_hold_ms; outside 0-120 ms the offer is a 400 naming it."""
    holds: list[float] = []

    def peer_factory(session, **kwargs):
        holds.append(kwargs["video_hold"])
        return default_peer_factory(session, **kwargs)

    gateway, client = make(variant(lipsync_settings, webrtc={"video_hold_ms": 60}), peer_factory=peer_factory)
    async with client:
        sid, auth = await new_session(client)
        receiver = ReceiverClient()
        offer = await receiver.offer()
        for bad in (-1, 121, "soon"):
            r = await client.post(f"/v1/sessions/{sid}/offer", json={**offer, "video_hold_ms": bad}, headers=auth)
            assert r.status_code == 400 and "video_hold_ms" in r.json()["detail"], r.text
        assert holds == []  # a refused offer makes no peer
        for asked in (None, 0, 120):
            body = offer if asked is None else {**offer, "video_hold_ms": asked}
            r = await client.post(f"/v1/sessions/{sid}/offer", json=body, headers=auth)
            assert r.status_code == 200, r.text
        assert holds == [0.06, 0.0, 0.12]
        await receiver.close()
        await gateway.shutdown()


class FailingPeer:
    """Stands for aiortc's SessionPeer: a connection that fails when the test says so (a real
    one reports ICE failure only after aioice's ~30 s of unanswered consent checks)."""

    def __init__(self, peers: list, session, *, on_closed, **_: object) -> None:
        self.on_closed, self.connection_state = on_closed, "new"
        peers.append(self)

    async def answer(self, sdp: str, type: str = "offer") -> dict:
        self.connection_state = "connected"
        return {"sdp": "v=0", "type": "answer"}

    def network(self) -> None:
        return None

    async def close(self) -> None:
        self.connection_state = "closed"

    def fail(self) -> None:
        self.connection_state = "failed"
        self.on_closed(True)


async def test_a_failed_connection_keeps_the_session_for_a_new_offer(lipsync_settings):
    """webrtc.reconnect_grace_s: after a failed connection the session waits for a new offer
    (`session.connection` event, connection_state "lost"); without one it closes after the
    grace; a hang-up (not a failure) closes it at once."""
    peers: list[FailingPeer] = []
    settings = variant(lipsync_settings, webrtc={"reconnect_grace_s": 1.0})
    gateway = Gateway(settings, LocalPipeline(settings), "gw1",
                      peer_factory=lambda session, **kw: FailingPeer(peers, session, **kw))
    created = await gateway.create_session()
    sid, token = created["session_id"], created["token"]
    events: list[tuple[str, dict]] = []

    async def listen() -> None:
        async for event, data in gateway.events(sid, token, keepalive_s=5):
            events.append((event, data))

    listener = asyncio.create_task(listen())
    await gateway.offer(sid, token, "offer")
    peers[0].fail()
    assert (await gateway.status(sid, token))["connection_state"] == "lost"
    await asyncio.sleep(0.5)
    await gateway.offer(sid, token, "offer")  # the client came back within the grace
    await asyncio.sleep(1.5)  # longer than the grace: the session stays, it has a peer again
    assert (await gateway.status(sid, token))["connection_state"] == "connected"
    peers[0].fail()  # the replaced peer's late report changes nothing
    peers[1].fail()
    await asyncio.wait_for(listener, 10)  # no new offer: closed after the grace
    assert gateway.session_count == 0
    assert ("session.connection", {"state": "lost", "reconnect_within_s": 1.0}) in events
    assert events[-1][0] == "session.closed" and "no new offer" in events[-1][1]["reason"]

    created = await gateway.create_session()  # a hang-up closes at once
    await gateway.offer(created["session_id"], created["token"], "offer")
    peers[-1].on_closed(False)
    await asyncio.sleep(0.1)
    assert gateway.session_count == 0
    await gateway.shutdown()


def cut_event_of(cut: dict, utterance_id: str) -> dict:
    """The `interrupt` event an /interrupt answer `cut` announces."""
    return {"epoch": cut["epoch"], "utterance_id": utterance_id, "played_ms": cut["played_ms"]}


async def test_speech_over_http_and_webrtc_with_events(lipsync_settings):
    """Upload (streamed WAV), /speak (TTS), ?interrupt=true, /interrupt, SSE and the same
    events on the peer's "events" data channel, DELETE."""
    gateway, client = make(lipsync_settings)
    async with client:
        sid, auth = await new_session(client)
        token = auth["Authorization"].split()[1]
        events: list[tuple[float, str, dict]] = []

        async def listen() -> None:  # the SSE route's source, with arrival times
            async for event, data in gateway.events(sid, token, keepalive_s=5):
                events.append((time.monotonic(), event, data))

        listener = asyncio.create_task(listen())
        sse = asyncio.create_task(client.get(f"/v1/sessions/{sid}/events?token={token}"))
        receiver = await connect(client, sid, auth, events=True)

        clip = speech("The quick brown fox jumps over the lazy dog.")
        sent_at = time.monotonic()
        r = await client.post(f"/v1/sessions/{sid}/audio", content=pieces(to_wav_bytes(clip, channels=2)),
                              headers={**auth, "Content-Type": "audio/wav"})
        assert r.status_code == 202, r.text
        upload = r.json()
        assert abs(upload["duration_ms"] - len(clip) / 16) <= 2
        await asyncio.sleep(0.5)
        assert (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()["speaking"] is True
        await asyncio.sleep(len(clip) / 16000 + 0.5)
        heard = receiver.received.audio_signal()  # silence, the upload, silence
        state = (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
        assert state["speaking"] is False and state["connection_state"] == "connected"
        assert state["frames_sent"] > 25 and state["latency_ms_p50"] is not None

        # /speak queues TTS; an upload with ?interrupt=true replaces it
        r = await client.post(f"/v1/sessions/{sid}/speak", headers=auth,
                              json={"text": "Streaming avatars need steady latency."})
        assert r.status_code == 202 and r.json()["duration_ms"] > 1000
        spoken, r_spoken_ms = r.json()["utterance_id"], r.json()["duration_ms"]
        await asyncio.sleep(0.6)
        pcm = to_pcm16_bytes(np.concatenate([silence(0.2), speech("Hello there, how are you today?")]))
        r = await client.post(f"/v1/sessions/{sid}/audio?interrupt=true", content=pcm,
                              headers={**auth, "Content-Type": "audio/L16;rate=16000;channels=1"})
        assert r.status_code == 202
        replacing = r.json()["utterance_id"]
        await asyncio.sleep(0.8)
        r = await client.post(f"/v1/sessions/{sid}/interrupt", headers=auth)
        cut = r.json()
        assert cut["epoch"] == 2 and cut["utterance_id"] == replacing and cut["interrupted"] is True
        assert 0 < cut["played_ms"] < 1500 and cut["played_ms"] % 40 == 0, cut
        interrupted_at = time.monotonic()
        assert await receiver.wait_event("interrupt", timeout=5, after=4) == cut_event_of(cut, replacing)
        await asyncio.sleep(0.5)
        on_channel = [(e, d) for _, e, d in receiver.received.events]
        assert (await client.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
        await asyncio.wait_for(listener, 5)
        text = (await asyncio.wait_for(sse, 5)).text
        await receiver.close()

    names = [(e, d.get("utterance_id")) for _, e, d in events]
    # one start and one end per utterance (the upload went as one streamed utterance); a cut
    # utterance's `interrupt` comes at once, before its end (sent with its last frame)
    assert names == [("utterance.start", upload["utterance_id"]), ("utterance.end", upload["utterance_id"]),
                     ("utterance.start", spoken), ("interrupt", spoken), ("utterance.end", spoken),
                     ("utterance.start", replacing), ("interrupt", replacing), ("utterance.end", replacing),
                     ("session.closed", None)], names
    cut_event = next(d for _, e, d in events if e == "interrupt" and d["utterance_id"] == replacing)
    assert cut_event == cut_event_of(cut, replacing)
    # the data channel had the same events, in the same order (up to the close)
    assert on_channel == [(e, d) for _, e, d in events][:len(on_channel)] and len(on_channel) >= len(events) - 1
    times = {(e, d.get("utterance_id")): t for t, e, d in events}
    start_t = times[("utterance.start", upload["utterance_id"])]
    end_t = times[("utterance.end", upload["utterance_id"])]
    # events arrive when frames go out (after the playout delay), not when audio was pushed
    assert start_t - sent_at >= lipsync_settings.pipeline.playout_delay_ms / 1000 - 0.04
    assert abs((end_t - start_t) - (len(clip) / 16000 - 0.04)) < 0.2
    ends = {d["utterance_id"]: d for _, e, d in events if e == "utterance.end"}
    assert ends[upload["utterance_id"]]["played_ms"] == upload["duration_ms"]
    assert ends[upload["utterance_id"]]["interrupted"] is False
    assert ends[spoken]["interrupted"] is True and ends[spoken]["played_ms"] < r_spoken_ms
    assert (ends[replacing]["played_ms"], ends[replacing]["interrupted"]) == (cut["played_ms"], True)
    # the replaced speech ended at the interrupt, within 2 frames (+ scheduling slack)
    assert times[("utterance.end", replacing)] - interrupted_at < 0.08 + 0.1
    assert text.index("event: utterance.start") < text.index("event: session.closed")
    assert json.loads(text.split("event: session.closed\ndata: ")[1].split("\n")[0])["session_id"] == sid
    # the received audio holds the uploaded speech, as long as it was (energy VAD)
    rate = receiver.received.audio_rate
    assert abs(loud_ms(heard, rate) - loud_ms(clip, 16000)) <= 60, (loud_ms(heard, rate), loud_ms(clip, 16000))


async def test_a_data_channel_other_than_events_is_closed(lipsync_settings):
    """One "events" channel is served; the server closes any other (another label, a second
    "events") and reads nothing from any; the session streams on."""
    gateway, client = make(lipsync_settings)
    async with client:
        sid, auth = await new_session(client)
        receiver = ReceiverClient(ice_servers=[], events=True)
        r = await client.post(f"/v1/sessions/{sid}/offer", json=await receiver.offer(), headers=auth)
        await receiver.accept(r.json())
        await receiver.wait_first_video(timeout=5)
        # the client's own "events" channel is served; more channels opened on the connection are not
        others = [receiver._pc.createDataChannel(label) for label in ("other", "events")]  # noqa: SLF001
        for other in others:
            closed = asyncio.Event()
            other.on("close", closed.set)
            if other.readyState != "closed":
                await asyncio.wait_for(closed.wait(), 5)
        r = await client.post(f"/v1/sessions/{sid}/speak", headers=auth, json={"text": "Hello."})
        assert (await receiver.wait_event("utterance.start", timeout=5))["utterance_id"] == r.json()["utterance_id"]
        await receiver.close()
        await gateway.shutdown()


async def test_audio_upload_errors(lipsync_settings):
    gateway, client = make(variant(lipsync_settings, audio={"max_bytes": 100_000}))
    async with client:
        sid, auth = await new_session(client)
        url = f"/v1/sessions/{sid}/audio"
        wav = {**auth, "Content-Type": "audio/wav"}
        r = await client.post(url, content=b"hello", headers={**auth, "Content-Type": "text/plain"})
        assert r.status_code == 415
        r = await client.post(url, content=b"RIFF\x00\x00", headers=wav)
        assert r.status_code == 422
        r = await client.post(url, content=b"", headers=wav)
        assert r.status_code == 422
        r = await client.post(url, content=pieces(to_wav_bytes(np.zeros(4 * 16000))), headers=wav)
        assert r.status_code == 413  # streamed (chunked, no length) past the limit: refused midway
        r = await client.post(url, content=to_wav_bytes(np.zeros(100)), headers=wav)
        assert r.status_code == 202 and r.json()["duration_ms"] == 6
        await gateway.shutdown()


async def test_idle_timeout_and_peer_disconnect_free_sessions(lipsync_settings):
    gateway, client = make(variant(lipsync_settings, serve={"idle_timeout_s": 0.3}))
    async with client:
        await new_session(client)
        deadline = time.monotonic() + 5
        while gateway.session_count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gateway.session_count == 0 and gateway.pipeline.sessions() == []
    gateway, client = make(lipsync_settings)
    async with client:
        sid, auth = await new_session(client)
        receiver = await connect(client, sid, auth)
        await receiver.close()  # the client hangs up: the session goes with its peer
        deadline = time.monotonic() + 10
        while gateway.session_count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gateway.session_count == 0 and gateway.pipeline.sessions() == []
        await gateway.shutdown()
        assert not gateway._closing and not gateway._housekeeping.running



async def test_small_audio_upload_still_checks_the_token_first(lipsync_settings):
    """Short uploads skip the separate token check; a bad caller still gets 401/403, also
    with a body that would not decode."""
    gateway, client = make(lipsync_settings)
    async with client:
        sid, auth = await new_session(client)
        url = f"/v1/sessions/{sid}/audio"
        piece = to_wav_bytes(speech()[:3200])
        for body in (b"RIFF....garbage", piece):
            r = await client.post(url, content=body, headers={"Content-Type": "audio/wav"})
            assert r.status_code == 401, r.text
            r = await client.post(url, content=body,
                                  headers={"Content-Type": "audio/wav", "Authorization": "Bearer wrong"})
            assert r.status_code == 403, r.text
        r = await client.post(url, content=piece, headers={"Content-Type": "audio/wav", **auth})
        assert r.status_code == 202, r.text
    await gateway.shutdown()


async def test_home_client_runs_own_sessions_here_and_forwards_the_rest(lipsync_settings):
    pytest.importorskip("ray")
    from serve.clients import HomeClient

    from ray_lipsync.api.session_ids import COMPAT_RANDOM_DIGITS, gateway_code

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[str | int] = []

        async def status(self, session_id, token=None, *, compat=False):
            self.calls.append(session_id)
            return "forwarded"

    class Board:
        async def snapshots(self):
            return [{"from": "board"}]

    gateway = Gateway(lipsync_settings, LocalPipeline(lipsync_settings), "here")
    remote = Recorder()
    client = HomeClient(gateway, remote, Board())
    created = await client.create_session()  # no session yet: created in this replica
    assert home_of(created["session_id"])[0] == "here"
    status = await client.status(session_id=created["session_id"], token=created["token"])
    assert status["gateway"] == "here" and remote.calls == []
    assert await client.status(session_id="there.x", token="t") == "forwarded"
    elsewhere = ((gateway_code("here") + 1) % 1_000_000) * 10**COMPAT_RANDOM_DIGITS  # a LiveTalking id
    assert await client.status(session_id=elsewhere, compat=True) == "forwarded"
    assert remote.calls == ["there.x", elsewhere]
    assert await client.snapshots() == [{"from": "board"}]
    await gateway.shutdown()
    await gateway.pipeline.shutdown()
