"""What the viewer sees, from the recordings benchmarks/browser.py makes: onset, A/V offset over
time and interrupt latency per session, and their medians across sessions (pure functions on
the page's and the server's records; no browser needed)."""

from __future__ import annotations

import statistics

import numpy as np

from ray_lipsync.clock import FRAME_MS, PTS_PER_FRAME, video_pts

MOUTH_THRESHOLD = 4.0  # mean |difference| from idle (0-255) above which the mouth moves (speech: ~8-12)
# below this in 5 frames in a row the mouth is idle again: the idle picture the codec brings
# back after speech differs from the one before by up to ~5 (its quality at the bitrate varies)
IDLE_THRESHOLD = 6.0
RTP_WRAP = 1 << 32


def rtp_origin(phrases: list[tuple[int, int]], mouth_frame: int) -> tuple[int | None, int, int]:
    """The video's RTP timestamp of pts 0 (RTP = origin + pts, mod 2^32), from the short
    phrases: (pts of the utterance.start mark, RTP timestamp of the first moving frame shown),
    whose first moving frame is `mouth_frame` frames into the utterance. Returns (origin,
    phrases that agree with it, phrases)."""
    candidates = [(rtp - pts - mouth_frame * PTS_PER_FRAME) % RTP_WRAP for pts, rtp in phrases]
    if not candidates:
        return None, 0, 0
    origin = max(set(candidates), key=candidates.count)
    return origin, candidates.count(origin), len(candidates)


def audio_times(data: dict, clock_source: str) -> tuple[np.ndarray, np.ndarray]:
    """Wall times (s) of the first and last loud sample of each loud 128-sample block."""
    if clock_source == "sink":  # recorded where it leaves the browser (browser.py --sink-monitor)
        return np.asarray(data["sink_first"]), np.asarray(data["sink_last"])
    raw = np.asarray(data["audio"], dtype=np.float64).reshape(-1, 3)
    clock = np.asarray(data["clock"], dtype=np.float64)
    rate, origin = data["rate"], data["timeOrigin"]
    if clock_source == "output" and len(clock) and clock[-1, 0] > 0:
        ctx, perf = clock[:, 0], clock[:, 1]
    else:  # currentTime <-> performance.now() read together (no output latency)
        ctx, perf = clock[:, 2], clock[:, 3]
    offset = np.median(perf - ctx * 1000)  # perf ms = ctx s * 1000 + offset (one clock, no drift)
    if clock_source == "playout":  # when WebRTC handed it out + its reported device delay
        offset += data["rtc"].get("playout_ms") or 0.0
    first = (origin + offset + (raw[:, 0] + raw[:, 1]) / rate * 1000) / 1000
    last = (origin + offset + (raw[:, 0] + raw[:, 2]) / rate * 1000) / 1000
    return first, last


def analyse(data: dict, rows: list[dict] | None, pushes: list | None, args, audio_clock: str | None = None,
            lead_s: float | None = None, mouth_frame: int | None = None) -> dict:
    """One viewer's figures. `rows`/`pushes`: the server's per-frame records (in-process runs);
    None against a server that keeps none (`ray-lipsync serve`): then the A/V offset is
    (sound - mouth at the viewer) - `lead_s` (the renderer's own sound-after-mouth lead for
    the phrase), which in-process runs also report (`av_offset_lead_ms`) as its check.
    With the server's utterance marks (the module page) and `mouth_frame` (the short phrase's
    first moving frame, counted in the utterance), an interrupt's `mouth_frame_ms` is when the
    viewer showed the first frame after the cut, found by its RTP timestamp (`rtp_origin`),
    with no reading of the picture."""
    origin = data["timeOrigin"]
    wall = lambda perf: (origin + perf) / 1000
    a_first, a_last = audio_times(data, audio_clock or args.audio_clock)
    video = np.asarray(data["video"], dtype=np.float64).reshape(-1, 4)
    v_time, v_rtp, v_mouth = wall(video[:, 0]), video[:, 2].astype(np.int64), video[:, 3]
    marks = [(wall(m[0]), m[1], None if m[2] is None else int(m[2]), m[3], m[4] if len(m) > 4 else None)
             for m in data.get("marks", [])]
    origin_phrases: list[tuple[int, int]] = []  # short phrases: (pts of utterance.start, RTP of the first moving frame)
    # motion at the viewer: two frames in a row over the threshold (a single frame can be the
    # codec's own change of an idle picture, e.g. a keyframe)
    over = v_mouth > MOUTH_THRESHOLD
    moving = over & np.append(over[1:], False)
    frames = sorted(rows or [], key=lambda r: r["k"])
    pushes = pushes or []
    connected = data["connected_ms"] / 1000
    utterances, interrupts = [], []
    skipped = {"still_audible": 0, "not_found": 0}
    for post in [p for p in data["posts"] if p["name"] == "short"]:
        t = wall(post["t"])
        srv_audio = next((r["pt"] + r["first_loud"] / 16000 for r in frames if r["pt"] > t and r["first_loud"] >= 0), None)
        srv_mouth = next((r["pt"] for r in frames if r["pt"] > t and r["mouth"] > MOUTH_THRESHOLD), None)
        if len(a_last[(a_last > t - 0.15) & (a_last <= t)]):
            skipped["still_audible"] += 1  # the previous phrase still plays: no clean onset
            continue
        heard = a_first[a_first > t]
        shown = (v_time > t) & moving
        seen = v_time[shown]
        if (rows is not None and (srv_audio is None or srv_mouth is None)) or not len(heard) or not len(seen):
            skipped["not_found"] += 1
            continue
        by_lead = None if lead_s is None else ((heard[0] - seen[0]) - lead_s) * 1000
        start = next((m for m in marks if m[0] > t and m[1] == "utterance.start"), None)
        if start is not None:
            origin_phrases.append((start[2], int(v_rtp[shown][0])))
        pushed = next((p for p in pushes if p[0] > t), None)
        utterances.append({
            "post_to_push_ms": None if pushed is None else (pushed[0] - t) * 1000,
            "starts_in_ms": post.get("starts_in_ms"),  # the server's answer: when its first frame is presented
            "playout_delay_ms": None if pushed is None or pushed[1] is None else pushed[1] * 1000,
            "recent_latency_p99_ms": float(np.quantile(pushed[2], 0.99)) if pushed and pushed[2] else None,
            "since_connect_s": (heard[0] if srv_audio is None else srv_audio) - connected,
            "onset_audio_ms": (heard[0] - t) * 1000, "onset_mouth_ms": (seen[0] - t) * 1000,
            "server_audio_ms": None if srv_audio is None else (srv_audio - t) * 1000,
            "av_offset_ms": by_lead if srv_audio is None else ((heard[0] - srv_audio) - (seen[0] - srv_mouth)) * 1000,
            "av_offset_lead_ms": by_lead,
            "viewer_audio_delay_ms": None if srv_audio is None else (heard[0] - srv_audio) * 1000,
            "viewer_video_delay_ms": None if srv_mouth is None else (seen[0] - srv_mouth) * 1000,
        })
    rtp0, agree, phrases = (None, 0, 0) if mouth_frame is None else rtp_origin(origin_phrases, mouth_frame)
    for cut in data["interrupts"]:
        t = wall(cut["t"])
        end = next((m for m in marks if m[0] > t and m[1] == "utterance.end" and m[3]), None)
        start = next((m for m in reversed(marks) if m[0] < t and m[1] == "utterance.start"), None)
        mouth_frame_at = None
        if rtp0 is not None and end is not None and start is not None and end[4] is not None:
            # the first frame after the cut: the cut utterance's first frame + the frames it
            # played (its end mark is on that frame when the cut came after its new last frame
            # had left, as it usually does, else on the frame before)
            first_idle = (rtp0 + start[2] + video_pts(-(-end[4] // FRAME_MS))) % RTP_WRAP
            shown = np.flatnonzero((v_time > t) & ((v_rtp - first_idle) % RTP_WRAP < RTP_WRAP // 2))
            mouth_frame_at = v_time[shown[0]] if len(shown) else None
        after = a_last[(a_last > t - 0.5)]
        loud_after = a_first[a_first > t]
        # the sound ends at the last loud sample before a >= 200 ms quiet stretch
        quiet_at = None
        for i, end in enumerate(after):
            nxt = after[i + 1] if i + 1 < len(after) else np.inf
            if end > t - 0.2 and nxt - end >= 0.2:
                quiet_at = end
                break
        idle = None
        for i in np.flatnonzero(v_time > t):
            if (v_mouth[i:i + 5] < IDLE_THRESHOLD).all() and len(v_mouth[i:i + 5]) == 5:
                idle = v_time[i]
                break
        event = next((wall(e) for e in data.get("interrupt_events", []) if wall(e) >= t), None)  # SSE `interrupt`
        srv_idle = next((r["pt"] for r in frames if r["pt"] > t and r["first_loud"] < 0 and not r["speech"]), None)
        if quiet_at is None or idle is None or not len(loud_after):
            continue
        interrupts.append({"how": cut["how"], "audio_ms": (quiet_at - t) * 1000, "mouth_ms": (idle - t) * 1000,
                           "mouth_frame_ms": None if mouth_frame_at is None else (mouth_frame_at - t) * 1000,
                           "server_cut_ms": None if srv_idle is None else (srv_idle - t) * 1000,
                           "event_ms": None if event is None else (event - t) * 1000})
    stats = data["stats"]
    return {"chromium": data["rtc"], "skipped": skipped,"session": data["session"], "utterances": utterances, "interrupts": interrupts,
            "rtp_origin_phrases": [agree, phrases],
            "frames_dropped": stats.get("frames_dropped"), "drops": stats.get("drops"),
            "frames_sent": stats.get("frames_sent"), "latency_ms_p50": stats.get("latency_ms_p50"),
            "latency_ms_p99": stats.get("latency_ms_p99"), "page_errors": data["errors"]}


def summarise(sessions: list[dict]) -> dict:
    def med(values):
        return round(statistics.median(values), 1) if values else None

    def p(values, q):
        return round(float(np.quantile(values, q)), 1) if values else None

    utts = [u for s in sessions for u in s["utterances"]]
    later = [u for u in utts if u["since_connect_s"] >= 2.0]
    cuts = [c for s in sessions for c in s["interrupts"]]
    onset_a = [u["onset_audio_ms"] for u in utts]
    return {
        "utterances": len(utts), "interrupts": len(cuts),
        "onset_audio_ms_p50": med(onset_a), "onset_audio_ms_p90": p(onset_a, 0.9),
        "onset_mouth_ms_p50": med([u["onset_mouth_ms"] for u in utts]),
        "server_audio_ms_p50": med([u["server_audio_ms"] for u in utts if u["server_audio_ms"] is not None]),
        "av_offset_lead_ms_p50_from_2s": med([u["av_offset_lead_ms"] for u in later if u["av_offset_lead_ms"] is not None]),
        "av_offset_ms_p50": med([u["av_offset_ms"] for u in utts]),
        "av_offset_ms_p50_from_2s": med([u["av_offset_ms"] for u in later]),
        "abs_av_offset_ms_max_from_2s": max((abs(u["av_offset_ms"]) for u in later), default=None),
        "abs_av_offset_ms_p90_from_2s": p([abs(u["av_offset_ms"]) for u in later], 0.9),
        "av_offset_ms_first_2s": [round(u["av_offset_ms"], 1) for u in utts if u["since_connect_s"] < 2.0],
        # each session's first utterance against the rest: heard, and the server's playout delay
        "onset_audio_ms_first": [round(s["utterances"][0]["onset_audio_ms"], 1) for s in sessions if s["utterances"]],
        "starts_in_ms_first": [s["utterances"][0]["starts_in_ms"] for s in sessions if s["utterances"]],
        "starts_in_ms_p50": med([u["starts_in_ms"] for u in utts if u["starts_in_ms"] is not None]),
        "interrupt_audio_ms_p50": med([c["audio_ms"] for c in cuts if c["how"] == "page"]),
        "interrupt_mouth_ms_p50": med([c["mouth_ms"] for c in cuts if c["how"] == "page"]),
        "interrupt_api_audio_ms_p50": med([c["audio_ms"] for c in cuts if c["how"] == "api"]),
        "interrupt_api_mouth_ms_p50": med([c["mouth_ms"] for c in cuts if c["how"] == "api"]),
        "interrupt_mouth_frame_ms_p50": med([c["mouth_frame_ms"] for c in cuts if c["how"] == "page" and c["mouth_frame_ms"] is not None]),
        "interrupt_api_mouth_frame_ms_p50": med([c["mouth_frame_ms"] for c in cuts if c["how"] == "api" and c["mouth_frame_ms"] is not None]),
        "interrupt_api_event_ms_p50": med([c["event_ms"] for c in cuts if c["how"] == "api" and c["event_ms"] is not None]),
        "interrupt_server_cut_ms_p50": med([c["server_cut_ms"] for c in cuts if c["server_cut_ms"] is not None]),
        "frames_dropped": sum(s["frames_dropped"] or 0 for s in sessions),
    }
