"""Restream targets: which URLs a client may send the session to, and how.

A target is `rtmp://`, `rtmps://` (FLV: H.264 + AAC) or `srt://` (MPEG-TS; relayed by the
system's ffmpeg where PyAV's FFmpeg lacks SRT, relay.py). Anything else
(file:, http:, a pipe, a URL with credentials in it) is refused. So that the feature is no
SSRF hole, the host is resolved and every address it resolves to must be public: loopback,
private, link-local (cloud metadata, 169.254.169.254), multicast, reserved and unspecified
addresses are refused unless `restream.allow_private_addresses` is set (tests, a LAN
ingest). The check runs when the target is added and again before every reconnect.
FFmpeg resolves the host itself when it connects, so a DNS answer that changes between the
check and the connect (rebinding) is not caught; a deployment that must rule that out
restricts egress in its network as well.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from ray_lipsync.egress.relay import can_send
from ray_lipsync.egress.sink import TargetRefused

FORMATS = {"rtmp": "flv", "rtmps": "flv", "srt": "mpegts"}
DEFAULT_PORTS = {"rtmp": 1935, "rtmps": 443}
MAX_URL = 2048


@dataclass(frozen=True)
class Target:
    """A validated restream URL and the container format it takes."""

    url: str
    scheme: str
    host: str
    port: int

    @property
    def format(self) -> str:
        return FORMATS[self.scheme]

    @property
    def shown(self) -> str:
        """The URL as listed to clients and logs: the stream key (last path part, query) hidden."""
        path = urlsplit(self.url).path
        head, _, key = path.rpartition("/")
        hidden = f"{head}/***" if key else path
        return f"{self.scheme}://{self.host}:{self.port}{hidden}" + ("?***" if urlsplit(self.url).query else "")


def parse_target(url: str) -> Target:
    """Check the form of a restream URL (ValueError saying what is wrong); no DNS here."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise ValueError(f"the restream url must be a string of 1 to {MAX_URL} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("the restream url must not contain spaces or control characters")
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"malformed restream url: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in FORMATS:
        raise ValueError(f"restream url scheme {scheme or '(none)'!r} is not allowed; use "
                         "rtmp://, rtmps:// or srt://")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the restream url must not carry credentials (user:password@); put the "
                         "stream key in the path as ingests expect")
    host = parts.hostname
    if not host:
        raise ValueError("the restream url has no host")
    if port is None:
        if scheme == "srt":
            raise ValueError("an srt:// url needs a port (srt://host:port)")
        port = DEFAULT_PORTS[scheme]
    if not can_send(scheme, FORMATS[scheme]):
        raise ValueError(f"this server cannot send {scheme}:// (neither PyAV's FFmpeg nor an ffmpeg "
                         "binary has it); use rtmp:// or rtmps://")
    if scheme != "srt" and not parts.path.strip("/"):
        raise ValueError("an rtmp url needs an application and stream key: rtmp://host/app/key")
    return Target(url=url, scheme=scheme, host=host, port=port)


def refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is not public (see the module docstring)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (address.is_loopback or address.is_private or address.is_link_local or address.is_multicast
            or address.is_reserved or address.is_unspecified or not address.is_global)


def check_reachable(target: Target, allow_private: bool) -> None:
    """Resolve the host (blocking: call it in a thread). TargetRefused when an address it
    resolves to is not public (and `allow_private` is off); OSError when it does not resolve."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise OSError(error.errno, f"the host {target.host!r} does not resolve") from None
    if allow_private:
        return
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if refused_address(address):
            raise TargetRefused(f"the host {target.host!r} resolves to a loopback, private, link-local "
                                "or otherwise non-public address; restream targets must be public "
                                "(the server's restream.allow_private_addresses allows them)")
