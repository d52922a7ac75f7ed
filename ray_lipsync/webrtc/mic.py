"""Microphone input: a client's WebRTC audio track pushed into the session as speech.

Frames arrive as av.AudioFrame (Opus decodes to 48 kHz stereo s16); they are resampled to
16 kHz mono float32 (av.AudioResampler) and pushed with `session.push_audio` in pieces of
about `piece_ms`. Consecutive pieces share one utterance id `mic-<n>` (pushed with
final=False, so the session streams them as one utterance); a pause in the incoming stream or
the track's end closes it (final=True), and an interrupt (the session's epoch changed) starts
the next id.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ray_lipsync.clock import SAMPLE_RATE
from ray_lipsync.errors import Backpressure, SessionClosed

if TYPE_CHECKING:
    from ray_lipsync.streaming.session import Session

log = logging.getLogger(__name__)

DEFAULT_PIECE_MS = 60
DEFAULT_GAP_S = 0.5  # a pause this long in the incoming track starts a new utterance


class MicReader:
    """Reads one remote audio track and pushes it into `session` until the track ends."""

    def __init__(
        self,
        session: "Session",
        track: MediaStreamTrack,
        *,
        piece_ms: int = DEFAULT_PIECE_MS,
        gap_s: float = DEFAULT_GAP_S,
    ) -> None:
        if not 20 <= piece_ms <= 100:
            raise ValueError(f"piece_ms must be within 20..100 ms, got {piece_ms}")
        self._session = session
        self._track = track
        self._piece = piece_ms * SAMPLE_RATE // 1000
        self._gap_s = gap_s
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._utterance_n = 0
        self._epoch: int | None = None
        self._open = False  # an utterance was pushed with final=False and not closed yet
        self.samples_pushed = 0
        self.samples_rejected = 0

    @property
    def utterance_id(self) -> str:
        return f"mic-{self._utterance_n}"

    async def run(self) -> None:
        """Read until the track ends or the session closes."""
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(self._track.recv(), self._gap_s)
                except asyncio.TimeoutError:
                    await self._flush()  # the client stopped sending (mic off): end the utterance
                    continue
                except MediaStreamError:
                    break
                for out in self._resampler.resample(frame):
                    self._add(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
                while self._buffered >= self._piece:
                    await self._push(self._take(self._piece))
            await self._flush()
        except SessionClosed:
            log.debug("microphone: session closed, stop reading")

    def _add(self, samples: np.ndarray) -> None:
        if samples.size:
            self._buffer.append(samples)
            self._buffered += samples.size

    def _take(self, n: int) -> np.ndarray:
        joined = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        piece, rest = joined[:n], joined[n:]
        self._buffer = [rest] if rest.size else []
        self._buffered = int(rest.size)
        return piece

    async def _flush(self) -> None:
        """End the open utterance with what is buffered (possibly nothing)."""
        if self._open or self._buffered:
            await self._push(self._take(self._buffered) if self._buffered else np.zeros(0, np.float32), final=True)
            self._utterance_n += 1
        self._open = False

    async def _push(self, piece: np.ndarray, final: bool = False) -> None:
        epoch = getattr(self._session, "epoch", None)
        if self._epoch is not None and epoch != self._epoch:
            self._utterance_n += 1  # interrupted: what follows is a new utterance
        self._epoch = epoch
        try:
            await self._session.push_audio(
                np.ascontiguousarray(piece, dtype=np.float32), utterance_id=self.utterance_id, final=final
            )
            self._open = not final
            self.samples_pushed += piece.size
        except Backpressure:
            self.samples_rejected += piece.size
            log.warning("microphone: session %s buffer full, %d samples dropped", self._session.session_id, piece.size)


