"""The relay process of a restream target: NUT on stdin -> the target (FLV over RTMP, ...).

PyAV opens a network output (TCP connect, the RTMP handshake) and writes its header and
trailer while holding Python's GIL: a target that accepts a connection and never answers
would freeze every thread of the process that did it, the gateway's event loop included. So
no gateway process ever opens a target: each restream target gets this small process, fed
the shared encode's packets (muxed as NUT, a container that carries codec parameters) through
a pipe, which it copies into the target without decoding (`python -m ray_lipsync.egress.relay
FORMAT URL`). Writing to a pipe releases the GIL, so a stuck target only stalls its own
sink thread (which then drops its packets, counted) until the relay is stopped or killed.

It prints `connected` on stdout once the target took the header, and on failure one line on
stderr, the reason (e.g. `Connection refused`), then exits 1; at the end of its input it
writes the trailer and exits 0.
"""

from __future__ import annotations

import sys

import av

CONNECTED = "connected"
# The parent's NUT header has every codec parameter: probing ends as soon as each stream has
# them (analyzeduration 0). A small probesize is no shortcut: FFmpeg then loses the first
# packet when it is larger than the probe (the first keyframe: tests/test_egress.py saw it).
INPUT_OPTIONS = {"analyzeduration": "0", "fpsprobesize": "0"}


def relay(fmt: str, url: str) -> None:
    source = av.open(sys.stdin.buffer, "r", format="nut", options=INPUT_OPTIONS)
    target = av.open(url, "w", format=fmt)
    try:
        streams = {s.index: target.add_stream_from_template(s, opaque=True) for s in source.streams}
        target.start_encoding()
        print(CONNECTED, flush=True)
        for packet in source.demux():
            if packet.dts is None:
                continue  # the demuxer's end-of-stream marker
            packet.stream = streams[packet.stream.index]
            target.mux(packet)
    finally:
        target.close()
        source.close()


def describe(error: BaseException) -> str:
    """A failure as a client may read it: the OS or FFmpeg reason, never a URL or address."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__


def main() -> None:
    fmt, url = sys.argv[1], sys.argv[2]
    try:
        relay(fmt, url)
    except BaseException as error:  # noqa: BLE001 - the reason goes to the parent, nothing else
        print(describe(error), file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
