"""WebRTC media for sessions: clock-paced aiortc tracks, the per-session peer, mic input.

Import cost: aiortc and PyAV load on first import of this package, not with `ray_lipsync`.
"""

from ray_lipsync.webrtc.mic import MicReader
from ray_lipsync.webrtc.peer import SessionPeer, ice_configuration, parse_offer
from ray_lipsync.webrtc.tracks import (
    MediaCounters,
    SessionAudioTrack,
    SessionMedia,
    SessionVideoTrack,
    audio_chunks,
)
from ray_lipsync.webrtc.encoder import Vp8Stream

__all__ = [
    "MediaCounters",
    "MicReader",
    "SessionAudioTrack",
    "SessionMedia",
    "SessionPeer",
    "SessionVideoTrack",
    "audio_chunks",
    "ice_configuration",
    "Vp8Stream",
    "parse_offer",
]
