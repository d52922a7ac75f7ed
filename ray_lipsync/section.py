"""The base of every settings section (config.py, webrtc/settings.py): immutable, and a key it
does not know is an error rather than silently ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
