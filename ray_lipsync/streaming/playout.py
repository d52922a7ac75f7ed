"""The playout delay policy: how long after it arrives a new utterance is presented.

A session's clock never changes: frame k is presented at `t0 + D_clock + 40k` for the whole
session, with `D_clock = pipeline.playout_delay_ms` (the upper bound of D). What adapts is
where a *new* utterance lands on that clock: at the first frame presented at least `D` after
the push arrived (and never before the end of speech already queued). So

- frames already emitted or queued are never retimed: the frame index / time mapping is the
  clock's, always;
- an utterance is contiguous from its first to its last sample: speech is never stretched or
  cut, D changes only in the silence between utterances;
- `D` is `p99(need of the last playout_window speech frames) + playout_margin_ms`, clamped
  to `[playout_min_ms, playout_delay_ms]`. The *need* of frame k is how much of its
  utterance's D it needed: `ready time - (first push of its utterance + 40 ms x its place in
  it)`. For speech pushed whole that is the pipeline's latency for the first frames (later
  ones are early); for speech streamed in real time (microphone, streaming TTS) it also
  holds the wait for the frame's own 40 ms of audio and the lookahead. So the needs of the
  two kinds of utterance are kept apart (`Utterance.streamed`: its first push was not
  final), and a new utterance reads those of its kind: its session's own; before the
  session measured any, what the pipeline's other sessions needed when it was created (live
  ones, and the last 10 s of speech of closed ones); with none of its kind anywhere, the
  other kind's, in the same order; else `playout_initial_ms`. (A talker streaming beside it
  must not give a pushed utterance the D a stream needs.) Frames whose image came too late
  count too (their need exceeds D), so D grows after drops.

`new_clock` puts t0 so that frame 0 is presented `playout_min_ms` after the session was
created; with `playout_adaptive=False` D is the fixed `playout_delay_ms` (t0 = creation).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from ray_lipsync.clock import SessionClock
from ray_lipsync.config import PipelineConfig

__all__ = ["PlayoutPolicy", "new_clock", "policy_for_new_session"]


class _KnowsNeeds(Protocol):
    def playout_needs(self, window: int, streamed: bool = False) -> list[float]: ...


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@dataclass(frozen=True)
class PlayoutPolicy:
    """D for the next utterance of a session, from its recent frame latencies (seconds)."""

    max_s: float
    min_s: float
    initial_s: float
    margin_s: float
    window: int
    adaptive: bool = True
    # what the pipeline's other sessions needed when this session was created (`seeded`):
    # (of utterances pushed whole, of streamed ones), ms
    prior_ms: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())

    @classmethod
    def from_config(cls, config: PipelineConfig) -> PlayoutPolicy:
        top = config.playout_delay_ms / 1000
        if not config.playout_adaptive:
            return cls(top, top, top, 0.0, 1, adaptive=False)
        initial = config.playout_delay_ms if config.playout_initial_ms is None else config.playout_initial_ms
        return cls(top, config.playout_min_ms / 1000, initial / 1000,
                   config.playout_margin_ms / 1000, config.playout_window)

    @property
    def floor_s(self) -> float:
        """The smallest D this policy ever picks (where frame 0 of a new session is shown)."""
        return self.min_s if self.adaptive else self.max_s

    def delay_s(self, needs_ms: Sequence[float]) -> float:
        """D for a new utterance; `needs_ms` oldest first (only the last `window` count)."""
        if not self.adaptive:
            return self.max_s
        recent = list(needs_ms)[-self.window:]
        wanted = _p99(recent) / 1000 + self.margin_s if recent else self.initial_s
        return min(self.max_s, max(self.min_s, wanted))


    def delay_for(self, needs_ms: Mapping[bool, Sequence[float]], streamed: bool) -> float:
        """D for a new utterance, streamed or pushed whole, of a session whose needs so far
        are `needs_ms` (by kind, oldest first): from the first of (its own of that kind, the
        prior of that kind, its own of the other kind, the prior of the other kind) that
        holds any (module docstring)."""
        prior = self.prior_ms
        for needs in (needs_ms[streamed], prior[streamed], needs_ms[not streamed], prior[not streamed]):
            if needs:
                return self.delay_s(needs)
        return self.delay_s(())

    def seeded(self, whole_ms: Sequence[float], streamed_ms: Sequence[float] = ()) -> PlayoutPolicy:
        """This policy with the needs other sessions (on the same engine) had: utterances
        pushed whole, streamed ones. A new session has measured nothing; what the others
        needed lately is a better first guess than the upper bound."""
        if not self.adaptive or not (whole_ms or streamed_ms):
            return self
        return replace(self, prior_ms=(tuple(whole_ms), tuple(streamed_ms)))


def new_clock(policy: PlayoutPolicy, now: float | None = None) -> SessionClock:
    """A session clock with D_clock = the policy's upper bound, frame 0 due `floor_s` from now.

    Shifting t0 back by `max_s - floor_s` lets a session's first utterance land as early as
    the policy allows; with a fixed D the shift is 0 (t0 = now).
    """
    now = time.time() if now is None else now
    return SessionClock(t0=now - (policy.max_s - policy.floor_s), delay_s=policy.max_s)


def policy_for_new_session(config: PipelineConfig, sessions: _KnowsNeeds) -> PlayoutPolicy:
    """The policy of a new session, its first D seeded by what the pipeline's sessions needed
    (open ones and the remembered needs of closed ones: SessionRegistry.playout_needs)."""
    policy = PlayoutPolicy.from_config(config)
    return policy.seeded(sessions.playout_needs(policy.window), sessions.playout_needs(policy.window, streamed=True))
