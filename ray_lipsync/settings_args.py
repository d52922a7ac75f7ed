"""Settings from the `args` of a Serve application builder (`serve run`, a Serve config file,
`cluster.yaml`, a RayService's `serveConfigV2`): a settings file, a nested mapping and dotted
field paths, merged in that order."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray_lipsync.config import Settings

SETTINGS_FILE_ARG = "settings_file"
SETTINGS_ARG = "settings"


def read_text(location: str) -> str:
    """A file's text from a local path or a pyarrow filesystem URI (s3://, gs://, file://)."""
    if "://" not in location:
        return Path(location).read_text()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def settings_from_args(args: Mapping[str, Any]) -> Settings:
    """Settings from the `args` of a Serve application builder, applied in this order:

    - `settings_file`: a JSON settings file (local path or pyarrow filesystem URI);
    - `settings`: a nested mapping (or its JSON text) like that file;
    - any other key is a dotted field path, e.g. `backend: musetalk`,
      `pipeline.max_replicas: "4"` (values from `serve run ... key=value` are strings:
      pydantic converts them; lists and objects are given as JSON text).
    Unknown fields are rejected with the field named.
    """
    data: dict[str, Any] = {}
    if SETTINGS_FILE_ARG in args:
        data = _merge(data, json.loads(read_text(str(args[SETTINGS_FILE_ARG]))))
    inline = args.get(SETTINGS_ARG)
    if inline is not None:
        data = _merge(data, json.loads(inline) if isinstance(inline, str) else dict(inline))
    for key, value in args.items():
        if key in (SETTINGS_FILE_ARG, SETTINGS_ARG):
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"setting {key!r}: {part!r} is not a section")
        node[leaf] = _json_or_text(value)
    return Settings.model_validate(data)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def _json_or_text(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value
