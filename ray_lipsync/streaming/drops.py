"""Why a frame was dropped, and the one counter of a session's drops.

A speech frame is *dropped* when its image is not ready at its presentation time (the idle
frame takes its place) or when the sender could not keep up. Stages never count drops: they
report a `DropReason` for work they shed, and the session (streaming/session.py) counts every
drop once, here, with its reason. `stale_epoch` is work discarded after an interrupt: counted
for visibility, but not a frame the viewer missed.
"""

from __future__ import annotations

from collections import Counter
from enum import Enum


class DropReason(str, Enum):
    LATE = "late"  # no image by its presentation time
    SHED = "shed"  # an overloaded replica skipped it (already past its deadline)
    STAGE_UNAVAILABLE = "stage_unavailable"  # a pipeline stage died or did not answer in time
    STAGE_ERROR = "stage_error"  # a stage raised while computing it
    SENDER_BACKPRESSURE = "sender_backpressure"  # the WebRTC sender lagged; oldest frame dropped
    STALE_EPOCH = "stale_epoch"  # computed for speech an interrupt cut (not a visible drop)


VISIBLE = tuple(r for r in DropReason if r is not DropReason.STALE_EPOCH)


class DropCounter:
    """Drops of one session by reason."""

    def __init__(self) -> None:
        self._counts: Counter[DropReason] = Counter()

    def count(self, reason: DropReason, n: int = 1) -> None:
        self._counts[reason] += n

    @property
    def visible(self) -> int:
        """Frames the viewer saw replaced (every reason but stale_epoch)."""
        return sum(self._counts[r] for r in VISIBLE)

    def by_reason(self) -> dict[str, int]:
        return {r.value: self._counts[r] for r in DropReason}
