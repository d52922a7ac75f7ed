"""ray-lipsync: real-time talking-avatar streaming with lip-sync.

The core package is importable without a Ray cluster: clock, audio, avatar, backends,
compositing and offline render. `actors/` and `serve/` (entry point `serve_app.py`) place it on Ray.
"""

__version__ = "0.1.0"
