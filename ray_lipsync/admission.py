"""Admission from measured headroom: whether a gateway takes one more session, and when it
must shed one (a pure policy; the gateway feeds it samples, see api/gateway.py).

Every `LoadSample` says what the last second looked like on the gateway's host: its sessions
(and how many were talking), the frames its sessions sent and lost to lateness or sender
backpressure, the worst lag of its event loop, and the CPU busy on the host (every process:
pipeline, Ray, clients on the same machine). From these the policy keeps three estimates,
each the median of its last `ESTIMATES` samples (a session's connection or a keyframe burst is
one sample, not a trend):

- `base_cores`: the host's CPU with no session on this gateway (Ray, the rest of the machine);
- `idle_cores`: what one silent session adds, `(busy - base) / sessions` while none talks;
- `talk_cores`: what one talking session adds,
  `(busy - base - idle x silent sessions) / talking`.

The two per-session costs are measured only once a base has been: until then they are their
priors (`IDLE_CORES_PRIOR`, `talk_cores_prior`). A gateway Serve adds on a busy host gets
its first session within a second, before it has seen its host without one; charging that
session the whole host's CPU made it refuse every later session on a host with room.

A new session is admitted only if (`decide`):

1. every session was served on time over the last `window_s`: visible drops (late, sender
   backpressure) at most `max_drop_ratio` of the frames sent, and event-loop lag under
   `max_loop_lag_ms`;
2. the host could still serve everyone if `talking_share` of the sessions, the new one
   included, talked at once: the host's busy CPU now (median of the last 3 samples: every
   gateway and process on it counts) plus a talking session's cost for each session that would
   then talk and does not now, plus a silent session's cost for the new one if it is not
   among them, stays under `cpu_target x cores` (talking_share 1: any session may talk
   whenever it likes). The talking cost is at least `talk_cores_prior`: where several gateways
   share a host, one gateway's view of it is blurred by the others' sessions.
3. the configured bounds (`serve.max_sessions`) allow it (checked by the gateway).

The service's first session is always admitted (as the only session is never shed). A
gateway's first session while the service's other gateways hold sessions (`sessions_elsewhere`,
as the gateway last heard it) goes through the checks like any other: a gateway that Serve
added on a full host would otherwise take one session past the host's budget.

Refused: 503 with Retry-After `window_s`. Admission cannot foresee a noisy neighbour; when the
sessions have been degraded for `shed_after_s` (drops above `shed_drop_ratio`, or the loop lag
above twice its bound), `should_shed` says to close the newest session, once per
`shed_after_s`, so the older ones recover instead of all degrading together.
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass

from ray_lipsync.config import AdmissionConfig

ESTIMATES = 10  # samples each estimate is the median of
IDLE_CORES_PRIOR = 0.05


@dataclass(frozen=True)
class LoadSample:
    """What one sampling period (about a second) looked like."""

    t: float
    sessions: int
    talking: int
    frames_sent: int  # frames the sessions sent in this period
    frames_late: int  # of the sessions' frames lost to lateness or sender backpressure in it
    loop_lag_ms: float  # worst event-loop lag in it
    busy_cores: float  # CPU busy on the host in it, in cores
    cores: int


@dataclass(frozen=True)
class Decision:
    admit: bool
    reason: str
    retry_after_s: float = 0.0


class AdmissionPolicy:
    """Admit while measured headroom remains; shed the newest session under sudden overload."""

    def __init__(self, settings: AdmissionConfig = AdmissionConfig()) -> None:
        self.settings = settings
        self._samples: collections.deque[LoadSample] = collections.deque()
        self._base: collections.deque[float] = collections.deque(maxlen=ESTIMATES)
        self._idle: collections.deque[float] = collections.deque(maxlen=ESTIMATES)
        self._talk: collections.deque[float] = collections.deque(maxlen=ESTIMATES)
        self._degraded_since: float | None = None
        self._last_shed = float("-inf")

    def observe(self, sample: LoadSample) -> None:
        """Take one period's measurements."""
        self._samples.append(sample)
        while self._samples and self._samples[0].t < sample.t - self.settings.window_s:
            self._samples.popleft()
        above_base = max(0.0, sample.busy_cores - self.base_cores)
        if sample.sessions == 0:
            self._base.append(sample.busy_cores)
        elif not self._base:
            pass  # nothing to measure a session's cost against yet: the priors stand
        elif sample.talking == 0:
            self._idle.append(above_base / sample.sessions)
        else:
            silent = (sample.sessions - sample.talking) * self.idle_cores
            self._talk.append(max(0.0, above_base - silent) / sample.talking)
        if self._overloaded(sample):
            if self._degraded_since is None:
                self._degraded_since = sample.t
        else:
            self._degraded_since = None

    def decide(self, sessions: int, sessions_elsewhere: int = 0) -> Decision:
        """Whether one more session fits next to `sessions` open ones on this gateway
        (`sessions_elsewhere`: those of the service's other gateways)."""
        s = self.settings
        if not s.enabled:
            return Decision(True, "admission control is off")
        if sessions == 0 and sessions_elsewhere == 0:  # refusing its only session serves nobody
            return Decision(True, "the first session is always admitted")
        late, sent, lag = self._window()
        if sent and late / sent > s.max_drop_ratio:
            return Decision(False, f"sessions lost {late} of {sent} frames to lateness in the last "
                            f"{s.window_s:.0f} s", s.window_s)
        if lag > s.max_loop_lag_ms:
            return Decision(False, f"the gateway's event loop lagged {lag:.0f} ms", s.window_s)
        if not self._samples:
            return Decision(True, "no measurement yet")
        recent = list(self._samples)[-3:]
        busy = statistics.median(x.busy_cores for x in recent)
        talkers = math.ceil(s.talking_share * (sessions + 1) - 1e-9)
        more = max(0, talkers - recent[-1].talking)
        talk = max(self.talk_cores, s.talk_cores_prior)
        need = busy + talk * more + (self.idle_cores if talkers < sessions + 1 else 0.0)
        budget = s.cpu_target * self._samples[-1].cores
        if need > budget:
            return Decision(False, f"{sessions + 1} sessions would need {need:.2f} of {budget:.2f} "
                            f"cores ({talk:.2f} per talking session, {more} more would talk)", s.window_s)
        return Decision(True, f"{need:.2f} of {budget:.2f} cores")

    @property
    def base_cores(self) -> float:
        return statistics.median(self._base) if self._base else 0.0

    @property
    def idle_cores(self) -> float:
        return statistics.median(self._idle) if self._idle else IDLE_CORES_PRIOR

    @property
    def talk_cores(self) -> float:
        return statistics.median(self._talk) if self._talk else self.settings.talk_cores_prior

    def should_shed(self, now: float) -> bool:
        """Whether to close the newest session now (sustained overload; at most once per
        `shed_after_s`, so the effect of one shedding is measured before the next)."""
        s = self.settings
        if not s.enabled or self._degraded_since is None:
            return False
        if now - self._degraded_since < s.shed_after_s or now - self._last_shed < s.shed_after_s:
            return False
        self._last_shed = now
        self._degraded_since = None
        return True

    def _window(self) -> tuple[int, int, float]:
        late = sum(x.frames_late for x in self._samples)
        sent = sum(x.frames_sent for x in self._samples)
        lag = max((x.loop_lag_ms for x in self._samples), default=0.0)
        return late, sent, lag

    def _overloaded(self, sample: LoadSample) -> bool:
        s = self.settings
        dropping = sample.frames_sent > 0 and sample.frames_late / sample.frames_sent > s.shed_drop_ratio
        return sample.sessions > 1 and (dropping or sample.loop_lag_ms > 2 * s.max_loop_lag_ms)

