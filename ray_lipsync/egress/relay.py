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

A protocol PyAV's own FFmpeg lacks (its wheels have no libsrt) is relayed by the system's
`ffmpeg` binary instead, when it has the protocol (Debian's does): the same NUT in, a stream
copy out (`relay_command`); it says it is connected with its first `-progress` report.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys

import av

CONNECTED = "connected"
# The parent's NUT header has every codec parameter: probing ends as soon as each stream has
# them (analyzeduration 0). A small probesize is no shortcut: FFmpeg then loses the first
# packet when it is larger than the probe (the first keyframe: tests/test_egress.py saw it).
INPUT_OPTIONS = {"analyzeduration": "0", "fpsprobesize": "0"}


PROBE_URLS = {"srt": "srt://127.0.0.1:9?connect_timeout=100", "rtmps": "rtmps://127.0.0.1:9/app/key"}
READY_PREFIXES = (CONNECTED, "progress=")  # this relay's line, or ffmpeg's first progress report


@functools.cache
def pyav_sends(scheme: str, fmt: str) -> bool:
    """Whether PyAV's FFmpeg can open `scheme://` outputs (probed once per process on the
    local discard port, refused at once: an FFmpeg without the protocol says so first)."""
    url = PROBE_URLS.get(scheme)
    if url is None:
        return True
    try:
        container = av.open(url, "w", format=fmt)
        try:
            container.start_encoding()
        finally:
            container.close()
    except av.error.ProtocolNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - refused / timed out: the protocol exists
        return True
    return True


@functools.cache
def ffmpeg_sends(scheme: str) -> bool:
    """Whether the system's `ffmpeg` binary has `scheme` among its output protocols."""
    binary = shutil.which("ffmpeg")
    if binary is None:
        return False
    try:
        listing = subprocess.run([binary, "-hide_banner", "-protocols"], capture_output=True,
                                 text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return scheme in listing.partition("Output:")[2].split()


def can_send(scheme: str, fmt: str) -> bool:
    return pyav_sends(scheme, fmt) or ffmpeg_sends(scheme)


def relay_command(fmt: str, url: str) -> list[str]:
    """The relay process for a target: this module, or the system ffmpeg for a protocol
    PyAV's FFmpeg lacks."""
    scheme = url.partition("://")[0].lower()
    if pyav_sends(scheme, fmt) or not ffmpeg_sends(scheme):
        return [sys.executable, "-m", "ray_lipsync.egress.relay", fmt, url]
    return [shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error",
            "-nostats", "-analyzeduration", "0", "-fpsprobesize", "0", "-f", "nut", "-i", "pipe:0",
            "-c", "copy", "-f", fmt, "-progress", "pipe:1", url]


def reason_of(line: str) -> str:
    """A relay's failure line as a client may read it: ffmpeg's "<url>: <reason>" loses the URL."""
    line = line.strip()
    return line.rpartition(": ")[2] if "://" in line else line


def relay(fmt: str, url: str) -> None:
    source = av.open(sys.stdin.buffer, "r", format="nut", options=INPUT_OPTIONS)
    target = av.open(url, "w", format=fmt)
    try:
        streams = {s.index: target.add_stream_from_template(s, opaque=True) for s in source.streams}
        target.start_encoding()
        _tell_parent(sys.stdout, CONNECTED)
        for packet in source.demux():
            if packet.dts is None:
                continue  # the demuxer's end-of-stream marker
            packet.stream = streams[packet.stream.index]
            target.mux(packet)
    finally:
        target.close()
        source.close()


def _tell_parent(pipe, line: str) -> None:
    """One line of the relay's protocol to the gateway that started it (not a log record)."""
    pipe.write(line + "\n")
    pipe.flush()


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
        _tell_parent(sys.stderr, describe(error))
        sys.exit(1)


if __name__ == "__main__":
    main()
