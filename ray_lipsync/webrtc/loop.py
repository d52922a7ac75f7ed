"""A video avatar's idle cycle, encoded once per session and sent again instead of re-encoded.

A silent session of a video avatar shows the avatar's idle cycle (or a state clip's loop):
the same untouched source frames, in the same order, over and over. VP8 cannot simply send an
old frame's packet again, since each inter frame is coded against what the receiver decoded
just before it; but a run of packets that starts with a keyframe decodes the same way every
time it is sent whole, from that keyframe on. So:

- **Recording.** Once a session has shown `RECORD_AFTER` untouched frames in a row, the
  encoder makes the next one that differs from the one before a keyframe and `IdleLoop` keeps
  that frame's packet and every following one, with the identity of the frame each shows, and
  a keyframe (an entry point) every `ENTRY_EVERY` frames. The recording is complete when the
  frames come round to its first one; anything else (speech, a cross-fade, a new clip, a new
  bitrate) discards it. A complete recording is kept through speech; it gives way to a new
  one when the untouched frames go on for longer than its period without meeting it (a state
  clip's loop).
- **Replaying.** When the session, after frames were encoded, reaches an entry point of a
  complete recording (that frame, after the same frame as in the recording), the recorded
  packets are sent from there on instead of encoding, for as long as the frames follow the
  recording. The first frame that does not (speech starts, the state changes) is encoded as a
  keyframe, since the encoder's own references are no longer what the receiver shows.

Frames are identified by their memory (`picture_key`, which `Vp8Stream` uses for still pictures
too): only an avatar's untouched source frames (read-only arrays handed out again) count; each
recorded one is held, so its address cannot come back with other pixels. A still picture (the
same frame again) is left to `Vp8Stream.skips` and never recorded. The receiver sees exactly
the stream the encoder made on the first pass; the cost is a keyframe every `ENTRY_EVERY`
frames of the loop, and one when speech interrupts a replay.
"""

from __future__ import annotations

import logging
from typing import SupportsBytes

import numpy as np

log = logging.getLogger(__name__)

RECORD_AFTER = 25  # untouched frames in a row (1 s of silence) before a recording starts
ENTRY_EVERY = 50  # frames between the recording's keyframes (entry points, 2 s)
MAX_FRAMES = 1500  # a longer cycle (60 s) is not recorded
MAX_BYTES = 8 << 20  # nor one whose packets would take more memory than this


def picture_key(image: np.ndarray) -> tuple | None:
    """The identity of an untouched avatar frame: its memory (address, shape, strides) when
    neither it nor any array it views can be written; None for a frame made for this session
    (speech, a cross-fade), whose pixels may change in place."""
    node: object = image
    while isinstance(node, np.ndarray):
        if node.flags.writeable:
            return None
        node = node.base
    return (image.__array_interface__["data"][0], image.shape, image.strides)


class IdleLoop:
    """One session's recorded idle cycle: `next_packet` before each frame sent, then, when it
    returned None, `wants_keyframe` and `encoded` for the frame the encoder makes; `drop` when
    the encoder's settings change. Frames come with their `picture_key` (the caller has it)."""

    def __init__(self, max_frames: int = MAX_FRAMES, max_bytes: int = MAX_BYTES) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._held: list[np.ndarray] = []  # the recorded frames (kept alive: their keys stay theirs)
        self._keys: list[tuple] = []
        self._packets: list[bytes] = []
        self._entries: dict[tuple, int] = {}  # (key before, key) -> index of a recorded keyframe
        self._before: tuple | None = None  # the key of the frame before the first recorded one
        self._bytes = 0
        self._complete = False
        self._at: int | None = None  # replaying: the index of the next recorded frame
        self._key: tuple | None = None  # this frame's key
        self._prev: tuple | None = None  # the key of the frame before it
        self._run = 0  # untouched frames in a row (negative: a wait after `drop`)
        self._after_replay = False
        self._off_loop = 0  # untouched frames encoded since the complete recording was last met
        self.frames_replayed = 0
        self.recordings = 0  # recordings completed

    @property
    def replaying(self) -> bool:
        return self._at is not None

    def next_packet(self, key: tuple | None, allowed: bool = True) -> bytes | None:
        """The recorded packet to send for the frame of `key` instead of encoding it, or None
        (also when not `allowed`: the receiver asked for a keyframe, which the encoder makes)."""
        self._prev, self._key = self._key, key
        self._run = self._run + 1 if key is not None else min(self._run, 0)
        if not allowed:
            self._after_replay = self._after_replay or self._at is not None
            self._at = None
        elif self._at is not None:
            if key is not None and key == self._keys[self._at]:
                return self._send(self._at)
            self._at = None  # the frames left the loop: the encoder takes over
            self._after_replay = True
        elif self._complete and key is not None:
            at = self._entries.get((self._prev, key))
            if at is not None:
                return self._send(at)
        return None

    def wants_keyframe(self) -> bool:
        """Whether the frame about to be encoded must be a keyframe: the first after a replay
        (the receiver shows the recording, not the encoder's last frame), the start of a
        recording, or its next entry point."""
        if self._after_replay:
            return True
        if self._complete:
            return False
        if not self._keys:
            return self._startable()
        return len(self._keys) % ENTRY_EVERY == 0

    def encoded(self, image: np.ndarray, key: tuple | None, packet: SupportsBytes, keyframe: bool) -> None:
        """Record the packet the encoder made for `image` (its `picture_key` is `key`; see the
        module docstring)."""
        self._after_replay = False
        if self._complete:
            self._off_loop = self._off_loop + 1 if key is not None else 0
            if self._off_loop > len(self._keys) + ENTRY_EVERY:
                self._discard("another loop")  # longer than the recording without meeting it
            return
        if key is None or key != self._key:  # made for this session (or not the frame announced)
            self._discard("a frame made for the session" if key is None else "a frame not announced")
            return
        if not self._keys:
            if keyframe and self._startable():
                self._before = self._prev
                self._add(image, key, packet, keyframe)
            return
        if (self._prev, key) == (self._before, self._keys[0]):
            self._complete = True  # came round: this frame is the recording's first
            self.recordings += 1
            log.debug("idle loop: recorded %d frames, %d bytes, %d entry points",
                      len(self._keys), self._bytes, len(self._entries))
            return
        self._add(image, key, packet, keyframe)
        if len(self._keys) > self.max_frames or self._bytes > self.max_bytes:
            self._discard("over the size limit")

    def drop(self, settle_frames: int = 0) -> None:
        """Forget the recording (the encoder's settings changed) and stop replaying it; a new
        one starts no sooner than `settle_frames` + `RECORD_AFTER` frames from now (a bitrate
        that is still ramping up would drop it again, and each start costs a keyframe)."""
        if self._at is not None:
            self._after_replay = True
        self._at = None
        self._run = -settle_frames
        self._discard("the encoder changed")

    def _startable(self) -> bool:
        """A recording may start here: silent long enough, and on a frame that differs from
        the one before (a still picture is never recorded)."""
        return self._run > RECORD_AFTER and self._key is not None and self._key != self._prev

    def _add(self, image: np.ndarray, key: tuple, packet: SupportsBytes, keyframe: bool) -> None:
        if keyframe:
            self._entries[(self._prev, key)] = len(self._keys)
        self._held.append(image)
        self._keys.append(key)
        data = bytes(packet)
        self._packets.append(data)
        self._bytes += len(data)

    def _send(self, at: int) -> bytes:
        self._at = (at + 1) % len(self._keys)
        self._off_loop = 0
        self.frames_replayed += 1
        return self._packets[at]

    def _discard(self, why: str) -> None:
        if self._keys:
            log.debug("idle loop: recording of %d frames dropped (%s)", len(self._keys), why)
        self._held, self._keys, self._packets, self._entries = [], [], [], {}
        self._before, self._bytes, self._complete, self._off_loop = None, 0, False, 0
