"""The demo page and the JavaScript client module, served by the API (routes.py)."""
