"""WebRTC media for sessions: clock-paced aiortc tracks (tracks.py), the session's encoders
(encoder.py), the per-session peer (peer.py), mic input (mic.py), link feedback (rtcp.py,
bandwidth.py), WHEP viewers (whep.py).

Import the submodules themselves: this package imports nothing, so that a process which only
needs the bitrate bounds (the settings, every pipeline process) does not load aiortc and PyAV.
"""
