"""Where a benchmark's result goes: the JSON file it was asked for (its folder made)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | None, result: dict) -> None:
    """Write `result` to `path` as indented JSON; nothing when `path` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
