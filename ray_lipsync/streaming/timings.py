"""What a session's speech frames took: each one's latency (all its audio at the engine -> its
image back) and the playout delay D it needed (what the playout policy reads, playout.py), kept
apart for utterances pushed whole and streamed ones (`Utterance.streamed`): a streamed frame
also needed the wait for its own audio."""

from __future__ import annotations

from collections import deque

from ray_lipsync.clock import FRAME_MS, SAMPLES_PER_FRAME
from ray_lipsync.streaming.timeline import Utterance

HISTORY = 2000  # frames whose latency and need are kept


class FrameTimings:
    """Latencies and needs of one session's recent speech frames (wall-clock seconds in,
    milliseconds kept)."""

    def __init__(self) -> None:
        self._audio_at: dict[int, float] = {}  # frame -> time its last sample reached the engine
        self.latencies_ms: deque[float] = deque(maxlen=HISTORY)
        # by kind of utterance: False pushed whole, True streamed
        self.needs_ms: dict[bool, deque[float]] = {kind: deque(maxlen=HISTORY) for kind in (False, True)}

    def audio_ready(self, start: int, stop: int, when: float) -> None:
        """Frames whose last sample lies in samples [start, stop) have all their audio at `when`."""
        for k in range(start // SAMPLES_PER_FRAME, stop // SAMPLES_PER_FRAME):
            self._audio_at[k] = when

    def shown(self, k: int) -> None:
        """Frame k was shown: a result for it from now on has no latency (it came too late)."""
        self._audio_at.pop(k, None)

    def result(self, k: int, at: float, utterance: Utterance | None, served: bool) -> float | None:
        """Frame k's result came back at `at`: with an image (`served`) it records the D the
        frame needed, its ready time - (first push of its `utterance` + its offset in it; frame
        k is on time whenever its utterance got a D of at least this). Returns its latency in
        ms (None if its audio was not seen going out), for `record_latency` once it is used."""
        arrived = self._audio_at.pop(k, None)
        if served and utterance is not None and utterance.placed_at is not None:
            need = (at - utterance.placed_at - (k - utterance.start_frame) * FRAME_MS / 1000) * 1000
            self.needs_ms[utterance.streamed].append(need)
        return None if arrived is None else (at - arrived) * 1000

    def record_latency(self, latency_ms: float | None) -> None:
        if latency_ms is not None:
            self.latencies_ms.append(latency_ms)

    def latency_quantiles(self, *qs: float) -> list[float | None]:
        """Nearest-rank quantiles of the recent latencies (None when there are none)."""
        ordered = sorted(self.latencies_ms)
        return [ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None for q in qs]
