"""Typed errors. Each names the problem and what to do; the service maps them to HTTP codes."""

from __future__ import annotations


class LipsyncError(Exception):
    """Base of every error ray-lipsync raises on purpose."""


class AudioInputError(LipsyncError, ValueError):
    """Audio that cannot be used. `reason` is a short machine-readable code."""

    reason = "invalid_audio"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class AudioTooLarge(AudioInputError):
    """Input above the configured size or duration limit (HTTP 413)."""

    reason = "too_large"


class UnsupportedAudio(AudioInputError):
    """Not audio, or a format that cannot be decoded (HTTP 415)."""

    reason = "unsupported_format"


class MalformedAudio(AudioInputError):
    """Audio in a known format but unusable: empty, truncated, absurd rate, NaN/inf (HTTP 422)."""

    reason = "malformed"


class AvatarError(LipsyncError):
    """An avatar that cannot be prepared or loaded."""


class AvatarNotFound(AvatarError, KeyError):
    """No prepared avatar of that name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "avatar not found"


class WeightsError(LipsyncError):
    """Model weights missing or mismatched; the message lists the files and where to get them."""


class DeviceError(LipsyncError):
    """The compute device asked or declared for a backend cannot be used (e.g. no usable CUDA)."""


class SessionError(LipsyncError):
    """Bad use of a session."""


class UnknownSession(SessionError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown session"


class UnknownClip(SessionError, ValueError):
    """A state or action names a clip the session's avatar does not have (HTTP 400)."""


class SessionClosed(SessionError):
    """The session was closed; create a new one."""


class Backpressure(SessionError):
    """Audio was pushed faster than the session's bounded buffer allows; retry later.

    `retry_after_s`: how long until the buffer has room for it (None: unknown).
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AtCapacity(LipsyncError):
    """No replica has room for another session (HTTP 503 with Retry-After)."""


class BackendUnavailable(AtCapacity):
    """The requested backend cannot run on this server right now (HTTP 503 with Retry-After)."""


class StageUnavailable(LipsyncError):
    """A pipeline stage did not answer (HTTP 503 with Retry-After)."""


class UnknownOutput(SessionError, KeyError):
    """No such recording or restream target in this session (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown output"


class OutputConflict(SessionError):
    """The output is not in a state that allows this (a recording in progress; HTTP 409)."""


class OutputLimit(SessionError):
    """The session has as many outputs of this kind as the settings allow (HTTP 429)."""


class UnsupportedMediaType(LipsyncError):
    """A request body of a content type the route does not take (HTTP 415)."""
