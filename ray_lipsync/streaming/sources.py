"""Which source frame output frame k shows: a session's avatar state, its actions and the
switches between clips.

A session is always in a *state* (`idle`, the main video's cycle, or a clip of the avatar such
as `listening`); an *action* plays a clip once and then returns to the state. `ClipPlayer`
(one per session) turns requests into a `SourcePlan`: segments that each say "from output
frame `first` on, play this clip from this position". A plan only ever changes from a frame
on that no stage has used yet (the session picks it), so the frames already shown or
already sent for lip sync keep their source frames, and every copy of the plan (the session's,
the one a push carried to the feature stage) agrees on them.

Speech does not pause the plan: the mouth is lip-synced on whatever source frame the plan
gives, so speech over a clip keeps the clip's motion, and an utterance that starts during an
action or a state clip goes on on that clip's frames.

No cut at a switch: the new clip is entered at its frame most similar to the frame shown just
before (mean absolute difference of 32x32 thumbnails, `Avatar.thumbnails`); a state clip may
be entered anywhere in its cycle, an action within its first `ACTION_ENTRY_WINDOW` of its
frames (a gesture plays from near its beginning), and the state after an action at its frame
most similar to the action's last. When no frame of the new clip is close to the frame shown
(a head turned in one clip, straight in the other), the switch waits for a better moment: it
happens at the first of the next `MAX_WAIT_FRAMES` frames of the current clip whose best
match is within `Avatar.typical_step` (the clips' median frame-to-frame change), else at the
one whose best match is closest. If even that match is not within `Avatar.typical_step`
(clips cut from different moments of a recording rarely share a pose), the silent frames of
the switch are cross-faded: the old clip, still moving, fades into the new one over
`FADE_FRAMES` frames (`SourcePlan.silent_frame`). A lip-synced frame is never blended: speech
shows the new clip's frame from the switch on. The comparisons run once per request, never
per frame: in silence a frame costs one segment lookup, as the plain idle cycle does, plus a
blend of two frames during a cross-fade.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_lipsync.avatar.model import IDLE, Avatar, mirror_index
from ray_lipsync.errors import UnknownClip

log = logging.getLogger(__name__)

ACTION_ENTRY_WINDOW = 0.25  # an action is entered within the first quarter of its frames
MAX_WAIT_FRAMES = 12  # a switch waits at most this long (480 ms) for a frame close to the new clip
FADE_FRAMES = 6  # a switch to a frame that is not close is cross-faded over this many (240 ms)


@dataclass(frozen=True, slots=True)
class Segment:
    """From output frame `first` on, clip `clip` (source frames [start, start + length))
    plays from clip position `entry`: looped forward then backward (a state) or once, then
    held on its last frame (an action; the plan's next segment starts where it ends);
    cross-faded in from the segment before when `fade`."""

    first: int
    clip: str
    start: int
    length: int
    entry: int
    loop: bool
    fade: bool = False  # the silent frames of its first FADE_FRAMES fade in from the segment before

    def source(self, k: int) -> int:
        i = k - self.first + self.entry
        return self.start + (mirror_index(i, self.length) if self.loop else min(i, self.length - 1))

    @property
    def end(self) -> int | None:
        """First output frame after a played-once clip (None for a loop)."""
        return None if self.loop else self.first + self.length - self.entry


@dataclass(frozen=True)
class SourcePlan:
    """Output frame -> source frame, as segments ordered by `first` (immutable: a push carries
    the plan as it was when the push was made)."""

    segments: tuple[Segment, ...]

    @classmethod
    def cycle(cls, frames: int, start: int = 0) -> "SourcePlan":
        """The plain idle cycle of `frames` source frames from `start` (mirror indexing)."""
        return cls((Segment(0, IDLE, start, max(frames, 1), 0, True),))

    def _locate(self, k: int) -> int:
        """Index of the segment showing output frame k (the first one for frames before it)."""
        segments = self.segments
        i = len(segments) - 1
        while i and segments[i].first > k:
            i -= 1
        return i

    def segment(self, k: int) -> Segment:
        """The segment showing output frame k."""
        return self.segments[self._locate(k)]

    def source(self, k: int) -> int:
        """The source frame output frame k shows (lip-synced on, when it is speech)."""
        return self.segment(k).source(k)

    def silent_frame(self, k: int) -> tuple[int, int | None, float]:
        """(source frame, source frame faded from or None, weight of the first) of silent
        output frame k: a frame in a cross-fade blends the old clip's frame into the new's."""
        i = self._locate(k)
        segment = self.segments[i]
        source = segment.source(k)
        if segment.fade and i and k - segment.first < FADE_FRAMES:
            return source, self.segments[i - 1].source(k), (k - segment.first + 1) / (FADE_FRAMES + 1)
        return source, None, 1.0


def warm_switches(avatar: Avatar) -> None:
    """Compute what switches compare (thumbnails, typical step) of an avatar with clips now:
    pipelines call it off the event loop when a session opens, so a first switch never stalls
    the loop."""
    if avatar.clips:
        _ = avatar.typical_step  # its thumbnails too


def cross_fade(old: np.ndarray, new: np.ndarray, weight: float) -> np.ndarray:
    """`new` * weight + `old` * (1 - weight), two RGB uint8 frames of one size."""
    import cv2

    return cv2.addWeighted(new, weight, old, 1.0 - weight, 0.0)


class ClipPlayer:
    """The avatar state of one session and the plan that follows from it (see module doc).

    A request changes the plan from output frame `at` on, the first frame no stage has used
    yet (the session decides it). Names are checked against the avatar's clips (UnknownClip
    otherwise).
    """

    def __init__(self, avatar: Avatar) -> None:
        self.avatar = avatar
        self.state = IDLE
        idle = avatar.idle_frames
        self.plan = SourcePlan.cycle(len(idle), idle.start)

    @property
    def clips(self) -> list[str]:
        """The names a state or an action may take: "idle" and the avatar's clips."""
        return [IDLE, *self.avatar.clips]

    def frames(self, name: str) -> range:
        """Source frames of clip `name` ("idle": the main video); UnknownClip if there is none."""
        try:
            return self.avatar.clip_frames(name)
        except KeyError:
            raise UnknownClip(f"avatar {self.avatar.name!r} has no clip {str(name)[:80]!r}; it has "
                              f"{', '.join(self.clips)}") from None

    def source(self, k: int) -> int:
        """The source frame output frame k shows (lip-synced on, when it is speech)."""
        return self.plan.source(k)

    def silent_image(self, k: int) -> tuple[np.ndarray, int, dict[str, Any] | None]:
        """(image, source frame, fade) of silent output frame k: the source frame itself (a
        read-only view), or during a cross-fade its blend with the old clip's frame, fade =
        {from_source_frame, weight} (of the source frame)."""
        source, faded_from, weight = self.plan.silent_frame(k)
        image = self.avatar.frames[source]
        if faded_from is None:
            return image, source, None
        fade = {"from_source_frame": faded_from, "weight": weight}
        return cross_fade(self.avatar.frames[faded_from], image, weight), source, fade

    def clip_at(self, k: int) -> str:
        """Name of the clip output frame k shows."""
        return self.plan.segment(k).clip

    def action_at(self, k: int) -> str | None:
        """The action playing at output frame k or requested to start after it, if any."""
        action = self._action_after(k)
        return None if action is None else action.clip

    def set_state(self, state: str, at: int) -> int:
        """Make `state` the silent state from output frame `at` on (or a little later, see the
        module doc); an action playing then (or requested to start later) is not cut: the
        new state follows it. Returns the first output frame of the new state."""
        frames = self.frames(state)
        self.state = state
        action = self._action_after(at)
        if action is not None:
            kept = tuple(s for s in self.plan.segments if s.first <= action.first)
            start = action.end or at
            entry, fade = self._enter(action.source(start - 1), frames)
        else:
            kept = self._kept(at)
            if kept[-1].clip == state:
                self.plan = SourcePlan(kept)
                return at
            start, entry, fade = self._switch(kept[-1], at, frames, len(frames))
        self.plan = SourcePlan((*kept, Segment(start, state, frames.start, len(frames), entry, True, fade)))
        log.debug("%s: state %s from frame %d (clip frame %d)", self.avatar.name, state, start, entry)
        return start

    def play(self, clip: str, at: int) -> tuple[int, int]:
        """Play `clip` once from output frame `at` (or a little later, see the module doc;
        cutting an action playing then), then return to the state; returns the action's
        first output frame and the one after its last."""
        frames = self.frames(clip)
        kept = self._kept(at)
        window = max(1, round(len(frames) * ACTION_ENTRY_WINDOW))
        start, entry, fade = self._switch(kept[-1], at, frames, window)
        action = Segment(start, clip, frames.start, len(frames), entry, False, fade)
        end = action.end or start
        state = self.frames(self.state)
        back, fade_back = self._enter(frames.stop - 1, state)
        self.plan = SourcePlan((*kept, action, Segment(end, self.state, state.start, len(state), back, True, fade_back)))
        log.debug("%s: action %s on frames %d..%d", self.avatar.name, clip, start, end - 1)
        return start, end

    def change(self, state: str | None, action: str | None, at: int) -> tuple[int | None, int | None]:
        """`set_state` and/or `play`, the state first, from output frame `at`; both names are
        checked before anything changes. Returns (first frame of the change, the one after
        the action's last), None where nothing was asked."""
        for name in (state, action):
            if name is not None:
                self.frames(name)
        first = end = None
        if state is not None:
            first = self.set_state(state, at)
        if action is not None:
            first, end = self.play(action, at)
        return first, end

    def forget_before(self, k: int) -> None:
        """Drop the segments that decide no frame from k on (no stage asks for older frames;
        a segment fading into the next is kept until the fade is over)."""
        segments = self.plan.segments
        first = 0
        while first + 1 < len(segments) and segments[first + 1].first + FADE_FRAMES <= k:
            first += 1
        if first:
            self.plan = SourcePlan(segments[first:])

    # -- internals ------------------------------------------------------------------------
    def _kept(self, at: int) -> tuple[Segment, ...]:
        """The segments deciding frames before `at` (the plan from `at` on is replaced)."""
        return tuple(s for s in self.plan.segments if s.first < at) or self.plan.segments[:1]

    def _action_after(self, k: int) -> Segment | None:
        """The played-once segment showing frame k or starting after it."""
        for segment in reversed(self.plan.segments):
            if not segment.loop and (segment.end or 0) > k:
                return segment
        return None

    def _switch(self, current: Segment, at: int, frames: range, window: int) -> tuple[int, int, bool]:
        """(first output frame of the new clip, its entry position, whether to cross-fade) for
        a switch from the segment `current` at `at` or up to MAX_WAIT_FRAMES later (an action:
        not past its end)."""
        wait = MAX_WAIT_FRAMES if current.loop else max(0, min(MAX_WAIT_FRAMES, (current.end or at) - at))
        shown = [current.source(k) for k in range(at - 1, at + wait)]
        distance, entries = self._closest(shown, frames, window)
        close = np.flatnonzero(distance <= self.avatar.typical_step)
        i = int(close[0]) if close.size else int(np.argmin(distance))
        return at + i, int(entries[i]), not close.size

    def _enter(self, previous: int, frames: range) -> tuple[int, bool]:
        """(entry position in the loop `frames`, whether to cross-fade) after source frame
        `previous`, with no waiting (an action just ended)."""
        distance, entries = self._closest([previous], frames, len(frames))
        return int(entries[0]), bool(distance[0] > self.avatar.typical_step)

    def _closest(self, sources: list[int], frames: range, window: int) -> tuple[np.ndarray, np.ndarray]:
        """For each of `sources`: the distance to, and position of, the most similar frame
        among the first `window` of `frames`."""
        thumbs = self.avatar.thumbnails
        candidates = thumbs[frames.start:frames.start + window]
        distance = np.abs(candidates[None] - thumbs[sources][:, None]).mean(axis=(2, 3, 4))
        return distance.min(axis=1), distance.argmin(axis=1)
