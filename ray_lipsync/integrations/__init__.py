"""Adapters that plug a ray-lipsync avatar into other frameworks (optional extras)."""
